"""A run killed at any point resumes with `--resume auto` to exactly the run that was never interrupted:
same weights, optimizer state, best checkpoint and metrics. Dropout is on: it is re-seeded every epoch."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import paddle
import pytest

import train
import vilbert.checkpoint
import vilbert.training
from training_support import PROJECT, make_tiny_root, read_metrics, read_weights, run_flags

EPOCHS = 2
# progress of epoch 1 with at least one of its steps done, and not all of them: a plain line when stderr is not a
# terminal ("Epoch 1: 2/8 steps, ..."), tqdm's bar when it is
MID_EPOCH_1 = re.compile(r"Epoch 1:\s+(?:\d+%\|[^|\r\n]*\|\s*)?(\d+)/(\d+)")


class Killed(BaseException):
    """Stands for the process dying at that point (not an Exception: nothing may catch it)."""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


def flags(root, output_dir) -> list:
    return run_flags(root, output_dir, num_train_epochs=EPOCHS)


@pytest.fixture(scope="module")
def uninterrupted(root, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    train.main(flags(root, output_dir))
    return output_dir / "run"


def flatten(tree, prefix="") -> dict:
    """Nested dicts/lists of a checkpoint -> {path: leaf}, to compare two checkpoints leaf by leaf."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in flatten(value, f"{prefix}/{i}").items()}
    return {prefix: tree}


def assert_same_run(run_dir, reference) -> None:
    """The same metrics (but wall time), last.pdparams (model, optimizer, epoch, best) and best.pdparams."""
    metrics, expected = read_metrics(run_dir), read_metrics(reference)
    for m in metrics + expected:
        del m["seconds"]
    assert metrics == expected
    last, expected_last = (flatten(paddle.load(str(d / "last.pdparams"), return_numpy=True))
                           for d in (run_dir, reference))
    for key in ("/options/output_dir", "/options/resume"):  # where the run was written, and how it was started
        del last[key], expected_last[key]
    assert last.keys() == expected_last.keys()
    different = [key for key in last if not np.array_equal(last[key], expected_last[key])]
    assert not different, different[:10]
    best, expected_best = read_weights(run_dir / "best.pdparams"), read_weights(reference / "best.pdparams")
    assert all(np.array_equal(best[name], expected_best[name]) for name in expected_best)


def start_and_kill_mid_epoch_1(argv) -> str:
    """Run train.py in a subprocess, SIGKILL it once epoch 1 is under way; returns what it wrote to stderr."""
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=PROJECT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: os.read(process.stderr.fileno(), 4096),
                                                                b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    try:
        while not any(0 < int(done) < int(total) for done, total in MID_EPOCH_1.findall(
                b"".join(stderr).decode(errors="replace"))):
            assert process.poll() is None, b"".join(stderr).decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "epoch 1 never started"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        reader.join()
    return b"".join(stderr).decode(errors="replace")


def test_sigkill_mid_epoch_then_resume(root, tmp_path, uninterrupted, capsys):
    argv = flags(root, tmp_path)
    start_and_kill_mid_epoch_1(argv)
    run_dir = tmp_path / "run"
    # killed within epoch 1: epoch 0 is the last complete one on disk
    assert paddle.load(str(run_dir / "last.pdparams"), return_numpy=True)["epoch"] == 0
    assert [m["epoch"] for m in read_metrics(run_dir)] == [0]
    train.main(argv + ["--resume", "auto"])
    assert f"Resumed from {run_dir / 'last.pdparams'}: continuing at epoch 1" in capsys.readouterr().out
    assert_same_run(run_dir, uninterrupted)


