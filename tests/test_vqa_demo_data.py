"""The generated VQA 2.0 (vilbert/vqa_demo_data.py): the official files and formats, read by the project's own
readers; targets that are compute_softscore.py's of the annotations; answers that follow from the region
features; every image in its LMDB; determinism; and a chance level far below the best score."""

import json
import re
import runpy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from test_demo_data import attributes, read_lmdb
from vilbert.demo_data import COLOURS, KINDS, PERSON_KINDS
from vilbert.features import decode_record
from vilbert.vqa_answers import compute_targets, create_ans2label, filter_answers, read_annotation_list
from vilbert.vqa_data import (ANNOTATION_FILES, ANS2LABEL, LABEL2ANS, QUESTION_FILES, SPLITS, TARGET_FILES,
                              load_split, read_answer_vocab, read_targets)
from vilbert.vqa_demo_data import (COCO_DIR, COMPLETE_MARKER, TEST_LMDB, TRAINVAL_LMDB, majority_baseline,
                                   make_vqa_demo)

REPO = Path(__file__).resolve().parents[1]
SIZES = dict(seed=0, num_train_images=100, num_val_images=20, num_test_images=10)
TINY = dict(num_train_images=6, num_val_images=3, num_test_images=2)
QUESTION_KEYS = ["info", "task_type", "data_type", "license", "data_subtype", "questions"]
ANNOTATION_KEYS = ["info", "license", "data_subtype", "annotations", "data_type"]
PARTS = ("train", "val", "test")


# This module's own roots: other tests may hold the shared `vqa_root`'s LMDBs open, and lmdb refuses to open one
# path twice in a process.
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_vqa_demo(tmp_path_factory.mktemp("vqa_beta"), layout="beta", **SIZES)


@pytest.fixture(scope="module")
def root_mt(tmp_path_factory):
    return make_vqa_demo(tmp_path_factory.mktemp("vqa_mt"), layout="mt", **SIZES)


@pytest.fixture(scope="module")
def files(root):
    """The question and annotation files, as JSON."""
    return ({part: json.loads((root / QUESTION_FILES[part]).read_text()) for part in PARTS},
            {part: json.loads((root / ANNOTATION_FILES[part]).read_text()) for part in ("train", "val")})


def test_official_layout(root):
    assert root.name == "VQA" and sorted(p.name for p in root.parent.iterdir()) == ["VQA", "coco"]
    expected = [*QUESTION_FILES.values(), *ANNOTATION_FILES.values(), *TARGET_FILES.values(), ANS2LABEL, LABEL2ANS]
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(expected)
    assert sorted(p.name for p in (root.parent / COCO_DIR).iterdir()) == sorted([TEST_LMDB, TRAINVAL_LMDB])
    assert COMPLETE_MARKER == QUESTION_FILES["train"]
    for name in (*TARGET_FILES.values(), ANS2LABEL, LABEL2ANS):  # written as compute_softscore.py's cPickle files
        assert (root / name).read_bytes()[:2] == b"\x80\x02"  # protocol 2


def test_question_and_annotation_files_have_the_official_fields(files):
    questions, annotations = files
    for part, data in questions.items():
        assert list(data) == QUESTION_KEYS and data["task_type"] == "Open-Ended" and data["data_type"] == "mscoco"
        assert data["data_subtype"] == {"train": "train2014", "val": "val2014", "test": "test2015"}[part]
        for question in data["questions"]:
            assert list(question) == ["image_id", "question", "question_id"]
            assert question["question"][0].isupper() and question["question"].endswith("?")
    for part, data in annotations.items():
        assert list(data) == ANNOTATION_KEYS and data["data_subtype"] == f"{part}2014"
        asked = [q["question_id"] for q in questions[part]["questions"]]
        assert [a["question_id"] for a in data["annotations"]] == asked
        for record in data["annotations"]:
            assert set(record) == {"question_type", "multiple_choice_answer", "answers", "image_id", "answer_type",
                                   "question_id"}
            assert [a["answer_id"] for a in record["answers"]] == list(range(1, 11))
            assert all(set(a) == {"answer", "answer_confidence", "answer_id"} for a in record["answers"])
            assert {a["answer_confidence"] for a in record["answers"]} <= {"yes", "maybe", "no"}
            consensus = Counter(a["answer"] for a in record["answers"]).most_common(1)[0][0]
            assert record["multiple_choice_answer"] == consensus
            assert record["answer_type"] in ("yes/no", "number", "other")
            assert record["question_type"] in ("what color is the", "what is the", "what animal is", "who is",
                                               "how many", "how many people are", "is there a", "are there any",
                                               "is the")


