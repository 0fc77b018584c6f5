"""Shared fixtures: small generated RefCOCO+ data roots in the official layout (vilbert/demo_data.py)."""

import pytest

from vilbert.demo_data import make_demo_dataset

# Small enough to generate in well under a second, large enough for every split to hold several images.
DEMO_SIZES = dict(seed=0, num_train_images=48, num_val_images=16, num_test_images=8)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A generated data root with vilbert_beta LMDB records (what `download_dataset.sh` fetches)."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo_beta"), layout="beta", **DEMO_SIZES)


@pytest.fixture(scope="session")
def demo_root_mt(tmp_path_factory):
    """The same data as `demo_root` (same seed and sizes), with vilbert-multi-task LMDB records."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo_mt"), layout="mt", **DEMO_SIZES)
