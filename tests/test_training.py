"""End to end on generated data: train.py's run directory and log, eval.py reproducing the logged accuracy
and writing its predictions, predict.py's box and picture; and per-batch padding (collate) changing no number."""

import contextlib
import io
import json
import re

import numpy as np
import paddle
import pytest

import eval as eval_script
import predict
import train
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
        "best.pdparams", "config.yaml", "curves.png", "last.pdparams", "metrics.jsonl"]
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
