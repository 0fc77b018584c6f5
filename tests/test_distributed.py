"""Data parallel training over 2 processes (`paddle.distributed.launch`, CPU and gloo) trains what 1 process
trains at the same global batch, and so does gradient accumulation; only rank 0 writes and logs.

On CPU, `--nproc_per_node 2` starts the 2 data-parallel processes (`--devices` selects GPUs only). Dropout
differs per rank by design, so these runs have none: the model config's dropout is 0, and the REC head's
(fixed at 0.1 in the model, as official, not a config key) is switched off by a launcher script.
"""

import os
import subprocess
import sys

import paddle
import pytest

import train
from training_support import (PROJECT, max_weight_difference, make_tiny_root, no_dropout_model, read_metrics,
                              read_weights, run_flags)
from vilbert.config import ViLBertConfig
from vilbert.model import VILBertForVLTasks

# The launcher gives each rank a GPU wherever it sees one (and cannot be told not to: it reads CUDA_VISIBLE_DEVICES as
# a device list), so these CPU runs need a machine without a visible GPU; tests/test_gpu.py launches 2 GPU ranks there.
pytestmark = pytest.mark.skipif(paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0,
                                reason="paddle.distributed.launch assigns GPUs here; see tests/test_gpu.py")

LAUNCHER = '''"""train.py without the REC head's dropout."""
import sys

sys.path.insert(0, {project!r})
from vilbert.model import VILBertForVLTasks

_init = VILBertForVLTasks.__init__
VILBertForVLTasks.__init__ = lambda self, config, dropout_prob=0.1, **heads: _init(self, config, dropout_prob=0.0, **heads)
import train

train.main()
'''


def head_dropout_off(monkeypatch) -> None:
    init = VILBertForVLTasks.__init__
    monkeypatch.setattr(VILBertForVLTasks, "__init__",
                        lambda self, config, dropout_prob=0.1, **heads: init(self, config, dropout_prob=0.0, **heads))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(flags of a named run, the output folder, the model config): 1 epoch of 60 expressions, batches of 8."""
    folder = tmp_path_factory.mktemp("distributed")
    root = make_tiny_root(folder / "data")
    model = no_dropout_model(folder)

    def flags(name, **overrides):
        return run_flags(root, folder / name, save_name="run", config_file=model, num_train_epochs=1,
                         batch_size=8, eval_batch_size=8, **overrides)
    return flags, folder, model


@pytest.fixture(scope="module")
def one_process(setup):
    flags, folder, _ = setup
    with pytest.MonkeyPatch.context() as monkeypatch:
        head_dropout_off(monkeypatch)
        train.main(flags("one"))
    return folder / "one" / "run"


@pytest.fixture(scope="module")
def two_processes(setup):
    """The same run launched as 2 processes: (run directory, launch log directory)."""
    flags, folder, _ = setup
    launcher = folder / "launch_train.py"
    launcher.write_text(LAUNCHER.format(project=str(PROJECT)))
    logs = folder / "launch_logs"
    env = dict(os.environ, MKL_NUM_THREADS="1")  # one thread per process on a 2-core machine
    done = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                           "--log_dir", str(logs), str(launcher), *flags("two")],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    worker_logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("workerlog.*")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + worker_logs
    return folder / "two" / "run", logs


def test_two_processes_train_what_one_process_trains(one_process, two_processes):
    one, (two, _) = one_process, two_processes
    assert max_weight_difference(read_weights(one / "last.pdparams"), read_weights(two / "last.pdparams")) < 1e-5
    [m1], [m2] = read_metrics(one), read_metrics(two)
    assert m2["val_accuracy"] == m1["val_accuracy"]  # the 23 val expressions gathered from both ranks
    for key in ("train_loss", "train_accuracy", "val_loss"):  # train numbers summed over both ranks
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key


def test_the_compared_runs_did_train(setup, one_process):
    paddle.seed(0)  # fit's initialisation (seed 0)
    initial = VILBertForVLTasks(ViLBertConfig.from_json(setup[2])).state_dict()
    initial = {name: value.numpy().astype("float64") for name, value in initial.items()}
    assert max_weight_difference(initial, read_weights(one_process / "last.pdparams")) > 1e-3


def test_only_rank_0_writes_and_logs(two_processes):
    run_dir, logs = two_processes
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run"]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "best.pdparams", "config.yaml", "curves.png", "last.pdparams", "metrics.jsonl"]
    assert len(read_metrics(run_dir)) == 1
    rank0, rank1 = (logs / "workerlog.0").read_text(), (logs / "workerlog.1").read_text()
    assert "Device: cpu x 2; 60 train / 23 val expressions; batch 8 = 2 device(s) x 1 step(s) x 4; " \
           "8 steps/epoch" in rank0
    assert "Epoch 0 done! Train loss:" in rank0 and "Best val accuracy" in rank0
    for line in ("Device:", "Epoch 0 done!", "group  tensors", "Training from random"):
        assert line not in rank1


@pytest.mark.parametrize("steps", [2, 4])
def test_gradient_accumulation_trains_what_one_big_batch_trains(setup, one_process, steps, monkeypatch, capsys):
    flags, folder, _ = setup
    head_dropout_off(monkeypatch)
    train.main(flags(f"accumulate{steps}", gradient_accumulation_steps=steps))
    assert f"batch 8 = 1 device(s) x {steps} step(s) x {8 // steps}; 8 steps/epoch" in capsys.readouterr().out
    run_dir = folder / f"accumulate{steps}" / "run"
    assert max_weight_difference(read_weights(one_process / "last.pdparams"),
                                 read_weights(run_dir / "last.pdparams")) < 1e-5
    [m1], [m2] = read_metrics(one_process), read_metrics(run_dir)
    assert m2["val_accuracy"] == m1["val_accuracy"] and m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)