def test_ids_follow_the_real_data(files):
    """COCO-range image ids, distinct across the three files; question_id = image_id * 1000 + k, k = 0, 1, ..."""
    questions, _ = files
    images = {part: [q["image_id"] for q in data["questions"]] for part, data in questions.items()}
    assert all(1 <= i <= 581_929 for ids in images.values() for i in ids)
    assert sum(len(set(ids)) for ids in images.values()) == len(set().union(*images.values())) == 130
    for data in questions.values():
        per_image = Counter()
        for question in data["questions"]:
            assert question["question_id"] == question["image_id"] * 1000 + per_image[question["image_id"]]
            per_image[question["image_id"]] += 1
        assert 3 <= min(per_image.values()) and max(per_image.values()) <= 8


def test_every_split_loads_as_training_reads_it(root, files):
    questions, _ = files
    ans2label, label2ans = read_answer_vocab(root)
    splits = {split: load_split(root, split, len(ans2label)) for split in SPLITS}
    # fewer than 3,000 val questions: minval (the last 3,000) is all of val, trainval is train only
    assert splits["trainval"] == splits["train"] and splits["minval"] == splits["val"]
    for part in PARTS:
        assert [e["question_id"] for e in splits[part]] == [q["question_id"] for q in questions[part]["questions"]]
    assert all(e["labels"] == e["scores"] == [] for e in splits["test"])
    assert all(0 <= label < len(label2ans) for e in splits["trainval"] + splits["minval"] for label in e["labels"])


def test_targets_are_compute_softscore_of_the_annotations(root):
    records = {part: read_annotation_list(root / ANNOTATION_FILES[part]) for part in ("train", "val")}
    ans2label, label2ans = create_ans2label(filter_answers(records["train"] + records["val"], 9))
    assert read_answer_vocab(root) == (ans2label, label2ans)
    assert {"yes", "no", "0", "1", "2"} <= set(label2ans)  # and colours and kinds: every family has answers
    assert set(COLOURS) & set(label2ans) and {kind.word for kind in KINDS} & set(label2ans)
    for part, annotations in records.items():
        targets = read_targets(root / TARGET_FILES[part])
        assert targets == compute_targets(annotations, ans2label)
        scores = [s for t in targets for s in t["scores"]]
        assert any(s < 1 for s in scores) and scores.count(1.0) > len(targets) * 0.9


def test_normalisation_matters(files):
    """Some humans write the right answer in a form only the official normalisation accepts ("two", "a dog")."""
    answers = [a["answer"] for data in files[1].values() for r in data["annotations"] for a in r["answers"]]
    assert {"two", "zero"} & set(answers) and any(a.startswith(("a ", "the ")) for a in answers)
    assert any(a[0].isupper() for a in answers)


def answer_from_regions(question, regions):
    """The answer a question has in the image whose regions encode (colour, kind) pairs (None: no object)."""
    objects = [(COLOURS[c], KINDS[k].word, k) for c, k in regions if c is not None]
    plural = {KINDS[k].word + "s": KINDS[k].word for k in range(len(KINDS))} | {"men": "man", "women": "woman",
                                                                               "children": "child"}
    text = question.lower().rstrip("?")
    if m := re.fullmatch(r"what color is the (\w+)", text):
        (answer,) = [c for c, w, _ in objects if w == m[1]]
    elif m := re.fullmatch(r"what is the (\w+) object", text):
        (answer,) = [w for c, w, _ in objects if c == m[1]]
    elif m := re.fullmatch(r"what animal is (\w+)", text):
        (answer,) = [w for c, w, k in objects if c == m[1] and KINDS[k].supercategory == "animal"]
    elif m := re.fullmatch(r"who is wearing (\w+)", text):
        (answer,) = [w for c, w, k in objects if c == m[1] and k in PERSON_KINDS]
    elif text == "how many people are there":
        answer = str(sum(k in PERSON_KINDS for _, _, k in objects))
    elif m := re.fullmatch(r"how many (\w+) are there", text):
        answer = str(sum(w == plural[m[1]] for _, w, _ in objects))
    elif m := re.fullmatch(r"is there a (\w+)|are there any (\w+)", text):
        answer = "yes" if any(w in (m[1], plural.get(m[2])) for _, w, _ in objects) else "no"
    else:
        kind, colour = re.fullmatch(r"is the (\w+) (\w+)", text).groups()
        (real,) = [c for c, w, _ in objects if w == kind]
        answer = "yes" if real == colour else "no"
    return answer


