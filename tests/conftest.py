"""Shared test setup: offline, one CPU thread, tiny checkpoints built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two threads on a shared two-core machine are several times slower than one.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from guidekit.testing import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory):
    from guidekit.testing import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from guidekit.testing import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture
def pipeline_calls(monkeypatch):
    """Each `GuidedStableDiffusionPipeline` call: its pipeline, the scheduler it ran with (object and class
    name), its steps and its hooks (the first one under "hook", None without hooks)."""
    from guidekit.pipelines import GuidedStableDiffusionPipeline

    seen = []
    real = GuidedStableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        hooks = list(kwargs.get("hooks") or [])
        seen.append({"pipe": self, "own": self.scheduler, "scheduler": type(self.scheduler).__name__,
                     "steps": kwargs.get("num_inference_steps"), "hooks": hooks, "hook": hooks[0] if hooks else None})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GuidedStableDiffusionPipeline, "__call__", spy)
    return seen
