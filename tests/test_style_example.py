"""The default style-transfer example (`guidekit.toy.style_example`): the shipped PNGs are the world's rendering
of the task pair the constant names, and the pair is the one `pick_example` picks from a measured result."""

import numpy as np
from PIL import Image

from guidekit.toy import style_example as ex
from guidekit.toy.style_task import make_pairs


def test_the_shipped_pngs_are_the_example_pair():
    pair = ex.example_pair()
    assert pair.content == make_pairs(ex.EXAMPLE_PAIR + 1)[-1].content
    assert ex.STYLE_EXAMPLE == ex.example_file_names(pair)
    assert ex.STYLE_EXAMPLE_PROMPT == pair.style_prompt
    content, style = ex.style_example_paths()
    assert content.name == ex.STYLE_EXAMPLE[0] and style.name == ex.STYLE_EXAMPLE[1]
    assert np.array_equal(np.asarray(Image.open(content).convert("RGB")), pair.content_image)
    assert np.array_equal(np.asarray(Image.open(style).convert("RGB")), pair.style_image)
    for path in (content, style):
        assert Image.open(path).size == (64, 64) and path.stat().st_size < 4096


def test_write_example_images(tmp_path):
    paths = ex.write_example_images(tmp_path / "new")
    assert [p.name for p in paths] == list(ex.STYLE_EXAMPLE)
    for written, shipped in zip(paths, ex.style_example_paths()):
        assert np.array_equal(np.asarray(Image.open(written)), np.asarray(Image.open(shipped)))


def test_file_names_say_what_the_images_show():
    pair = ex.example_pair()
    c, s = pair.content, pair.style
    names = ex.example_file_names(pair)
    assert names[0].startswith(f"content-{c.colour}-{c.shape}-on-{c.background}")
    assert names[1].startswith(f"style-{s.colour}-{s.shape}-on-{s.background}")
