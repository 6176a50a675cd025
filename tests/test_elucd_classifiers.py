"""The classifier side of EluCD: preprocessing read from preprocessor configs exactly as transformers reads them
(checked against transformers' own image processors), the smoothing warning, and label names, ids and tensors."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from guidekit.guidance import TransformersClassifier
from guidekit.testing.classifiers import tiny_resnet_classifier

# ---------------------------------------------------------------------------------------------------- processors

VIT = {  # as google/vit-base-patch16-224 writes it, at 32 px: an int size is a square for ViT
    "feature_extractor_type": "ViTFeatureExtractor", "do_resize": True, "size": 32, "resample": 2,
    "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}
RESNET = {  # as microsoft/resnet-50 writes it, at 24 px: ConvNeXt's processor, an int size is a shortest edge
    "feature_extractor_type": "ConvNextFeatureExtractor", "do_resize": True, "size": 24, "crop_pct": 0.875,
    "resample": 3, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}
CASES = {
    "vit-int-size": VIT,
    "resnet-int-size-crop-pct": RESNET,
    "resnet-by-model-type": {k: v for k, v in RESNET.items() if k != "feature_extractor_type"},
    "convnext-384-warp": {**RESNET, "image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 384}},
    "clip-int-size-and-crop": {  # as openai/clip-vit-base-patch32 writes it, at 24 px
        "feature_extractor_type": "CLIPFeatureExtractor", "do_resize": True, "size": 24, "do_center_crop": True,
        "crop_size": 24, "resample": 3, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    },
    "deit-square-then-crop": {  # as facebook/deit-base-patch16-224 writes it (256 → 224), at 28 → 24 px
        "feature_extractor_type": "DeiTFeatureExtractor", "do_resize": True, "size": 28, "do_center_crop": True,
        "crop_size": 24, "resample": 3, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    },
    "deit-crop-larger-than-image": {
        "image_processor_type": "DeiTImageProcessor", "do_resize": True, "size": {"height": 21, "width": 20},
        "do_center_crop": True, "crop_size": {"height": 24, "width": 23}, "resample": 2, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    },
    "beit-int-size": {
        "image_processor_type": "BeitImageProcessor", "do_resize": True, "size": 24, "do_center_crop": False,
        "resample": 2, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    },
    "bit-shortest-and-longest-edge": {
        "image_processor_type": "BitImageProcessor", "do_resize": True,
        "size": {"shortest_edge": 24, "longest_edge": 30}, "do_center_crop": False, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 127.5, "do_normalize": True,
        "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0],
    },
}


def smooth_image(height: int, width: int) -> np.ndarray:
    """A smooth uint8 RGB image (H, W, 3): low-frequency waves, where resampling filters barely differ."""
    y, x = np.mgrid[0:height, 0:width]
    channels = [
        0.5 + 0.4 * np.sin(2 * math.pi * (a * y / height + b * x / width) + c)
        for a, b, c in ((0.7, 0.4, 0.0), (-0.3, 0.8, 1.0), (0.5, -0.6, 2.0))
    ]
    return np.round(np.stack(channels, axis=-1) * 255).astype(np.uint8)


def transformers_pixels(config: dict, model, image: np.ndarray, folder) -> torch.Tensor:
    """What transformers' own processor (loaded from a folder, as from the Hub) gives for `image`."""
    from transformers import AutoImageProcessor

    model.config.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    processor = AutoImageProcessor.from_pretrained(str(folder))
    return torch.from_numpy(np.asarray(processor(image, return_tensors="np")["pixel_values"]))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (16, 21)])
