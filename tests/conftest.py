"""Shared fixtures: small generated RefCOCO+ data roots in the official layout (vilbert/demo_data.py)."""

from types import SimpleNamespace

import paddle
import pytest

from vilbert.demo_data import make_demo_dataset
from vilbert.vqa_demo_data import make_vqa_demo

# Small enough to generate in well under a second, large enough for every split to hold several images.
DEMO_SIZES = dict(seed=0, num_train_images=48, num_val_images=16, num_test_images=8)
# About 260 train, 60 val and 45 test questions in 0.2 s. At this size only 13 answers are the consensus of the 9
# questions compute_softscore.py asks of an answer before it gets a label, so some targets hold no label (as
# some real ones do).
VQA_SIZES = dict(seed=0, num_train_images=48, num_val_images=12, num_test_images=8)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A generated data root with vilbert_beta LMDB records (what `download_dataset.sh` fetches)."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo_beta"), layout="beta", **DEMO_SIZES)


@pytest.fixture(scope="session")
def demo_root_mt(tmp_path_factory):
    """The same data as `demo_root` (same seed and sizes), with vilbert-multi-task LMDB records."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo_mt"), layout="mt", **DEMO_SIZES)


@pytest.fixture(scope="session")
def vqa_root(tmp_path_factory):
    """The data root (`<tmp>/VQA`, features in `<tmp>/coco`) of a generated VQA 2.0 in the official layout, with
    vilbert_beta LMDB records (what `download_dataset.sh --task vqa` fetches)."""
    return make_vqa_demo(tmp_path_factory.mktemp("vqa"), layout="beta", **VQA_SIZES)


@pytest.fixture(autouse=True)
def on_cpu():
    """Tests of CPU behaviour run on the CPU also on a machine with a GPU (tests/test_gpu.py picks the GPU itself)."""
    paddle.set_device("cpu")


@pytest.fixture
def scaler_on_gpu(monkeypatch):
    """paddle.amp.GradScaler built while this is active believes it runs on a GPU under fp16 autocast.

    CPU builds switch the scaler off; this runs its GPU path (scale, unscale, skip, update) on the CPU kernels.
    """
    gpu_place = SimpleNamespace(is_gpu_place=lambda: True, is_xpu_place=lambda: False, is_custom_place=lambda: False)
    monkeypatch.setattr(paddle.amp.grad_scaler, "_dygraph_tracer", lambda: SimpleNamespace(_expected_place=gpu_place))
    monkeypatch.setattr(paddle.amp.grad_scaler, "amp_global_state", lambda: SimpleNamespace(amp_dtype="float16"))
