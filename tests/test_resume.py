"""A run killed at any point resumes with `--resume auto` to exactly the run that was never interrupted:
same weights, optimizer state, best checkpoint and metrics, also from a checkpoint saved within an epoch (on
SIGINT, SIGTERM or --save_every_minutes). Dropout is on: it is seeded at every step."""

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
# progress of an epoch with at least one of its steps done, and not all of them: a plain line when stderr is not a
# terminal ("Epoch 1: 2/8 steps, ..."), tqdm's bar when it is
PROGRESS = r"Epoch {epoch}:\s+(?:\d+%\|[^|\r\n]*\|\s*)?(\d+)/(\d+)"


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
    # where the run was written, how it was started and how often it saved
    for key in ("/options/output_dir", "/options/resume", "/options/save_every_minutes"):
        del last[key], expected_last[key]
    assert last.keys() == expected_last.keys()
    different = [key for key in last if not np.array_equal(last[key], expected_last[key])]
    assert not different, different[:10]
    best, expected_best = read_weights(run_dir / "best.pdparams"), read_weights(reference / "best.pdparams")
    assert all(np.array_equal(best[name], expected_best[name]) for name in expected_best)


def start_and_signal_mid_epoch(argv, signum=signal.SIGKILL, epoch: int = 1) -> "tuple[int, str]":
    """Run train.py in a subprocess, send it `signum` once `epoch` is under way; returns its exit status and what
    it wrote to stderr."""
    mid_epoch = re.compile(PROGRESS.format(epoch=epoch))
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=PROJECT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: os.read(process.stderr.fileno(), 4096),
                                                                b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    try:
        while not any(0 < int(done) < int(total) for done, total in mid_epoch.findall(
                b"".join(stderr).decode(errors="replace"))):
            assert process.poll() is None, b"".join(stderr).decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"epoch {epoch} never started"
            time.sleep(0.02)
    finally:
        process.send_signal(signum)
        try:
            process.wait(timeout=120)
        finally:
            process.kill()
            reader.join()
    return process.returncode, b"".join(stderr).decode(errors="replace")


def last_checkpoint(run_dir) -> dict:
    return paddle.load(str(run_dir / "last.pdparams"), return_numpy=True)


def test_sigkill_mid_epoch_then_resume(root, tmp_path, uninterrupted, capsys):
    argv = flags(root, tmp_path)
    start_and_signal_mid_epoch(argv)
    run_dir = tmp_path / "run"
    # killed within epoch 1 with no save since epoch 0's (the default saves every 30 minutes)
    assert last_checkpoint(run_dir)["epoch"] == 0 and "within_epoch" not in last_checkpoint(run_dir)
    assert [m["epoch"] for m in read_metrics(run_dir)] == [0]
    train.main(argv + ["--resume", "auto"])
    assert f"Resumed from {run_dir / 'last.pdparams'}: continuing at epoch 1\n" in capsys.readouterr().out
    assert_same_run(run_dir, uninterrupted)


def test_saves_within_epochs_bound_what_sigkill_loses(root, tmp_path, uninterrupted, capsys):
    argv = flags(root, tmp_path) + ["--save_every_minutes", "1e-9"]  # after every update
    start_and_signal_mid_epoch(argv)
    run_dir = tmp_path / "run"
    state = last_checkpoint(run_dir)
    updates = state["within_epoch"]["updates"]
    assert state["epoch"] == 0 and 1 <= updates <= 8  # the progress line said epoch 1 was under way
    train.main(argv + ["--resume", "auto"])
    assert f"continuing at epoch 1, update {updates} of 8" in capsys.readouterr().out
    assert_same_run(run_dir, uninterrupted)


