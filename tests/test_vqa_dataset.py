"""VQADataset and the VQA files: the official splits (minval = the last 3,000 val questions), each family's
tokenization, regions cut at max_region_num, soft targets, the entries cache, and one error per bad file."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from test_features import feature_record, write_lmdb
from vilbert import vqa_data
from vilbert.dataset import collate
from vilbert.features import open_features
from vilbert.tokenization import BertTokenizer
from vilbert.vqa_data import VQADataError
from vilbert.vqa_dataset import VQADataset

ANSWERS = ["yes", "no", "2", "red", "dog"]
LONG = "is " + " ".join("abcdefghijklmnop")  # 17 wordpieces: beta cuts its [SEP] at 16
NUM_VAL = vqa_data.MINVAL_SIZE + 3  # 3 val questions go to trainval, the last 3,000 to minval
BOXES = {1: 3, 2: 100, 3: 5}  # boxes per image; image 2 has more rows (101) than beta's 100 regions


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizer()


def question(qid, image_id, text):
    return {"question_id": qid, "image_id": image_id, "question": text}


def write_root(root: Path, *, targets_of=None) -> Path:
    """A VQA root: 2 train questions, NUM_VAL val (out of question-id order in the file), 2 test; features for
    images 1-2 (train/val) and 3 (test)."""
    rng = np.random.default_rng(0)
    train = [question(1001, 1, "What color is the dog?"), question(1000, 1, LONG)]
    val = [question(2000 + k, 2, f"how many dogs {k}?") for k in range(NUM_VAL)][::-1]
    test = [question(3000, 3, "is it red?"), question(3001, 3, "what is it?")]
    (root / "cache").mkdir(parents=True)
    for name, questions in (("train", train), ("val", val), ("test", test)):
        (root / vqa_data.QUESTION_FILES[name]).write_text(json.dumps({"questions": questions}))
    labels = {1000: ([0], [1.0]), 1001: ([3, 4], [0.9, 0.3])}  # 2001: no answer in the vocabulary
    labels.update({2000 + k: ([2], [0.6]) for k in range(NUM_VAL) if k != 1})
    labels[2001] = ([], [])
    for name, questions in (("train", train), ("val", val)):
        targets = [{"question_id": q["question_id"], "image_id": q["image_id"], "labels": labels[q["question_id"]][0],
                    "scores": labels[q["question_id"]][1]} for q in questions]
        (root / vqa_data.TARGET_FILES[name]).write_bytes(pickle.dumps((targets_of or (lambda n, t: t))(name, targets)))
    (root / vqa_data.ANS2LABEL).write_bytes(pickle.dumps({a: i for i, a in enumerate(ANSWERS)}))
    (root / vqa_data.LABEL2ANS).write_bytes(pickle.dumps(ANSWERS))
    coco = root.parent / "coco"
    coco.mkdir(exist_ok=True)
    for lmdb_name, images in (("trainval.lmdb", (1, 2)), ("test.lmdb", (3,))):
        records = {}
        for image_id in images:
            n = BOXES[image_id]
            boxes = np.tile([0, 0, 10, 10], (n, 1)) + np.arange(n)[:, None]
            records[image_id] = feature_record(image_id, 100, 100, boxes, rng.uniform(0, 1, (n, 2048)))
        write_lmdb(coco / lmdb_name, records)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_root(tmp_path_factory.mktemp("vqa") / "VQA")


def dataset(root, split, tokenizer, **kwargs):
    lmdb = "test.lmdb" if split == "test" else "trainval.lmdb"
    return VQADataset(root, split, tokenizer, open_features(str(root.parent / "coco" / lmdb), cache=False), **kwargs)


def test_the_official_splits(root, tokenizer):
    ids = {split: dataset(root, split, tokenizer).entry_ids.tolist()
           for split in ("train", "val", "trainval", "minval", "test")}
    val = list(range(2000, 2000 + NUM_VAL))
    assert ids["train"] == [1000, 1001]  # sorted by question id
    assert ids["val"] == val and ids["minval"] == val[3:] and len(ids["minval"]) == vqa_data.MINVAL_SIZE
    assert ids["trainval"] == [1000, 1001] + val[:3]
    assert ids["test"] == [3000, 3001]


def test_tokenization_of_each_family(root, tokenizer):
    beta = dataset(root, "train", tokenizer)
    tokens = beta[0]["input_ids"]  # question 1000, 17 wordpieces
    assert len(tokens) == 16 and tokens[0] == tokenizer.cls_token_id and tokenizer.sep_token_id not in tokens
    assert tokens.tolist()[1:] == tokenizer.encode(LONG)[:15]
    mt = dataset(root, "train", tokenizer, max_seq_length=23, max_region_num=101, tokenization="12in1")
    tokens = mt[0]["input_ids"].tolist()
    assert tokens[:19] == [tokenizer.cls_token_id] + tokenizer.encode(LONG) + [tokenizer.sep_token_id]
    assert tokens[19:] == [0] * 4 and mt[0]["input_mask"].tolist() == [1] * 19 + [0] * 4
    short = beta[1]  # "What color is the dog?"
    expected = [tokenizer.cls_token_id] + tokenizer.encode("What color is the dog?") + [tokenizer.sep_token_id]
    assert short["input_ids"].tolist() == expected + [0] * (16 - len(expected))
    assert short["segment_ids"].tolist() == [0] * 16


def test_soft_targets_and_regions(root, tokenizer):
    data = dataset(root, "trainval", tokenizer)
    np.testing.assert_allclose(data[0]["target"], [1, 0, 0, 0, 0])
    np.testing.assert_allclose(data[1]["target"], [0, 0, 0, 0.9, 0.3])
    np.testing.assert_array_equal(data[3]["target"], np.zeros(5))  # question 2001: no label in the vocabulary
    assert data.entries[1]["answers"] == {"red": pytest.approx(0.9), "dog": pytest.approx(0.3)}
    # image 1: the whole-image row + 3 boxes; image 2: 101 rows cut to 100 (beta), 101 with 12-in-1's 101
    assert data[0]["features"].shape == (4, 2048) and data[2]["features"].shape == (100, 2048)
    reader = data.det_features
    np.testing.assert_array_equal(data[2]["features"], reader[2].features[:100])
    assert dataset(root, "val", tokenizer, max_region_num=101)[0]["features"].shape == (101, 2048)
    assert (dataset(root, "test", tokenizer)[0]["target"] == 0).all()


def test_batch_equals_collated_samples(root, tokenizer):
    data = dataset(root, "trainval", tokenizer)
    indices = [4, 0, 2, 1]
    batch = data.batch(indices)
    expected = collate([data[i] for i in indices], data.region_keys)
    assert batch.keys() == expected.keys()
    for key in batch:
        np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)


def test_entries_cache_is_reused(root, tokenizer, monkeypatch):
    first = dataset(root, "minval", tokenizer)
    other = dataset(root, "minval", tokenizer, tokenization="12in1", max_seq_length=23)
    assert first.cache.path.is_file() and other.cache.path.is_file() and other.cache.path != first.cache.path
    monkeypatch.setattr(vqa_data, "load_split", lambda *a: pytest.fail("the cache was not used"))
    again = dataset(root, "minval", tokenizer)
    assert again.entry_ids.tolist() == first.entry_ids.tolist()
    np.testing.assert_array_equal(again.token_ids, first.token_ids)


def swapped(name, targets):
    if name == "train":
        targets[0]["question_id"] = 999
    return targets


def out_of_range(name, targets):
    if name == "train":
        targets[0]["labels"], targets[0]["scores"] = [7], [1.0]
    return targets


@pytest.mark.parametrize("targets_of, expected", [
    (swapped, "train_target.pkl: target of question 999 (image 1) stands where "
              "{root}/v2_OpenEnded_mscoco_train2014_questions.json has question 1000"),
    (out_of_range, "train_target.pkl: question 1001 has label 7, outside the answer vocabulary of 5"),
])
def test_targets_of_other_questions_are_one_error(tmp_path, tokenizer, targets_of, expected):
    root = write_root(tmp_path / "VQA", targets_of=targets_of)
    with pytest.raises(VQADataError, match=None) as error:
        dataset(root, "train", tokenizer)
    assert expected.format(root=root) in str(error.value) and "\n" not in str(error.value)


def test_missing_files_and_images(tmp_path, tokenizer):
    root = write_root(tmp_path / "VQA")
    with pytest.raises(VQADataError, match="are missing from the features .*trainval.lmdb .*image ids 3"):
        VQADataset(root, "test", tokenizer, open_features(str(root.parent / "coco" / "trainval.lmdb"), cache=False))
    (root / vqa_data.LABEL2ANS).write_bytes(pickle.dumps(ANSWERS[:4]))
    with pytest.raises(VQADataError, match="do not describe the same answer vocabulary"):
        dataset(root, "train", tokenizer)
    (root / vqa_data.LABEL2ANS).write_bytes(pickle.dumps(ANSWERS))
    (root / vqa_data.TARGET_FILES["val"]).unlink()
    with pytest.raises(VQADataError, match="val_target.pkl not found: the VQA data root .* is incomplete; run "
                                           "`bash download_dataset.sh --task vqa`"):
        dataset(root, "minval", tokenizer)


def test_pickled_code_is_refused(tmp_path, tokenizer):
    root = write_root(tmp_path / "VQA")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / vqa_data.ANS2LABEL).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(VQADataError, match="refusing to unpickle global builtins.print"):
        dataset(root, "train", tokenizer)
