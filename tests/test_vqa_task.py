"""VQA end to end on the generated VQA root (`vqa_root`): train.py, eval.py (soft score, official accuracy, the
EvalAI results file), predict.py, tools/dump_samples.py, and one line for each mistake a user can make."""

import json
import pickle
import shutil

import numpy as np
import pytest

import eval as eval_script
import predict
import train
from test_errors import one_line_error
from tools import dump_samples
from training_support import PROJECT, TEST_MODEL, read_metrics
from vilbert import vqa_data
from vilbert.tokenization import BertTokenizer
from vilbert.training import build_dataset
from vilbert.options import RunOptions, load_task_config

DEMO_VQA = PROJECT / "config" / "demo_vqa.yml"


def vqa_flags(root, output_dir, **overrides) -> list:
    flags = {"task_config": DEMO_VQA, "dataroot": root, "output_dir": output_dir, "save_name": "run",
             "config_file": TEST_MODEL, "num_train_epochs": 2, "batch_size": 16, "eval_batch_size": 64,
             "num_workers": 0, "device": "cpu", **overrides}
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def options_for(root, **overrides) -> RunOptions:
    return RunOptions(**{**load_task_config(DEMO_VQA), "dataroot": str(root), "config_file": str(TEST_MODEL),
                         **overrides})


@pytest.fixture(scope="module")
def run(vqa_root, tmp_path_factory):
    """A 2-epoch run of the tiny model: its run directory."""
    out = tmp_path_factory.mktemp("vqa_run")
    train.main(vqa_flags(vqa_root, out))
    return out / "run"


def test_training_reports_the_soft_score(run, capsys):
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert set(metrics[0]) == {"epoch", "train_loss", "train_score", "val_loss", "val_score", "lr", "seconds"}
    assert all(0 <= m["val_score"] <= 1 and m["train_loss"] > 0 for m in metrics)
    assert (run / "best.pdparams").is_file() and (run / "curves.png").is_file()


def test_eval_writes_the_evalai_results(run, vqa_root, capsys):
    capsys.readouterr()
    eval_script.main(["--from_pretrained", str(run / "best.pdparams"), "--split", "minval"])
    out = capsys.readouterr().out
    minval = vqa_data.load_split(vqa_root, "minval", num_labels=10 ** 6)
    header, row = out.strip().splitlines()[-2:]
    assert header.split()[:4] == ["split", "score", "VQA", "acc"]
    fields = row.split()
    assert fields[0] == "minval" and int(fields[3]) == len(minval)
    score, official = float(fields[1]), float(fields[2])  # the demo root has the human answers: both are shown
    assert 0 <= score <= 1 and 0 <= official <= 1
    stem = run / "best_vqa_minval"
    results = json.loads((stem.parent / f"{stem.name}_result.json").read_text())
    assert sorted(r["question_id"] for r in results) == sorted(e["question_id"] for e in minval)
    assert all(set(r) == {"question_id", "answer"} and isinstance(r["answer"], str) for r in results)
    others = json.loads((stem.parent / f"{stem.name}_others.json").read_text())
    assert all(len(o["answer"]) == 8 for o in others)
    predictions = json.loads((stem.parent / f"{stem.name}_predictions.json").read_text())
    assert score == pytest.approx(np.mean([p["soft_score"] for p in predictions]), abs=1e-4)
    assert [p["answer"] for p in predictions] == [o["answer"][0] for o in others]

    eval_script.main(["--from_pretrained", str(run / "best.pdparams"), "--split", "test"])
    test = json.loads((run / "best_vqa_test_result.json").read_text())
    test_ids = [q["question_id"] for q in vqa_data.read_questions(vqa_root / vqa_data.QUESTION_FILES["test"])]
    assert [r["question_id"] for r in test] == test_ids  # every test2015 question exactly once
    assert "test " in capsys.readouterr().out


def test_predict_answers_a_question(run, vqa_root, tmp_path, capsys):
    entry = build_dataset(options_for(vqa_root), "minval", BertTokenizer()).entries[0]
    capsys.readouterr()
    predict.main(["--from_pretrained", str(run / "best.pdparams"), "--image_id", str(entry["image_id"]),
                  "--question", entry["question"], "--top_k", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-5].startswith(f'"{entry["question"]}" on image {entry["image_id"]}: ')
    assert [line.split()[0] for line in lines[-4:]] == ["#1", "#2", "#3", "#4"]
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"image_id": entry["image_id"], "question": entry["question"], "id": 7}) + "\n")
    predict.main(["--from_pretrained", str(run / "best.pdparams"), "--batch", str(queries)])
    (line,) = [json.loads(text) for text in (tmp_path / "q.jsonl.predictions.jsonl").read_text().splitlines()]
    assert line["id"] == 7 and line["answer"] == line["top_k"][0]["answer"] and len(line["top_k"]) == 3
    assert lines[-4].split()[2] == line["answer"]
    with pytest.raises(SystemExit):
        predict.main(["--from_pretrained", str(run / "best.pdparams"), "--image_id", "1", "--expression", "dog"])
    assert "--expression is not a query of VQA 2.0" in capsys.readouterr().err


