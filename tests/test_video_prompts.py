"""FreeNoise's prompt schedules, embedding blends and motion-injection step rule against plain re-derivations."""

import pytest
import torch
from tolerance import assert_close_to_scale

import guidekit.video as video
from guidekit.video import (
    PromptBlend,
    blend_embeddings,
    interpolate_prompt_schedule,
    official_two_prompt_schedule,
    uses_fixed_prompt,
)


def embeddings(keys, shape=(3, 4), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(*shape, generator=gen) * 5).to(dtype) for k in keys}


def literal_diffusers_embeddings(prompts, frames, embeds):
    """diffusers' rule: sort the keys, repeat the last prompt at frame F−1, lerp each [s, e] inclusive."""
    prompts = dict(sorted(prompts.items()))
    prompts[frames - 1] = prompts[list(prompts)[-1]]
    starts, keys = list(prompts), list(prompts.values())
    out = torch.zeros(frames, *next(iter(embeds.values())).shape, dtype=torch.float64)
    for i in range(len(starts) - 1):
        s, e = starts[i], starts[i + 1]
        for j in range(e - s + 1):
            alpha = j / (e - s)
            out[s + j] = (1 - alpha) * embeds[keys[i]].double() + alpha * embeds[keys[i + 1]].double()
    return out


def literal_official_two_prompts(frames, a, b):
    """funcs.py: A for ⌊3F/8⌋ frames, A + (B − A)/(L2 − 1)·i for the middle L2, then B."""
    len1 = int(frames * 3 // 8)
    len2 = frames - len1 * 2
    diff = (b - a) / (len2 - 1)
    middle = [a + diff * i for i in range(len2)]
    return torch.stack([a] * len1 + middle + [b] * len1)


# ----------------------------------------------------------------------------------------------------------
# interpolate_prompt_schedule


def test_schedule_worked_by_hand():
    schedule = interpolate_prompt_schedule({0: "a", 4: "b"}, 7)
    assert schedule == [("a", "b", 0.0), ("a", "b", 0.25), ("a", "b", 0.5), ("a", "b", 0.75),
                        ("b", "b", 0.0), ("b", "b", 0.0), ("b", "b", 0.0)]
    assert all(isinstance(entry, PromptBlend) for entry in schedule)


def test_schedule_holds_the_first_key_before_it_and_sorts_keys():
    schedule = interpolate_prompt_schedule({6: "c", 2: "a", 4: "b"}, 8)
    assert [tuple(e) for e in schedule] == [
        ("a", "a", 0.0), ("a", "a", 0.0), ("a", "b", 0.0), ("a", "b", 0.5),
        ("b", "c", 0.0), ("b", "c", 0.5), ("c", "c", 0.0), ("c", "c", 0.0),
    ]


def test_single_prompt_and_single_frame():
    assert interpolate_prompt_schedule({0: "x"}, 3) == [("x", "x", 0.0)] * 3
    assert interpolate_prompt_schedule({0: "x"}, 1) == [("x", "x", 0.0)]


@pytest.mark.parametrize(
    "prompts,frames",
    [({0: "a", 8: "b"}, 16), ({0: "a", 8: "b", 15: "c"}, 16), ({0: "a", 3: "b", 9: "a", 10: "c"}, 20),
     ({0: "a", 1: "b"}, 2), ({0: "a"}, 5)],
)
def test_blended_schedule_equals_diffusers_rule(prompts, frames):
    embeds = embeddings(set(prompts.values()))
    out = blend_embeddings(embeds, interpolate_prompt_schedule(prompts, frames))
    assert out.shape == (frames, 3, 4) and out.dtype == torch.float32
    assert_close_to_scale(out, literal_diffusers_embeddings(prompts, frames, embeds), 1e-6)
    for frame, key in prompts.items():  # a key frame is exactly its prompt's embedding
        assert torch.equal(out[frame], embeds[key])


# ----------------------------------------------------------------------------------------------------------
# official two-prompt schedule


def test_official_two_prompt_schedule_worked_by_hand():
    # F=16: L1 = ⌊48/8⌋ = 6, L2 = 4 → 6×A, then t = 0, 1/3, 2/3, 1, then 6×B
    ts = [e.t for e in official_two_prompt_schedule(16)]
    assert ts == [0.0] * 6 + [0.0, 1 / 3, 2 / 3, 1.0] + [1.0] * 6
    assert all((e.key_a, e.key_b) == (0, 1) for e in official_two_prompt_schedule(16))
    ts = [e.t for e in official_two_prompt_schedule(64, "A", "B")]
    assert ts[:24] == [0.0] * 24 and ts[40:] == [1.0] * 24 and len(ts) == 64  # 3/8, 1/4, 3/8


@pytest.mark.parametrize("frames", [2, 4, 5, 8, 16, 17, 31, 64])
def test_official_two_prompt_blend_equals_official_formula(frames):
    embeds = embeddings(["A", "B"], seed=frames)
    out = blend_embeddings(embeds, official_two_prompt_schedule(frames, "A", "B"))
    assert_close_to_scale(out, literal_official_two_prompts(frames, embeds["A"], embeds["B"]), 1e-6)


@pytest.mark.parametrize("frames", [1, 3])
def test_official_two_prompt_single_middle_frame_is_the_midpoint(frames):
    ts = [e.t for e in official_two_prompt_schedule(frames)]
    assert ts == ([0.5] if frames == 1 else [0.0, 0.5, 1.0])


# ----------------------------------------------------------------------------------------------------------
# blend_embeddings


def test_blend_worked_by_hand_and_sequence_keys():
    embeds = [torch.tensor([0.0, 10.0]), torch.tensor([4.0, 2.0])]
    out = blend_embeddings(embeds, [(0, 1, 0.0), (0, 1, 0.25), (0, 1, 1.0), (1, 1, 0.7), (1, 0, 0.5)])
    assert out.tolist() == [[0.0, 10.0], [1.0, 8.0], [4.0, 2.0], [4.0, 2.0], [2.0, 6.0]]


def test_blend_in_half_precision_rounds_once():
    embeds = embeddings(["a", "b"], dtype=torch.float16)
    schedule = interpolate_prompt_schedule({0: "a", 7: "b"}, 8)
    out = blend_embeddings(embeds, schedule)
    assert out.dtype == torch.float16
    exact = torch.stack([(1 - t) * embeds[a].double() + t * embeds[b].double() for a, b, t in schedule])
    assert torch.equal(out, exact.half())


# ----------------------------------------------------------------------------------------------------------
# motion injection


def test_official_injection_steps():
    assert [i for i in range(50) if uses_fixed_prompt(i, 50)] == [i for i in range(50) if i < 5 or i > 15]


def test_injection_bounds_as_fractions():
    assert [uses_fixed_prompt(i, 25) for i in range(10)] == [True] * 3 + [False] * 5 + [True] * 2  # 2.5, 7.5
    assert not any(uses_fixed_prompt(i, 10, t_a=0.0, t_b=1.0) for i in range(10))
    assert all(uses_fixed_prompt(i, 10, t_a=1.0, t_b=1.0) for i in range(10))
    # 0.29·100 rounds to 28.999999999999996: step 29 is the bound itself, not above it
    assert not uses_fixed_prompt(29, 100, t_a=0.0, t_b=0.29) and uses_fixed_prompt(30, 100, t_a=0.0, t_b=0.29)
    assert uses_fixed_prompt(0, 1)


# ----------------------------------------------------------------------------------------------------------
# errors


def test_exported():
    for name in ("PromptBlend", "blend_embeddings", "interpolate_prompt_schedule", "official_two_prompt_schedule",
                 "uses_fixed_prompt"):
        assert name in video.__all__


@pytest.mark.parametrize(
    "prompts,frames,match",
    [
        ({0: "a", 16: "b"}, 16, "prompts key.*0 to 15"),
        ({-1: "a"}, 16, "prompts key"),
        ({0.0: "a"}, 16, "prompts key"),
        ({"0": "a"}, 16, "prompts key"),
        ({True: "a"}, 16, "prompts key"),
        ({}, 16, "prompts"),
        (["a", "b"], 16, "prompts"),
        ({0: "a"}, 0, "num_frames"),
        ({0: "a"}, 4.0, "num_frames"),
    ],
)
def test_schedule_errors(prompts, frames, match):
    with pytest.raises(ValueError, match=match):
        interpolate_prompt_schedule(prompts, frames)


def test_two_prompt_errors():
    with pytest.raises(ValueError, match="num_frames"):
        official_two_prompt_schedule(0)


def test_blend_errors():
    embeds = embeddings(["a", "b"])
    with pytest.raises(ValueError, match="schedule"):
        blend_embeddings(embeds, [])
    with pytest.raises(ValueError, match="key 'c'"):
        blend_embeddings(embeds, [("a", "c", 0.5)])
    with pytest.raises(ValueError, match="schedule t"):
        blend_embeddings(embeds, [("a", "b", 1.5)])
    with pytest.raises(ValueError, match="schedule"):
        blend_embeddings(embeds, [("a", "b")])
    with pytest.raises(ValueError, match=r"embeds_by_key\['b'\].*shape"):
        blend_embeddings({"a": torch.zeros(3), "b": torch.zeros(4)}, [("a", "b", 0.5)])
    with pytest.raises(ValueError, match=r"embeds_by_key\['b'\]"):
        blend_embeddings({"a": torch.zeros(3), "b": [0.0, 0.0, 0.0]}, [("a", "b", 0.5)])
    with pytest.raises(ValueError, match=r"embeds_by_key\['b'\]"):
        blend_embeddings({"a": torch.zeros(3), "b": torch.zeros(3, dtype=torch.float64)}, [("a", "b", 0.5)])


@pytest.mark.parametrize(
    "args,match",
    [
        ((50, 50), "step_index"),
        ((-1, 50), "step_index"),
        ((1.0, 50), "step_index"),
        ((0, 0), "num_steps"),
        ((0, 50, -0.1, 0.3), "t_a"),
        ((0, 50, 0.1, 1.5), "t_b"),
        ((0, 50, 0.5, 0.3), "t_a.*t_b"),
        ((0, 50, float("nan"), 0.3), "t_a"),
    ],
)
def test_injection_errors(args, match):
    with pytest.raises(ValueError, match=match):
        uses_fixed_prompt(*args)
