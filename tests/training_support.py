"""What the training-pipeline tests share: a tiny generated data root, the tiny model, run flags, weights."""

import json
from pathlib import Path

import numpy as np
import paddle

from vilbert.demo_data import make_demo_dataset

PROJECT = Path(__file__).resolve().parent.parent
TEST_MODEL = PROJECT / "tests" / "data" / "vilbert_test.json"
DEMO_TASK = PROJECT / "config" / "demo.yml"


def make_tiny_root(folder) -> Path:
    """A generated RefCOCO+ root of 60 train / 23 val expressions: one epoch of the tiny model takes ~1 s.

    60 is a multiple of every micro-batch count the tests split a batch into, so no sampler wraps around.
    """
    return make_demo_dataset(folder, seed=0, num_train_images=8, num_val_images=4, num_test_images=1)


def run_flags(root, output_dir, save_name: str = "run", **overrides) -> list:
    """train.py flags for a run of the tiny model on `root` (demo recipe, 2 epochs, batch 8, no workers), on the CPU
    also where there is a GPU."""
    flags = {"task_config": DEMO_TASK, "dataroot": root, "output_dir": output_dir, "save_name": save_name,
             "config_file": TEST_MODEL, "num_train_epochs": 2, "batch_size": 8, "eval_batch_size": 16,
             "num_workers": 0, "device": "cpu", **overrides}
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def no_dropout_model(folder) -> Path:
    """The tiny model config with every dropout probability 0, for runs that must agree number for number."""
    config = json.loads(TEST_MODEL.read_text())
    config.update({key: 0.0 for key in config if key.endswith("dropout_prob")})
    path = Path(folder) / "vilbert_test_no_dropout.json"
    path.write_text(json.dumps(config))
    return path


def read_weights(path) -> dict:
    """Model weights (name -> float64 array) of a best.pdparams, or of the model in a resumable last.pdparams."""
    state = paddle.load(str(path), return_numpy=True)
    state = state.get("model", state)
    return {name: np.asarray(value, np.float64) for name, value in state.items()}


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[name] - b[name]).max()) for name in a)


def read_metrics(run_dir) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
