"""End to end on generated data: train.py's run directory and log, eval.py reproducing the logged accuracy
and writing its predictions, predict.py's box and picture; and per-batch padding (collate) changing no number."""

import contextlib
import errno
import fcntl
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest

import eval as eval_script
import predict
import train
from test_errors import one_line_error
from training_support import TEST_MODEL, make_tiny_root, read_metrics, read_weights, run_flags
from vilbert.config import ViLBertConfig
from vilbert.dataset import collate
from vilbert.engine import forward
from vilbert.model import VILBertForVLTasks
from vilbert.options import RunOptions, load_task_config
from vilbert.tokenization import BertTokenizer
from vilbert.tasks import get_task
from vilbert.training import build_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCH_LINE = re.compile(r"^Epoch (\d+) done! Train loss: (\d+\.\d{5}), Val accuracy: (\d+\.\d{4})$", re.M)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def run(root, tmp_path_factory):
    """One 2-epoch run of train.main: (run directory, what it printed)."""
    output_dir = tmp_path_factory.mktemp("runs")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train.main(run_flags(root, output_dir, save_name="e2e"))
    return output_dir / "e2e", printed.getvalue()


def test_run_directory_holds_config_metrics_curves_and_checkpoints(run, root):
    run_dir, _ = run
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".run.lock", "best.pdparams", "config.yaml", "curves.png", "last.pdparams", "metrics.jsonl"]
    config = load_task_config(run_dir / "config.yaml")  # the resolved options, loadable as a task config
    assert RunOptions(**config).run_dir == run_dir
    assert config["config_file"] == str(TEST_MODEL) and config["num_train_epochs"] == 2
    assert config["dataroot"] == str(root) and config["batch_size"] == 8
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [0, 1]
    for m in metrics:
        assert set(m) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"}
        assert 0 <= m["val_accuracy"] <= 1 and 0 <= m["train_accuracy"] <= 1 and m["train_loss"] > 0
    assert (run_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC

    last = paddle.load(str(run_dir / "last.pdparams"), return_numpy=True)
    best_epoch = max(metrics, key=lambda m: m["val_accuracy"])["epoch"]  # first of equals, as fit keeps it
    assert last["epoch"] == 1 and last["best"] == {"val_accuracy": metrics[best_epoch]["val_accuracy"],
                                                   "epoch": best_epoch}
    assert set(last) == {"model", "optimizer", "scaler", "epoch", "best", "options"}
    same = [np.array_equal(a, b) for a, b in zip(read_weights(run_dir / "best.pdparams").values(),
                                                read_weights(run_dir / "last.pdparams").values())]
    assert all(same) if best_epoch == 1 else not all(same)  # best.pdparams holds the best epoch's weights


def test_log_announces_random_init_optimizer_groups_and_epochs(run):
    run_dir, printed = run
    assert "Training from random initialisation (no --from_pretrained given)." in printed
    assert "batch 8 = 1 device(s) x 1 step(s) x 8; 8 steps/epoch" in printed  # 60 samples: 7 of 8, 1 of 4
    header = next(line for line in printed.splitlines() if line.startswith("group"))
    assert header.split() == ["group", "tensors", "params", "lr", "weight", "decay"]
    total = next(line for line in printed.splitlines() if line.startswith("total")).split()
    model = VILBertForVLTasks(ViLBertConfig.from_json(TEST_MODEL))
    assert int(total[1]) == len(model.parameters())
    assert int(total[2].replace(",", "")) == sum(int(np.prod(p.shape)) for p in model.parameters())
    lines = EPOCH_LINE.findall(printed)
    metrics = read_metrics(run_dir)
    assert [(int(epoch), float(loss), float(accuracy)) for epoch, loss, accuracy in lines] == [
        (m["epoch"], round(m["train_loss"], 5), round(m["val_accuracy"], 4)) for m in metrics]


def test_eval_reproduces_the_logged_best_accuracy_and_writes_predictions(run, capsys):
    run_dir, _ = run
    best = max(m["val_accuracy"] for m in read_metrics(run_dir))
    eval_script.main(["--from_pretrained", str(run_dir / "best.pdparams")])  # options from run_dir/config.yaml
    printed = capsys.readouterr().out
    row = next(line.split() for line in printed.splitlines() if line.startswith("val "))
    assert float(row[1]) == round(best, 4) and int(row[2]) == 23
    predictions = json.loads((run_dir / "best_refcoco+_val_predictions.json").read_text())
    assert len(predictions) == 23 and len({p["sent_id"] for p in predictions}) == 23
    assert sum(p["correct"] for p in predictions) / len(predictions) == best  # exactly the logged number
    for p in predictions:
        assert {"sent_id", "ref_id", "box", "score", "iou", "correct"} <= set(p)
        assert len(p["box"]) == 4 and p["correct"] == (p["iou"] > 0.5)


def test_predict_prints_a_box_and_draws_it(run, tmp_path, capsys):
    run_dir, _ = run
    options = RunOptions(**load_task_config(run_dir / "config.yaml"))
    image_id = build_dataset(options, "val", BertTokenizer(options.bert_model)).entries[0]["image_id"]
    out = tmp_path / "picture.png"
    predict.main(["--from_pretrained", str(run_dir / "best.pdparams"), "--image_id", str(image_id),
                  "--expression", "the red dog", "--out", str(out)])
    printed = capsys.readouterr().out
    box = re.search(rf'"the red dog" in image {image_id}: region \d+, box \(x1, y1, x2, y2\) = \[(.*?)\]', printed)
    assert box and len(box.group(1).split(",")) == 4
    assert f"wrote {out}" in printed and out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_padding_keeps_loss_and_choice(root, split):
    options = RunOptions(dataroot=str(root), config_file=str(TEST_MODEL), feature_cache=False)
    dataset = build_dataset(options, split, BertTokenizer(options.bert_model))
    collated = collate([dataset[i] for i in range(6)])
    # the official batch: every sample padded to max_region_num regions and max_seq_length tokens
    full = {k: v if v.ndim < 2 else np.pad(v, [(0, 0), (0, options.max_region_num - v.shape[1])] + [(0, 0)] * (v.ndim - 2))
            for k, v in collated.items() if k not in ("input_ids", "input_mask", "segment_ids", "co_attention_mask")}
    for key in ("input_ids", "input_mask", "segment_ids"):
        full[key] = np.stack([dataset[i][key] for i in range(6)])
    full["co_attention_mask"] = np.zeros((6, options.max_region_num, options.max_seq_length), np.float32)
    batch = {k: paddle.to_tensor(v) for k, v in full.items()}
    trimmed = {k: paddle.to_tensor(v) for k, v in collated.items()}
    regions, tokens = trimmed["features"].shape[1], trimmed["input_ids"].shape[1]
    assert regions < options.max_region_num and tokens < options.max_seq_length  # there was padding to cut
    assert int(batch["image_mask"].sum()) == int(trimmed["image_mask"].sum())  # ... and only padding
    paddle.seed(0)
    model = VILBertForVLTasks(ViLBertConfig.from_json(TEST_MODEL))
    model.eval()
    full_loss, full_logit = forward(model, batch, get_task("refer"))
    trim_loss, trim_logit = forward(model, trimmed, get_task("refer"))
    np.testing.assert_allclose(float(trim_loss), float(full_loss), rtol=1e-6)
    np.testing.assert_allclose(trim_logit.numpy(), full_logit[:, :regions].numpy(), rtol=1e-6, atol=1e-6)
    assert (trim_logit.squeeze(2).argmax(1).numpy() == full_logit.squeeze(2).argmax(1).numpy()).all()


def test_datasets_build_the_float16_feature_cache_on_first_use_unless_told_not_to(tmp_path):
    root = make_tiny_root(tmp_path / "data")
    tokenizer = BertTokenizer()
    off = build_dataset(RunOptions(dataroot=str(root), build_feature_cache=False), "train", tokenizer)
    assert not list(root.glob("*.cache")) and off.det_features.dtype == np.float32  # the LMDB, no build
    data = build_dataset(RunOptions(dataroot=str(root)), "train", tokenizer)
    assert sorted(path.name for path in root.glob("*.cache")) == [
        "refcoco+_gt_resnet101_faster_rcnn_genome.lmdb.cache", "refcoco+_resnet101_faster_rcnn_genome.lmdb.cache"]
    assert data.det_features.dtype == data.gt_features.dtype == np.float16


# ---- the run directory belongs to one run ------------------------------------------------------------------------
def files_of(run_dir) -> dict:
    """The run's files, name -> (size, mtime): to see that none changed."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.iterdir() if p.name != ".run.lock"}


def finished_copy(run, tmp_path):
    """A copy of the finished run in `tmp_path`/runs/e2e, and its `files_of`."""
    copy = shutil.copytree(run[0], tmp_path / "runs" / "e2e", ignore=shutil.ignore_patterns(".run.lock", "*.json"))
    return copy, files_of(copy)


@pytest.mark.parametrize("flags, expected", [
    ({"num_train_epochs": 1}, "error: {copy} holds a run (2 epoch(s) in metrics.jsonl; config.yaml, metrics.jsonl, "
                              "curves.png, last.pdparams, best.pdparams): continue it with --resume auto, give this "
                              "one another --save_name, or start over with --overwrite"),
    ({"resume": "auto", "batch_size": 4, "learning_rate": 5e-3},
     "error: --resume {copy}/last.pdparams: the run was trained with another recipe (batch_size 8 -> 4; "
     "learning_rate 0.001 -> 0.005); resume it without those flags (its config.yaml has its own) or start a new run "
     "with another --save_name"),
], ids=["a new run over a finished one", "resume with another recipe"])
def test_a_finished_run_is_kept(run, root, tmp_path, flags, expected):
    copy, before = finished_copy(run, tmp_path)
    message = one_line_error(train.main, run_flags(root, tmp_path / "runs", save_name="e2e", **flags))
    assert message == expected.format(copy=copy)
    assert files_of(copy) == before


def test_overwrite_starts_over(run, root, tmp_path, capsys):
    copy, _ = finished_copy(run, tmp_path)
    train.main(run_flags(root, tmp_path / "runs", save_name="e2e", num_train_epochs=1) + ["--overwrite"])
    assert (f"Starting over in {copy} (--overwrite): removed config.yaml, metrics.jsonl, curves.png, last.pdparams, "
            f"best.pdparams") in capsys.readouterr().out
    assert [m["epoch"] for m in read_metrics(copy)] == [0]


def test_a_run_directory_in_use_is_refused_at_once(root, tmp_path):
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    with open(run_dir / ".run.lock", "w") as lock:  # what a live run holds
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242 on gpu-node-3\n")
        lock.flush()
        started = time.time()
        message = one_line_error(train.main, run_flags(root, tmp_path / "runs", save_name="busy"))
    assert message == (f"error: {run_dir} is in use by another run (pid 4242 on gpu-node-3); wait for it to end, "
                       f"or give this one another --save_name")
    assert time.time() - started < 5 and sorted(p.name for p in run_dir.iterdir()) == [".run.lock"]


def test_temporary_files_of_killed_runs_are_removed(run, root, tmp_path, capsys):
    copy, _ = finished_copy(run, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid no process has now
    for name in (f".last.pdparams.{dead}.tmp", f".metrics.jsonl.{dead}.tmp.jsonl", f".best.pdparams.{os.getpid()}.tmp"):
        (copy / name).write_bytes(b"half-written")
    train.main(run_flags(root, tmp_path / "runs", save_name="e2e", resume="auto"))
    assert (f"Removed 2 temporary file(s) of a killed run from {copy}: .last.pdparams.{dead}.tmp, "
            f".metrics.jsonl.{dead}.tmp.jsonl") in capsys.readouterr().out
    assert sorted(p.name for p in copy.glob(".*.tmp*")) == [f".best.pdparams.{os.getpid()}.tmp"]  # a live one stays


def test_an_output_dir_that_cannot_hold_runs(root, tmp_path):
    (tmp_path / "a_file").write_text("")
    message = one_line_error(train.main, run_flags(root, tmp_path / "a_file", save_name="x"))
    assert message == (f"error: --output_dir {tmp_path / 'a_file'}: cannot write the run directory "
                       f"{tmp_path / 'a_file' / 'x'} (Not a directory); choose a writable folder")


# ---- resume continues the recipe it saved ------------------------------------------------------------------------
def test_resume_refuses_fewer_epochs_than_done_and_announces_more(run, root, tmp_path, capsys):
    copy, _ = finished_copy(run, tmp_path)
    message = one_line_error(train.main, run_flags(root, tmp_path / "runs", save_name="e2e", resume="auto",
                                                   num_train_epochs=1))
    assert message == (f"error: --num_train_epochs 1: the run in {copy} has trained 2 epochs already; give at least "
                       f"2 (it was started with 2)")
    train.main(run_flags(root, tmp_path / "runs", save_name="e2e", resume="auto", num_train_epochs=3))
    assert ("Training 3 epochs instead of the 2 the run was started with (--num_train_epochs): its learning-rate "
            "schedule now spans 3") in capsys.readouterr().out
    assert [m["epoch"] for m in read_metrics(copy)] == [0, 1, 2]
    assert load_task_config(copy / "config.yaml")["num_train_epochs"] == 3


def test_resume_takes_the_options_of_the_run_it_continues(run, root, tmp_path, capsys):
    """Only the flags that find the run: the rest (here the tiny model, batch 8, 2 epochs) come from its config.yaml."""
    copy, _ = finished_copy(run, tmp_path)
    train.main(["--output_dir", str(tmp_path / "runs"), "--save_name", "e2e", "--resume", "auto",
                "--num_train_epochs", "3"])
    out = capsys.readouterr().out
    assert "Resumed from" in out and "continuing at epoch 2" in out
    assert load_task_config(copy / "config.yaml") == {**load_task_config(run[0] / "config.yaml"),
                                                      "num_train_epochs": 3, "resume": "auto",
                                                      "output_dir": str(tmp_path / "runs")}


def test_eval_on_a_full_disk_prints_its_table_then_one_line(run, tmp_path, monkeypatch, capsys):
    copy, _ = finished_copy(run, tmp_path)
    (copy / "best_refcoco+_val_predictions.json").write_text("[] (an earlier evaluation's)")
    write_bytes = pathlib.Path.write_bytes

    def full(path, data):
        if path.name.startswith(".best_refcoco+_val_predictions.json."):  # the temp file eval.py writes first
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(path, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    message = one_line_error(eval_script.main, ["--from_pretrained", str(copy / "best.pdparams")])
    assert message == (f"error: cannot write {copy / 'best_refcoco+_val_predictions.json'}: No space left on device; "
                       f"free some space or write elsewhere (what was written before is intact: every file is written "
                       f"whole or not at all)")
    table = capsys.readouterr().out.strip().splitlines()[-2:]
    assert table[0].split()[:3] == ["split", "accuracy", "expressions"] and table[1].split()[0] == "val"
    assert (copy / "best_refcoco+_val_predictions.json").read_text() == "[] (an earlier evaluation's)"
    assert not list(copy.glob(".*.tmp*"))


def test_a_read_only_data_root_trains_with_its_caches_in_the_user_cache(root, tmp_path, monkeypatch):
    data = shutil.copytree(root, tmp_path / "data", ignore=shutil.ignore_patterns("cache", "*.cache"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(data))  # as root sees a
                        else real_access(p, mode, **kw))  # read-only mount: os.access is what both caches ask
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    train.main(run_flags(data, tmp_path / "out", num_train_epochs=1))
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written into the data root
    cached = tmp_path / "xdg" / "vilbert-paddle"
    assert len(list((cached / "features").glob("*.cache"))) == 2  # detected and ground-truth boxes
    assert len(list((cached / "entries").glob("*/*.npz"))) == 2  # train and val