def test_processor_config_is_read_as_transformers_reads_it(case, shape, tmp_path):
    config = CASES[case]
    model = tiny_resnet_classifier()
    image = smooth_image(*shape)
    expected = transformers_pixels(config, model, image, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each of these processors is reproduced without a warning
        adapter = TransformersClassifier(model, preprocessor_config=config)
    ours = adapter.preprocess(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)
    # Sizes exactly. Values loosely: the adapter resizes with torch (differentiable) where transformers uses PIL,
    # which rounds to 8 bits and whose bicubic kernel (a = -0.5) is not torch's (a = -0.75). On this smooth image
    # the two agree to about one 8-bit level (1.1/255 measured): allow 2/255 in [0, 1] image units, i.e. the
    # difference of model inputs times std / (255 · rescale_factor).
    assert ours.shape == expected.shape
    units = torch.tensor(config["image_std"]).view(1, 3, 1, 1) / (255 * config.get("rescale_factor", 1 / 255))
    assert ((ours - expected).abs() * units).max() <= 2 / 255


def test_vit_int_size_gives_the_input_the_model_takes():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=16, num_labels=3)
    torch.manual_seed(0)
    adapter = TransformersClassifier(ViTForImageClassification(config), preprocessor_config=VIT)
    logits = adapter(torch.rand(2, 3, 64, 96) * 2 - 1)  # 64 × 96 → 32 × 32, as ViTImageProcessor does
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_processor_steps_the_adapter_does_not_reproduce_warn():
    config = {"image_processor_type": "LevitImageProcessor", "size": {"shortest_edge": 24}, "crop_size": 24,
              "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    with pytest.warns(UserWarning, match=r"LevitImageProcessorPil\.resize"):
        TransformersClassifier(tiny_resnet_classifier(), preprocessor_config=config)


def test_convnext_processor_with_a_height_width_size_is_refused_as_by_transformers():
    config = {**RESNET, "size": {"height": 24, "width": 24}}
    with pytest.raises(ValueError, match="shortest_edge"):
        TransformersClassifier(tiny_resnet_classifier(), preprocessor_config=config)


# ---------------------------------------------------------------------------------------------------- smoothing


class Pooled(nn.Module):
    """conv 3→4, an activation, mean pool, linear 4→3: `act` a module, or a function applied functionally."""

    id2label = {0: "red", 1: "green", 2: "blue"}

    def __init__(self, act):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)
        self.act = act

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def tiny_convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)
    return TransformersClassifier(ConvNextForImageClassification(config), image_mean=0.5, image_std=0.5)


@pytest.mark.parametrize(
    "make, match",
    [
        (tiny_convnext, r"smooths nothing in ConvNextForImageClassification.*GELUActivation ×\d+ are smooth already"),
        (lambda: Pooled(nn.SiLU()), r"SiLU ×1 are smooth already"),
        (lambda: Pooled(nn.ReLU6()), r"ReLU6 ×1 is not ReLU.*functionally"),
        (lambda: Pooled(torch.nn.functional.relu), r"smooths nothing in Pooled.*no activation module.*F\.relu"),
    ],
)
def test_smoothing_that_replaces_nothing_warns_naming_the_activations(make, match):
    import guidekit

    with pytest.warns(UserWarning, match=match):
        hook = guidekit.EluCD(make(), 0)
    assert hook.softplus_beta == 3.0


def test_smoothing_warns_only_when_it_would_do_nothing():
    import guidekit

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guidekit.EluCD(TransformersClassifier(tiny_resnet_classifier(), image_mean=0.5, image_std=0.5), 0)  # has nn.ReLU
        guidekit.EluCD(Pooled(nn.GELU()), 0, softplus_beta=None)  # no smoothing asked
        guidekit.ClassifierGuidance(Pooled(torch.relu), 0)  # plain classifier guidance keeps ReLUs


# ---------------------------------------------------------------------------------------------------- labels

# Label names as ImageNet's id2label writes them (the ids DiT and the HF ImageNet classifiers use).
IMAGENET_STYLE = {134: "crane", 281: "tabby, tabby cat", 282: "tiger cat", 517: "crane", 638: "maillot",
                  639: "maillot, tank suit"}


def dit_label_ids(id2label, names):
    """DiT's own name → id reading: a stock ``DiTPipeline`` (no components needed) and its ``get_label_ids``."""
    from diffusers import DiTPipeline

    return DiTPipeline(transformer=None, vae=None, scheduler=None, id2label=id2label).get_label_ids(names)


@pytest.mark.parametrize("name", ["tabby", "tabby cat", "tiger cat", "tank suit"])
def test_label_synonyms_are_accepted_as_dit_accepts_them(name):
    from guidekit.guidance.classifiers import resolve_labels

    assert resolve_labels(name, IMAGENET_STYLE) == dit_label_ids(IMAGENET_STYLE, [name])[0]
    assert resolve_labels(name.upper(), IMAGENET_STYLE) == dit_label_ids(IMAGENET_STYLE, [name])[0]


def test_full_label_names_and_their_precedence():
    from guidekit.guidance.classifiers import resolve_labels

    assert resolve_labels(["tabby, tabby cat", "maillot, tank suit"], IMAGENET_STYLE) == (281, 639)
    assert resolve_labels("maillot", IMAGENET_STYLE) == 638  # the full label of 638, a synonym of 639


def test_an_ambiguous_name_is_refused_naming_both_ids():
    from guidekit.guidance.classifiers import resolve_labels

    with pytest.raises(ValueError, match=r"'crane' is ambiguous.*134 \('crane'\), 517 \('crane'\)"):
        resolve_labels("crane", IMAGENET_STYLE)
    with pytest.raises(ValueError, match=r"'bird' is ambiguous.*12 \('crane, bird'\), 40 \('bird of prey, bird'\)"):
        resolve_labels("bird", {12: "crane, bird", 40: "bird of prey, bird"})  # a synonym of two classes