def test_dump_samples_at_the_official_sizes(vqa_root, tmp_path):
    out = tmp_path / "vqa.npz"
    dump_samples.main(["--task_config", str(DEMO_VQA), "--dataroot", str(vqa_root), "--split", "minval",
                       "--out", str(out), "--indices", "0,5,2"])
    with np.load(out, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    minval = vqa_data.load_split(vqa_root, "minval", num_labels=10 ** 6)
    num_labels = len(vqa_data.read_answer_vocab(vqa_root)[1])
    assert arrays["entry_id"].tolist() == [e["question_id"] for e in minval]
    assert arrays["all_input_ids"].shape == (len(minval), 16) and arrays["index"].tolist() == [0, 5, 2]
    shapes = {key: arrays[key].shape for key in ("features", "spatials", "image_mask", "input_ids", "input_mask",
                                                 "segment_ids", "target")}
    assert shapes == {"features": (3, 100, 2048), "spatials": (3, 100, 5), "image_mask": (3, 100),
                      "input_ids": (3, 16), "input_mask": (3, 16), "segment_ids": (3, 16), "target": (3, num_labels)}
    assert arrays["features"].dtype == np.float32 and arrays["image_mask"].dtype == np.int64
    np.testing.assert_array_equal(arrays["input_ids"], arrays["all_input_ids"][[0, 5, 2]])


def test_dump_samples_of_referring_expressions_equal_the_dataset(demo_root, tmp_path):
    out = tmp_path / "refer.npz"
    dump_samples.main(["--task_config", str(PROJECT / "config" / "demo.yml"), "--dataroot", str(demo_root),
                       "--split", "val", "--out", str(out), "--indices", "3,0"])
    options = RunOptions(**{**load_task_config(PROJECT / "config" / "demo.yml"), "dataroot": str(demo_root),
                            "feature_cache": False})
    dataset = build_dataset(options, "val", BertTokenizer())
    with np.load(out, allow_pickle=False) as data:
        assert data["entry_id"].tolist() == [e["sent_id"] for e in dataset.entries]
        for k, index in enumerate((3, 0)):
            sample = dataset[index]
            n = len(sample["image_mask"])
            for key in ("features", "spatials", "image_mask", "target"):
                np.testing.assert_array_equal(data[key][k, :n], sample[key], err_msg=key)
                assert not data[key][k, n:].any()  # zero padding to max_region_num
            for key in ("input_ids", "input_mask", "segment_ids"):
                np.testing.assert_array_equal(data[key][k], sample[key], err_msg=key)
        assert data["features"].shape[1:] == (100, 2048) and data["target"].shape[1:] == (100, 1)


# ---- one line per mistake -------------------------------------------------------------------------------------
def test_a_checkpoint_of_another_answer_vocabulary(run, vqa_root, tmp_path):
    root = tmp_path / "VQA"
    shutil.copytree(vqa_root, root)
    shutil.copytree(vqa_root.parent / "coco", tmp_path / "coco")
    label2ans = vqa_data.read_answer_vocab(root)[1] + ["extra"]
    (root / vqa_data.LABEL2ANS).write_bytes(pickle.dumps(label2ans))
    (root / vqa_data.ANS2LABEL).write_bytes(pickle.dumps({a: i for i, a in enumerate(label2ans)}))
    message = one_line_error(eval_script.main, ["--from_pretrained", str(run / "best.pdparams"), "--dataroot",
                                                str(root)])
    assert "answer vocabulary" in message and "best.pdparams" in message


def test_the_test_split_needs_its_features(run, tmp_path):
    message = one_line_error(eval_script.main, ["--from_pretrained", str(run / "best.pdparams"), "--split", "test",
                                                "--features_test", str(tmp_path / "none.lmdb")])
    assert "none.lmdb not found" in message
    message = one_line_error(eval_script.main, ["--from_pretrained", str(run / "best.pdparams"), "--split", "test",
                                                "--features_test", ""])
    assert "test split (test2015) has its own feature LMDB: set --features_test" in message


def test_unknown_split_and_task(run, tmp_path):
    message = one_line_error(eval_script.main, ["--from_pretrained", str(run / "best.pdparams"), "--split", "testA"])
    assert "VQA has no split 'testA'; its splits are trainval, minval, train, val, test" in message
    message = one_line_error(train.main, ["--task", "vqa", "--task_config", str(PROJECT / "config" / "refcoco+.yml")])
    assert "--task vqa does not match" in message and "a refer config" in message


def test_top_answers_are_those_of_a_full_stable_sort():
    """`answers_of` ranks by logit as a stable argsort of the whole row does (ties at the k-th value, NaN rows,
    k beyond the answer count included) and gives each its float64 sigmoid."""
    from vilbert.tasks.vqa import answers_of
    rng = np.random.default_rng(0)
    logit = rng.integers(-3, 4, size=(64, 40)).astype(np.float32)  # few values: ties in most rows
    logit[:32] += rng.normal(size=(32, 40)).astype(np.float32)  # distinct values
    logit[5, 3], logit[6, :] = np.nan, np.nan
    labels = [f"a{j}" for j in range(40)]
    for k in (1, 8, 40, 50):
        order = np.argsort(-logit, axis=1, kind="stable")[:, :k]
        probs = 1.0 / (1.0 + np.exp(-logit.astype(np.float64)))
        expected = [[(labels[j], float(probs[i, j])) for j in row] for i, row in enumerate(order)]
        assert repr(answers_of(logit, labels, k)) == repr(expected), k  # repr: NaN equals NaN