def fail_at_epoch_1(monkeypatch, target: str) -> None:
    """Make the run die while writing `target` at the end of epoch 1."""
    if target == "last.pdparams":  # a failed write of the checkpoint itself: half a file, then the error
        real_save, saves = paddle.save, []

        def save(obj, path):
            if ".last.pdparams." in path:
                saves.append(path)
                if len(saves) == 2:
                    real_save(obj, path)
                    os.truncate(path, os.path.getsize(path) // 2)
                    raise OSError(28, "No space left on device")
            real_save(obj, path)

        monkeypatch.setattr(vilbert.checkpoint.paddle, "save", save)
    elif target == "metrics.jsonl":
        real_write, writes = vilbert.training.atomic_write, []

        def write(path, text):
            if path.name == "metrics.jsonl":
                writes.append(path)
                if len(writes) == 2:
                    raise Killed
            real_write(path, text)

        monkeypatch.setattr(vilbert.training, "atomic_write", write)
    else:
        real_plot, plots = vilbert.training.plot_curves, []

        def plot(history, path, task):
            plots.append(path)
            if len(plots) == 2:
                raise Killed
            real_plot(history, path, task)

        monkeypatch.setattr(vilbert.training, "plot_curves", plot)


@pytest.mark.parametrize("target", ["metrics.jsonl", "curves.png", "last.pdparams"])
def test_dying_while_writing_an_epoch_then_resume(root, tmp_path, uninterrupted, monkeypatch, target):
    argv = flags(root, tmp_path)
    with monkeypatch.context() as patch:
        fail_at_epoch_1(patch, target)
        with pytest.raises((Killed, SystemExit)):  # a full disk: one line (SystemExit)
            train.main(argv)
    run_dir = tmp_path / "run"
    # last.pdparams is written last: the previous one is intact, loadable, and nothing half-written is left
    assert paddle.load(str(run_dir / "last.pdparams"), return_numpy=True)["epoch"] == 0
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]
    train.main(argv + ["--resume", "auto"])
    assert_same_run(run_dir, uninterrupted)


def test_resume_auto_without_a_run_starts_fresh(root, tmp_path, uninterrupted, capsys):
    train.main(flags(root, tmp_path) + ["--resume", "auto"])
    assert "Resumed" not in capsys.readouterr().out
    assert_same_run(tmp_path / "run", uninterrupted)


def test_fp16_loss_scale_is_saved_and_resumed(root, tmp_path, scaler_on_gpu, monkeypatch):
    """The GradScaler's state (scale, counts of good and skipped steps) is in last.pdparams and --resume restores
    it: a run that dies in epoch 1 and is resumed ends as the uninterrupted one, scaler included."""
    argv = flags(root, tmp_path / "whole") + ["--amp", "fp16"]
    train.main(argv)
    scaler = paddle.load(str(tmp_path / "whole" / "run" / "last.pdparams"), return_numpy=True)["scaler"]
    assert scaler["incr_count"] == 16 and np.asarray(scaler["scale"]).item() == 2.0 ** 15  # 2 epochs of 8 steps
    argv = flags(root, tmp_path / "parts") + ["--amp", "fp16"]
    with monkeypatch.context() as patch:
        fail_at_epoch_1(patch, "metrics.jsonl")
        with pytest.raises(Killed):
            train.main(argv)
    assert paddle.load(str(tmp_path / "parts" / "run" / "last.pdparams"), return_numpy=True)["scaler"]["incr_count"] == 8
    train.main(argv + ["--resume", "auto"])
    assert_same_run(tmp_path / "parts" / "run", tmp_path / "whole" / "run")


class Payload:
    """Pickles as a call of os.system that would create `marker`: a last.pdparams planted in a shared bucket."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_a_checkpoint_that_would_run_code(root, tmp_path, uninterrupted):
    marker = tmp_path / "payload_ran"
    state = paddle.load(str(uninterrupted / "last.pdparams"))
    state["best"] = {"val_accuracy": Payload(marker), "epoch": 0}  # one value among real weights
    evil = tmp_path / "evil" / "last.pdparams"
    evil.parent.mkdir()
    paddle.save(state, str(evil))
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags(root, tmp_path / "out") + ["--resume", str(evil)])
    message = str(exit_info.value)
    assert message.startswith(f"error: {evil}: refusing to unpickle global posix.system") and "\n" not in message
    assert not marker.exists()