def test_answers_follow_from_the_region_features(root, files):
    """What the region features encode answers every question (one object has the colour or kind asked about);
    the humans' consensus is that answer almost always (the wrong answers of a few can outvote the right one when
    others write it in another form)."""
    questions, annotations = files
    regions = {}
    for lmdb_name in (TRAINVAL_LMDB, TEST_LMDB):
        records, _ = read_lmdb(root.parent / COCO_DIR / lmdb_name)
        regions.update({int(key): [attributes(f) for f in decode_record(record, key).features[1:]]
                        for key, record in records.items()})
    answered = {q["question_id"]: answer_from_regions(q["question"], regions[q["image_id"]])
                for data in questions.values() for q in data["questions"]}
    consensus = [r["multiple_choice_answer"] == answered[r["question_id"]]
                 for data in annotations.values() for r in data["annotations"]]
    assert np.mean(consensus) > 0.97


def test_every_image_in_its_lmdb(root, files):
    questions, _ = files
    trainval, trainval_keys = read_lmdb(root.parent / COCO_DIR / TRAINVAL_LMDB)
    test, test_keys = read_lmdb(root.parent / COCO_DIR / TEST_LMDB)
    images = {part: {q["image_id"] for q in data["questions"]} for part, data in questions.items()}
    assert {int(k) for k in trainval_keys} == images["train"] | images["val"] and len(trainval) == 120
    assert {int(k) for k in test_keys} == images["test"] and len(test) == 10
    for record in trainval.values():  # vilbert_beta's COCO records: convert_trainval_lmdb.py keeps no cls_prob
        assert record["cls_prob"] is None and all(isinstance(record[k], str) for k in ("image_id", "features"))


def test_layouts_hold_the_same_data(root, root_mt):
    beta, _ = read_lmdb(root.parent / COCO_DIR / TRAINVAL_LMDB)
    mt, _ = read_lmdb(root_mt.parent / COCO_DIR / TRAINVAL_LMDB)
    assert beta.keys() == mt.keys()
    for key, record in beta.items():
        assert isinstance(mt[key]["features"], np.ndarray)
        np.testing.assert_array_equal(decode_record(record, key).features, decode_record(mt[key], key).features)
    for name in (*QUESTION_FILES.values(), *TARGET_FILES.values(), ANS2LABEL):
        assert (root / name).read_bytes() == (root_mt / name).read_bytes()


def test_deterministic_in_the_seed(tmp_path):
    a, b, c = (make_vqa_demo(tmp_path / name, seed=seed, **TINY) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    for name in (*QUESTION_FILES.values(), *ANNOTATION_FILES.values(), *TARGET_FILES.values(), LABEL2ANS):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / QUESTION_FILES["train"]).read_bytes() != (c / QUESTION_FILES["train"]).read_bytes()
    for lmdb_name in (TRAINVAL_LMDB, TEST_LMDB):
        records_a, keys_a = read_lmdb(a.parent / COCO_DIR / lmdb_name)
        records_b, keys_b = read_lmdb(b.parent / COCO_DIR / lmdb_name)
        assert keys_a == keys_b and all(decode_record(records_a[k], k).features.tobytes()
                                        == decode_record(records_b[k], k).features.tobytes() for k in keys_a)


def test_the_best_single_answer_scores_far_below_the_right_answers(root):
    answer, score = majority_baseline(root)
    assert answer in ("yes", "no", "0") and score < 0.3
    ans2label, _ = read_answer_vocab(root)
    minval = load_split(root, "minval", len(ans2label))
    assert np.mean([max(e["scores"], default=0.0) for e in minval]) > 0.9  # the right answers' soft score


def test_every_word_is_in_the_bert_vocab(files):
    vocab = set((REPO / "vilbert" / "bert-base-uncased-vocab.txt").read_text().split("\n"))
    words = {w for data in files[0].values() for q in data["questions"] for w in q["question"].lower()[:-1].split()}
    assert words and words <= vocab


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        make_vqa_demo(tmp_path, layout="lxmert")
    with pytest.raises(ValueError, match="num_val_images"):
        make_vqa_demo(tmp_path, num_val_images=0)


def test_cli(tmp_path, capsys):
    make_demo_data = runpy.run_path(str(REPO / "tools" / "make_demo_data.py"))["main"]  # in process: no second Paddle
    make_demo_data(["--out", str(tmp_path), "--task", "vqa", "--layout", "mt", "--num_train_images", "12",
                    "--num_val_images", "4", "--num_test_images", "3"])
    out = capsys.readouterr().out
    assert f"mt-layout VQA 2.0 demo data to {tmp_path / 'VQA'}" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:7]}
    assert list(rows) == list(SPLITS) and rows["train"][1] == "12" and rows["test"][1] == "3"
    assert "scores" in out and (tmp_path / "VQA" / COMPLETE_MARKER).is_file()
    with pytest.raises(SystemExit):
        make_demo_data(["--out", str(tmp_path), "--task", "vqa", "--dataset", "refcocog"])
    assert "--dataset: only for --task refer" in capsys.readouterr().err