def signal_at_step(monkeypatch, signals, step: int) -> None:
    """Deliver `signals` to this process during its `step`-th training step (1-based, over the whole run)."""
    forward, steps = vilbert.engine.forward, []

    def hooked(model, *args, **kwargs):
        if model.training:
            steps.append(model)
            if len(steps) == step:
                for signum in signals:
                    os.kill(os.getpid(), signum)
        return forward(model, *args, **kwargs)

    monkeypatch.setattr(vilbert.engine, "forward", hooked)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_update_in_progress_and_resume_is_exact(root, tmp_path, uninterrupted, monkeypatch,
                                                                    capsys, signum):
    argv, run_dir, handlers = flags(root, tmp_path), tmp_path / "run", signal.getsignal(signum)
    with monkeypatch.context() as patch:
        signal_at_step(patch, [signum], 8 + 3)  # epoch 1's third step (8 per epoch)
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
    assert exit_info.value.code == 128 + signum  # as a shell reports a process the signal ended
    assert signal.getsignal(signum) == handlers  # the run's handlers are gone with it
    out, err = capsys.readouterr()
    name = signal.Signals(signum).name
    assert f"{name} received: saving a checkpoint after this step, then stopping" in out
    assert err.splitlines()[-1] == (f"stopped by {name} at epoch 1, update 3 of 8: {run_dir / 'last.pdparams'} "
                                    f"holds it; continue with --resume auto")
    state = last_checkpoint(run_dir)
    assert state["epoch"] == 0 and state["within_epoch"]["updates"] == 3
    assert [m["epoch"] for m in read_metrics(run_dir)] == [0]  # epoch 1 is written when it ends
    train.main(argv + ["--resume", "auto"])
    assert "continuing at epoch 1, update 3 of 8" in capsys.readouterr().out
    assert_same_run(run_dir, uninterrupted)


def test_a_signal_during_the_evaluation_stops_after_saving_the_epoch(root, tmp_path, uninterrupted, monkeypatch,
                                                                     capsys):
    argv, run_dir = flags(root, tmp_path), tmp_path / "run"
    forward = vilbert.engine.forward

    def hooked(model, *args, **kwargs):
        if not model.training:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(model, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(vilbert.engine, "forward", hooked)
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines()[-1].startswith("stopped by SIGTERM after epoch 0: ")
    assert "within_epoch" not in last_checkpoint(run_dir) and [m["epoch"] for m in read_metrics(run_dir)] == [0]
    train.main(argv + ["--resume", "auto"])
    assert_same_run(run_dir, uninterrupted)


def test_ctrl_c_twice_stops_at_once_and_keeps_the_last_save(root, tmp_path, uninterrupted, monkeypatch, capsys):
    argv, run_dir = flags(root, tmp_path), tmp_path / "run"
    with monkeypatch.context() as patch:
        signal_at_step(patch, [signal.SIGINT, signal.SIGINT], 8 + 3)
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1].startswith("interrupted (Ctrl-C): stopped at once; what was "
                                                               "saved before is intact")
    assert last_checkpoint(run_dir)["epoch"] == 0 and "within_epoch" not in last_checkpoint(run_dir)
    train.main(argv + ["--resume", "auto"])
    assert_same_run(run_dir, uninterrupted)


def test_sigterm_to_the_process_is_one_line_and_a_resumable_stop(root, tmp_path, uninterrupted):
    """The real signal from outside, as a scheduler sends it: no traceback, no Paddle FatalError. Sent in epoch 0,
    it lands before the run's end wherever the step it reaches is."""
    argv = flags(root, tmp_path)
    code, stderr = start_and_signal_mid_epoch(argv, signal.SIGTERM, epoch=0)
    assert code == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "FatalError" not in stderr, stderr[-3000:]
    assert re.fullmatch(r"stopped by SIGTERM (at epoch [01], update [1-8] of 8|after epoch 0): .* holds it; continue "
                        r"with --resume auto", stderr.splitlines()[-1]), stderr[-3000:]
    train.main(argv + ["--resume", "auto"])
    assert_same_run(tmp_path / "run", uninterrupted)


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
    assert last_checkpoint(run_dir)["epoch"] == 0
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
