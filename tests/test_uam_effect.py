"""UAM's effect on the embedded toy model (skipped until the model is in assets/), and the eval helpers."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def _toy_path():
    from guidekit.toy import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError:
        return None
    return path if (path / "model_index.json").exists() else None


def test_edit_targets_change_one_word():
    from guidekit.apps.eval_uam import edit_targets
    from guidekit.toy.world import generate, parse_caption

    for seed in range(20):
        scene = generate(seed).scene
        for kind in ("colour", "shape"):
            caption, new, target = edit_targets(scene, kind)
            before, after = parse_caption(scene.caption), parse_caption(caption)
            changed = {k for k in before if before[k] != after[k]}
            assert changed == {kind}
            assert after[kind] == new and after["colour"] != after["background"]
            assert (target.cx, target.cy, target.radius) == (scene.cx, scene.cy, scene.radius)


@pytest.mark.skipif(_toy_path() is None, reason="the embedded toy model has not landed in assets/ yet")
def test_uam_reconstruction_beats_ddim_inversion_at_high_guidance():
    from guidekit.pipelines import UAMStableDiffusionPipeline
    from guidekit.toy import MODEL_WORLD_VERSION
    from guidekit.toy.world import generate

    pipe = UAMStableDiffusionPipeline.from_pretrained(str(_toy_path()))
    pipe.set_progress_bar_config(disable=True)
    samples = [generate(2000 + i, MODEL_WORLD_VERSION) for i in range(4)]  # images of the model's own world
    images = np.stack([s.image for s in samples])
    captions = [s.caption for s in samples]
    uam = pipe.reconstruct(images, "", 1.0, uniform=True, num_inference_steps=20, output_type="np")
    ddim = pipe.reconstruct(images, captions, 7.5, uniform=False, num_inference_steps=20, output_type="np")
    psnr_uam = np.mean([m["psnr"] for m in uam.metrics])
    psnr_ddim = np.mean([m["psnr"] for m in ddim.metrics])
    assert psnr_uam > psnr_ddim
