"""Every bad input ends train.py / eval.py / predict.py with one clear message that says what to do."""

import errno
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys

import lmdb
import numpy as np
import paddle
import pytest

import eval as eval_script
import predict
import train
import vilbert.checkpoint
import vilbert.engine
import vilbert.tasks.refer
import vilbert.training
from training_support import PROJECT, TEST_MODEL, make_tiny_root, read_metrics, run_flags
from vilbert.checkpoint import save_checkpoint
from vilbert.config import ViLBertConfig
from vilbert.demo_data import DETECTED_LMDB, make_demo_dataset
from vilbert.model import VILBertForVLTasks
from vilbert.options import OptionsError, RunOptions
from vilbert.training import train_loader

DOWNLOAD = "bash download_dataset.sh"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def broken_root(root, tmp_path):
    """A copy of the data root to break."""
    return shutil.copytree(root, tmp_path / "data", ignore=shutil.ignore_patterns("cache"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random weights of the tiny model, as eval.py and predict.py load them."""
    paddle.seed(0)
    model = VILBertForVLTasks(ViLBertConfig.from_json(TEST_MODEL))
    return save_checkpoint(model.state_dict(), tmp_path_factory.mktemp("ckpt") / "weights.pdparams")


def error_of(main, argv) -> str:
    """The message main(argv) exits with (what the user sees instead of a traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    return message


def one_line_error(main, argv) -> str:
    message = error_of(main, argv)
    assert "\n" not in message, message
    return message


# ---- data -------------------------------------------------------------------------------------------------
def test_missing_data_root(tmp_path):
    message = one_line_error(train.main, run_flags(tmp_path / "no_data", tmp_path / "out"))
    assert "not found" in message and DOWNLOAD in message


def test_missing_refs_file(broken_root, tmp_path):
    (broken_root / "refcoco+" / "refs(unc).p").unlink()
    message = one_line_error(train.main, run_flags(broken_root, tmp_path / "out"))
    assert "refs(unc).p not found" in message and DOWNLOAD in message


def test_demo_flag_with_a_root_that_is_not_the_demo_one(tmp_path):
    message = one_line_error(train.main, ["--demo", "--dataroot", str(tmp_path / "nothing")])
    assert "has no refcoco+/refs(unc).p" in message and f"{DOWNLOAD} --check" in message


def test_demo_dataset_missing_from_the_given_root(root, tmp_path):
    message = one_line_error(train.main, ["--demo", "--dataroot", str(root), "--dataset", "refcocog"])
    assert f"--dataroot {root} has no refcocog/refs(umd).p" in message
    assert f"{DOWNLOAD} --check --dataset refcocog --dataroot {root}" in message


@pytest.mark.parametrize("name, damage, problem", [
    ("refs(unc).p", lambda data: data[:len(data) // 2], "is truncated"),
    ("refs(unc).p", lambda data: b"<!DOCTYPE html><html>Sign in</html>", "is an HTML page, not a pickle"),
    ("instances.json", lambda data: data[:len(data) // 2], "is truncated"),
    ("instances.json", lambda data: b"\x89PNG\r\n", "is not JSON"),
])
def test_damaged_annotations(broken_root, tmp_path, name, damage, problem):
    path = broken_root / "refcoco+" / name
    path.write_bytes(damage(path.read_bytes()))
    message = one_line_error(train.main, run_flags(broken_root, tmp_path / "out"))
    assert message.startswith(f"error: {path} {problem}") and f"{DOWNLOAD} --dataset refcoco+" in message


def test_unknown_split_names_the_splits_that_exist(root, checkpoint, tmp_path):
    flags = run_flags(root, tmp_path / "out") + ["--from_pretrained", str(checkpoint)]
    message = one_line_error(eval_script.main, flags + ["--split", "testC"])
    assert message == "error: refcoco+ (unc) has no split 'testC'; its splits are train, val, testA, testB"
    message = one_line_error(eval_script.main, flags + ["--dataset", "refcocog", "--split", "testA"])
    assert message == "error: refcocog (umd) has no split 'testA'; its splits are train, val, test"


def test_split_without_expressions_names_the_splits_in_the_file(checkpoint, tmp_path):
    no_tests = make_demo_dataset(tmp_path / "data", seed=0, num_train_images=4, num_val_images=2, num_test_images=0)
    flags = run_flags(no_tests, tmp_path / "out") + ["--from_pretrained", str(checkpoint), "--split", "testA"]
    message = one_line_error(eval_script.main, flags)
    assert message == (f"error: split 'testA' of refcoco+ (unc) in {no_tests} holds no referring expressions; "
                       "the splits there are train, val")


def test_garbage_lmdb(broken_root, tmp_path):
    (broken_root / DETECTED_LMDB / "data.mdb").write_bytes(np.random.default_rng(0).bytes(200_000))
    message = one_line_error(train.main, run_flags(broken_root, tmp_path / "out"))
    assert "cannot be opened as an LMDB" in message and DOWNLOAD in message


def rewrite_records(lmdb_dir, change) -> None:
    """Apply change(txn, key) to every image record of an LMDB folder (the b'keys' list stays)."""
    env = lmdb.open(str(lmdb_dir))
    with env.begin(write=True) as txn:
        for key in pickle.loads(txn.get(b"keys")):
            change(txn, key.encode() if isinstance(key, str) else key)
    env.close()


def test_lmdb_missing_its_records(broken_root, tmp_path):
    rewrite_records(broken_root / DETECTED_LMDB, lambda txn, key: txn.delete(key))
    message = one_line_error(train.main, run_flags(broken_root, tmp_path / "out"))
    assert "listed in b'keys' but missing" in message and "download it again" in message


def test_lmdb_with_corrupt_records(broken_root, tmp_path):
    rewrite_records(broken_root / DETECTED_LMDB, lambda txn, key: txn.put(key, b"\x80\x02garbage"))
    message = one_line_error(train.main, run_flags(broken_root, tmp_path / "out"))
    assert "is corrupt: cannot unpickle it" in message and str(broken_root / DETECTED_LMDB) in message


def test_truncated_lmdb(broken_root, tmp_path):
    data = broken_root / DETECTED_LMDB / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    # a subprocess: the failure to guard against is a signal that would take pytest down with it
    done = subprocess.run([sys.executable, "train.py", *run_flags(broken_root, tmp_path / "out")], cwd=PROJECT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, f"exit code {done.returncode}"
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "truncated" in last and "download" in last


# ---- predict.py arguments -----------------------------------------------------------------------------------
def predict_args(root, checkpoint, image_id, expression):
    return ["--task_config", str(PROJECT / "config" / "demo.yml"), "--dataroot", str(root), "--config_file",
            str(TEST_MODEL), "--from_pretrained", str(checkpoint), "--image_id", str(image_id),
            "--expression", expression, "--device", "cpu"]


def test_predict_image_missing_from_the_features(root, checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(predict_args(root, checkpoint, 999999, "red dog"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--image_id 999999 is not in the features" in error and "give one of its" in error


def test_predict_expression_without_tokens(root, checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(predict_args(root, checkpoint, 999999, "   "))
    assert exit_info.value.code == 2
    assert "--expression '   ' has no tokens; give some words" in capsys.readouterr().err


# ---- configs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, expected", [
    ({"bach_size": 8}, "unknown key 'bach_size'"),
    ({"batch_size": "8"}, "batch_size='8' should be int"),
])
def test_bad_task_config(root, tmp_path, values, expected):
    task = tmp_path / "task.yml"
    task.write_text(json.dumps(values))  # JSON is YAML
    message = one_line_error(train.main, run_flags(root, tmp_path / "out", task_config=task))
    assert str(task) in message and expected in message


def test_model_config_with_unknown_key(root, tmp_path):
    config = json.loads(TEST_MODEL.read_text()) | {"hiden_size": 16}
    (tmp_path / "model.json").write_text(json.dumps(config))
    message = one_line_error(train.main, run_flags(root, tmp_path / "out", config_file=tmp_path / "model.json"))
    assert "model.json" in message and "unknown key 'hiden_size'" in message


def test_checkpoint_that_does_not_fit_is_reported_at_once(root, checkpoint, tmp_path):
    state = paddle.load(str(checkpoint), return_numpy=True)
    del state["bert.v_pooler.dense.bias"]
    state["bert.extra.weight"] = np.zeros((2, 2), np.float32)
    state["vision_logit.weight"] = np.zeros((16, 2), np.float32)
    bad = save_checkpoint(state, tmp_path / "bad.pdparams")
    message = error_of(eval_script.main, run_flags(root, tmp_path / "out", from_pretrained=bad))
    assert "does not fit the model: 3 problem(s)" in message
    assert "missing from the checkpoint: bert.v_pooler.dense.bias [16]" in message
    assert "unexpected in the checkpoint: bert.extra.weight [2, 2]" in message
    assert "shape mismatch: vision_logit.weight is [16, 2] in the checkpoint, [16, 1] in the model" in message
    assert "--config_file" in message


def test_resume_from_a_missing_checkpoint(root, tmp_path):
    message = one_line_error(train.main, run_flags(root, tmp_path / "out", resume=tmp_path / "last.pdparams"))
    assert "no such checkpoint" in message and "--resume auto" in message


# ---- during training ----------------------------------------------------------------------------------------
def test_nan_loss_stops_with_its_place_and_keeps_the_last_checkpoint(root, tmp_path, monkeypatch):
    epoch_now = []
    real_epoch, real_loss = vilbert.training.train_one_epoch, vilbert.tasks.refer.rec_loss

    def train_one_epoch(*args, epoch, **kwargs):
        epoch_now.append(epoch)
        return real_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(vilbert.training, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(vilbert.tasks.refer, "rec_loss",
                        lambda logit, target: real_loss(logit, target) * (float("nan") if epoch_now[-1] else 1.0))
    message = one_line_error(train.main, run_flags(root, tmp_path / "out"))
    assert "training loss is nan at epoch 1, step 0 (sent_ids [" in message and "--learning_rate" in message
    run_dir = tmp_path / "out" / "run"
    assert paddle.load(str(run_dir / "last.pdparams"), return_numpy=True)["epoch"] == 0
    assert [m["epoch"] for m in read_metrics(run_dir)] == [0]


def out_of_memory(*args, **kwargs):
    raise MemoryError("(ResourceExhausted) Fail to alloc memory of 4000000000000 size, error code is 12.\n"
                      "  [Hint: Expected error == 0, but received error:12 != 0:0.]")


def test_out_of_memory_in_training_suggests_accumulation(root, tmp_path, monkeypatch):
    monkeypatch.setattr(vilbert.engine, "forward", out_of_memory)
    message = one_line_error(train.main, run_flags(root, tmp_path / "out", batch_size=8))
    assert message.startswith("error: out of memory ((ResourceExhausted) Fail to alloc")
    assert "holds 8 sample(s) per device: raise --gradient_accumulation_steps (now 1)" in message


def test_out_of_memory_in_evaluation_suggests_a_smaller_eval_batch(root, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(eval_script, "evaluate", out_of_memory)
    message = one_line_error(eval_script.main, run_flags(root, tmp_path / "out", from_pretrained=checkpoint))
    assert "out of memory" in message and "lower --eval_batch_size (now 16)" in message


# ---- batch sizes --------------------------------------------------------------------------------------------
def test_batch_size_not_divisible_by_accumulation(root, tmp_path):
    message = one_line_error(train.main, run_flags(root, tmp_path / "out", batch_size=6,
                                                   gradient_accumulation_steps=4))
    assert "batch_size=6 is not a multiple of gradient_accumulation_steps=4" in message


def test_batch_size_not_divisible_by_devices(monkeypatch):
    monkeypatch.setattr(vilbert.training.dist, "get_world_size", lambda: 4)
    with pytest.raises(OptionsError, match=r"--batch_size 6 cannot be split over 4 device\(s\) x 1 accumulation"):
        train_loader(list(range(10)), RunOptions(batch_size=6))


# ---- distributed runs -------------------------------------------------------------------------------------------
GLOO_RESET = RuntimeError("[/paddle/third_party/gloo/gloo/transport/tcp/pair.cc:576] Read error [10.0.0.2]:41532: "
                          "Connection reset by peer\n\n  more lines")


def raising(error):
    @vilbert.training.exit_on_user_error()
    def main():
        raise error
    return main


def test_a_collective_that_lost_its_peer_is_one_line(monkeypatch):
    """The real case (a killed node) is tests/test_multinode.py; here the three ways an error can go."""
    monkeypatch.setattr(vilbert.training.dist, "get_world_size", lambda: 16)
    monkeypatch.setattr(vilbert.training.dist, "get_rank", lambda: 3)
    with pytest.raises(SystemExit) as stopped:
        raising(GLOO_RESET)()
    assert str(stopped.value) == (
        "error: rank 3 of 16 lost contact with another rank ([/paddle/third_party/gloo/gloo/transport/tcp/pair.cc:576]"
        " Read error [10.0.0.2]:41532: Connection reset by peer): a node or process stopped, or the network failed. "
        "Start every node's launcher again with the same command (train.py: add --resume auto to continue from the "
        "last checkpoint)")
    with pytest.raises(SystemExit, match=r"^error: rank 3 of 16 lost contact .*\(ExternalError: Nccl error"):
        raising(OSError("ExternalError: Nccl error, remote process exited or there was a network error"))()
    with pytest.raises(RuntimeError, match="shapes do not match"):  # any other error keeps its traceback
        raising(RuntimeError("shapes do not match"))()


def test_one_process_keeps_the_traceback_of_a_backend_error():
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        raising(GLOO_RESET)()


def test_ranks_of_each_start_are_named_as_spans():
    assert [vilbert.training._ranks(r) for r in ([3], [8, 9, 10, 11], [1, 4])] == ["rank 3", "ranks 8-11", "ranks 1,4"]


def test_an_unreachable_s3_data_root_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("boto3")
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                        "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    message = one_line_error(train.main, ["--demo", "--dataroot", "s3://bucket/demo", "--output_dir",
                                          str(tmp_path / "out")])
    assert message.startswith(f"error: s3://bucket/demo: the S3 endpoint http://127.0.0.1:{port} did not answer in ")


def test_an_image_missing_from_the_features_and_their_key_list(broken_root, tmp_path):
    path = str(broken_root / DETECTED_LMDB)
    env = lmdb.open(path, map_size=1 << 30)
    with env.begin(write=True) as txn:  # an LMDB of other images: the record and its entry in b'keys' are gone
        keys = pickle.loads(txn.get(b"keys"))
        txn.delete(keys[0])
        txn.put(b"keys", pickle.dumps(keys[1:], protocol=2))
    env.close()
    message = one_line_error(train.main, run_flags(broken_root, tmp_path / "out"))
    assert re.match(r"error: 1 of the \d+ images of split 'train' are missing from the detected-box features .* "
                    r"\(image ids \d+\); do the features belong to refcoco\+, and did their download finish\?$",
                    message), message


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_last_one(root, tmp_path, monkeypatch):
    real_save = vilbert.checkpoint.paddle.save

    def save(obj, path):
        if isinstance(obj, dict) and obj.get("epoch") == 1:  # epoch 1's resumable checkpoint
            with open(path, "wb") as f:
                f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(vilbert.checkpoint.paddle, "save", save)
    message = one_line_error(train.main, run_flags(root, tmp_path / "out"))
    last = tmp_path / "out" / "run" / "last.pdparams"
    assert message == (f"error: cannot write {last}: No space left on device; free some space or write elsewhere "
                       f"(what was written before is intact: every file is written whole or not at all)")
    assert vilbert.checkpoint.read_training_state(last)["epoch"] == 0  # epoch 0's, whole
    assert not list(last.parent.glob(".*.tmp*"))
