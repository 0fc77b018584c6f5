"""What the training-pipeline tests share: a tiny generated data root, the tiny model, run flags, weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

import train
from vilbert.demo_data import make_demo_dataset
from vilbert.model import VILBertForVLTasks

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


# The launcher gives each rank a GPU wherever it sees one (and cannot be told not to: it reads CUDA_VISIBLE_DEVICES as
# a device list), so its CPU runs need a machine without a visible GPU; tests/test_gpu.py launches 2 GPU ranks there.
CPU_LAUNCH_ONLY = pytest.mark.skipif(paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0,
                                     reason="paddle.distributed.launch assigns GPUs here; see tests/test_gpu.py")

# train.py as the distributed tests launch it: dropout differs per rank by design, so runs that must agree with one
# process have none (the model config's is 0, and this turns off the REC head's, fixed at 0.1 in the model as
# official, not a config key). With $STALL_AT = "train:N" (or "eval:N") the process stops answering at its own N-th
# training step (evaluation batch), after writing its pid to $STALL_MARKER: a node about to be killed.
LAUNCHER = '''"""train.py without the REC head's dropout; with $STALL_AT, stalled at that step."""
import os
import sys
import time

sys.path.insert(0, {project!r})
import vilbert.engine
from vilbert.model import VILBertForVLTasks

_init = VILBertForVLTasks.__init__
VILBertForVLTasks.__init__ = lambda self, config, dropout_prob=0.1, **heads: _init(self, config, dropout_prob=0.0, **heads)
if os.environ.get("STALL_AT"):
    _forward, _steps = vilbert.engine.forward, []
    _mode, _step = os.environ["STALL_AT"].split(":")

    def forward(model, *args, **kwargs):
        _steps.append("train" if model.training else "eval")
        if _steps[-1] == _mode and _steps.count(_mode) == int(_step):
            with open(os.environ["STALL_MARKER"], "w") as marker:
                marker.write(str(os.getpid()))
            time.sleep(3600)
        return _forward(model, *args, **kwargs)

    vilbert.engine.forward = forward
import train

train.main()
'''


def agreeing_runs(folder, num_train_epochs: int):
    """(flags(name, **overrides), the model config) of runs that must agree number for number, each in
    `folder`/<name>/run: the tiny root (60 train / 23 val expressions), batches of 8, a model without dropout."""
    root = make_tiny_root(Path(folder) / "data")
    model = no_dropout_model(folder)

    def flags(name, **overrides):
        return run_flags(root, Path(folder) / name, save_name="run", config_file=model,
                         num_train_epochs=num_train_epochs, batch_size=8, eval_batch_size=8, **overrides)
    return flags, model


def train_here(argv) -> None:
    """train.py in this process without the REC head's dropout, as LAUNCHER runs it in a launched one."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        init = VILBertForVLTasks.__init__
        monkeypatch.setattr(VILBertForVLTasks, "__init__", lambda self, config, dropout_prob=0.1, **heads:
                            init(self, config, dropout_prob=0.0, **heads))
        train.main(argv)


def assert_same_run(run_dir, reference) -> None:
    """The run in `run_dir` trained what the one in `reference` did: weights to 1e-5, every epoch's val accuracy
    (over the samples gathered from every rank) equal, its losses and train accuracy to 1e-5 relative."""
    weights = max_weight_difference(read_weights(Path(reference) / "last.pdparams"),
                                    read_weights(Path(run_dir) / "last.pdparams"))
    expected, got = read_metrics(reference), read_metrics(run_dir)
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    metrics = max(abs(m2[key] - m1[key]) for m1, m2 in zip(expected, got) for key in keys)
    print(f"{Path(run_dir).parent.name} vs {Path(reference).parent.name}: weights max |diff| {weights:.2e}, "
          f"metrics max |diff| {metrics:.2e}")
    assert weights < 1e-5
    assert [m["epoch"] for m in got] == [m["epoch"] for m in expected]
    for m1, m2 in zip(expected, got):
        assert m2["val_accuracy"] == m1["val_accuracy"]
        for key in keys:
            assert m2[key] == pytest.approx(m1[key], rel=1e-5), key


def write_launcher(folder) -> Path:
    path = Path(folder) / "launch_train.py"
    path.write_text(LAUNCHER.format(project=str(PROJECT)))
    return path


def launch(script, flags, log_dir, *, node=None, nproc_per_node=1, env=None) -> subprocess.Popen:
    """`python -m paddle.distributed.launch` of `script` (CPU, gloo), one thread per process; `node` = (rank,
    number of nodes, master host:port) makes it that node's launcher."""
    nodes = ["--nnodes", str(node[1]), "--master", node[2], "--rank", str(node[0])] if node else []
    return subprocess.Popen(
        [sys.executable, "-m", "paddle.distributed.launch", *nodes, "--nproc_per_node", str(nproc_per_node),
         "--log_dir", str(log_dir), str(script), *flags], cwd=PROJECT,
        env=dict(os.environ, MKL_NUM_THREADS="1", **(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def finished(process: subprocess.Popen, log_dir, timeout: float = 600) -> str:
    """Waits for a `launch`; asserts it succeeded, with its output and its workers' logs when not."""
    output = process.communicate(timeout=timeout)[0]
    worker_logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(Path(log_dir).glob("workerlog.*")))
    assert process.returncode == 0, output[-3000:] + worker_logs
    return output