def test_an_unknown_id_error_names_the_accepted_ids():
    from guidekit.guidance.classifiers import resolve_labels

    with pytest.raises(ValueError, match=r"accepted: one of the ids 281, 282, or a name") as error:
        resolve_labels(0, {281: "tabby, tabby cat", 282: "tiger cat"})
    assert "[0, 2)" not in str(error.value)
    many = {k: f"class {k}" for k in range(100, 1100, 2)}
    with pytest.raises(ValueError, match=r"one of 500 ids from 100 to 1098 \(100, 102, 104, 106, 108, \.\.\.\)"):
        resolve_labels(101, many)
    with pytest.raises(ValueError, match=r"an int in \[0, 3\)"):
        resolve_labels(3, {0: "a", 1: "b", 2: "c"})


def test_tensor_labels_are_accepted():
    import guidekit

    assert guidekit.EluCD(Pooled(nn.ReLU()), torch.tensor(2)).labels == 2
    assert guidekit.EluCD(Pooled(nn.ReLU()), torch.tensor([2, 0], dtype=torch.int32)).labels == (2, 0)
    assert guidekit.EluCD(Pooled(nn.ReLU()), np.array([1])).labels == (1,)


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.tensor([1.0]), "tensor of torch.float32 is not accepted"),
        (torch.tensor([[1]]), "2-d tensor"),
        (torch.tensor([True]), "torch.bool"),
        (torch.tensor([], dtype=torch.long), "empty list"),
        (torch.tensor([3]), r"3 is not a class.*\[0, 3\)"),
    ],
)
def test_tensor_label_errors(labels, match):
    import guidekit

    with pytest.raises(ValueError, match=match):
        guidekit.EluCD(Pooled(nn.ReLU()), labels)


# ---------------------------------------------------------------------------------------------------- the DiT example

IMAGENET_HEAD = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 281: "tabby, tabby cat", 282: "tiger cat"}


def test_the_guided_dit_docstring_example_runs(tmp_path):
    """GuidedDiTPipeline's example, as written, with its two Hub ids replaced by tiny local checkpoints that carry
    ImageNet-style label names."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from guidekit.pipelines import GuidedDiTPipeline
    from guidekit.testing import tiny_vae

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=2, in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
    dit = tmp_path / "dit"
    DiTPipeline(transformer, tiny_vae(sample_size=16), DDIMScheduler()).save_pretrained(dit)
    index = json.loads((dit / "model_index.json").read_text())
    index["id2label"] = {str(k): v for k, v in IMAGENET_HEAD.items()}
    (dit / "model_index.json").write_text(json.dumps(index))

    classifier_labels = {0: "tench, Tinca tinca", 1: "tabby, tabby cat", 2: "tiger cat"}
    model = tiny_resnet_classifier()
    model.config.id2label, model.config.label2id = classifier_labels, {v: k for k, v in classifier_labels.items()}
    resnet = tmp_path / "resnet"
    model.save_pretrained(str(resnet))
    (resnet / "preprocessor_config.json").write_text(json.dumps(RESNET))  # microsoft/resnet-50's, at 24 px

    lines = [line.strip()[4:] for line in GuidedDiTPipeline.__doc__.splitlines() if line.strip().startswith(">>> ")]
    source = "\n".join(lines)
    for hub_id, folder in (("facebook/DiT-XL-2-256", dit), ("microsoft/resnet-50", resnet)):
        assert f'"{hub_id}"' in source
        source = source.replace(f'"{hub_id}"', repr(str(folder)))
    namespace = {}
    exec(compile(source, "GuidedDiTPipeline example", "exec"), namespace)
    assert namespace["ids"] == [281]
    assert namespace["hooks"][1].labels == 1
    assert namespace["image"].size == (16, 16)


def test_a_config_transformers_has_no_class_for_is_read_with_its_base_rules():
    from transformers import PretrainedConfig

    class Bare(nn.Module):  # a model type transformers registers no image processor for
        def __init__(self):
            super().__init__()
            self.config = PretrainedConfig(id2label={0: "a", 1: "b"})

    config = {"size": 20, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    with pytest.warns(UserWarning, match="base rules"):
        adapter = TransformersClassifier(Bare(), preprocessor_config=config)
    assert adapter.preprocess(torch.zeros(1, 3, 30, 40)).shape == (1, 3, 20, 20)  # get_size_dict's default: a square
