"""VQA 2.0 in the official layout: its files, their readers, and the splits as vilbert_beta builds them.

Under the data root (`data/VQA` in vilbert_beta, `datasets/VQA` in 12-in-1):

    v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json   {"questions": [{question_id, image_id, question}]}
    cache/{train,val}_target.pkl          list of {question_id, image_id, labels: [int], scores: [float]}
    cache/trainval_ans2label.pkl          {answer: label}; its length is the head's number of answers
    cache/trainval_label2ans.pkl          [answer] by label
    v2_mscoco_{train,val}2014_annotations.json   (optional) the 10 human answers, for the official accuracy

The target and label files are those of bottom-up-attention-vqa's `tools/compute_softscore.py` (no script of
either ViLBERT repo writes them; `vilbert/vqa_answers.py` does the same). Splits (vilbert_beta
`vilbert/datasets/vqa_dataset.py` `_load_dataset`; 12-in-1 the same): questions and targets each sorted by
question id and matched pairwise; `trainval` = train + val without its last 3,000 questions, `minval` = those
3,000, `train` and `val` the whole files, `test` = test2015 (no answers). Pickles are read with the restricted
unpickler (plain data only); this module imports no Paddle, so the download script's audit uses it too.
"""

import json
import pickle
from pathlib import Path
from typing import Dict, List, Tuple

from pyutils.restricted_pickle import RestrictedUnpickler

QUESTION_FILES = {"train": "v2_OpenEnded_mscoco_train2014_questions.json",
                  "val": "v2_OpenEnded_mscoco_val2014_questions.json",
                  "test": "v2_OpenEnded_mscoco_test2015_questions.json"}
TARGET_FILES = {"train": "cache/train_target.pkl", "val": "cache/val_target.pkl"}
ANNOTATION_FILES = {"train": "v2_mscoco_train2014_annotations.json", "val": "v2_mscoco_val2014_annotations.json"}
ANS2LABEL = "cache/trainval_ans2label.pkl"
LABEL2ANS = "cache/trainval_label2ans.pkl"
MINVAL_SIZE = 3000  # the official minval: the last 3,000 val questions by id
SPLITS = ("trainval", "minval", "train", "val", "test")
# the question files each split is made of: (file split, slice of its sorted questions)
SPLIT_PARTS = {"train": (("train", slice(None)),), "val": (("val", slice(None)),),
               "trainval": (("train", slice(None)), ("val", slice(None, -MINVAL_SIZE))),
               "minval": (("val", slice(-MINVAL_SIZE, None)),), "test": (("test", slice(None)),)}
DOWNLOAD_HINT = "run `bash download_dataset.sh --task vqa` (or --check to audit the data root)"


class VQADataError(ValueError):
    """A VQA file that is missing, damaged or inconsistent with another one."""


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise VQADataError(f"VQA has no split {split!r}; its splits are {', '.join(SPLITS)}")


def split_files(split: str) -> List[str]:
    """The files (relative to the data root) a split is read from."""
    check_split(split)
    parts = [part for part, _ in SPLIT_PARTS[split]]
    return [QUESTION_FILES[p] for p in parts] + [TARGET_FILES[p] for p in parts if p in TARGET_FILES]


def require(path: Path, root="") -> Path:
    """`path`, which must be a file of the data root (`root`, named in the error when given)."""
    if not path.is_file():
        raise VQADataError(f"{path} not found: the VQA data root{f' {root}' if root else ''} is incomplete; "
                           f"{DOWNLOAD_HINT}")
    return path


def read_json(path) -> object:
    path = require(Path(path))
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise VQADataError(f"{path} is not readable JSON ({err}); re-download it ({DOWNLOAD_HINT})") from None


def read_pickle(path) -> object:
    """A pickle of plain data (lists, dicts, strings, numbers), through the restricted unpickler."""
    path = require(Path(path))
    try:
        with open(path, "rb") as f:
            # Python 2 pickles (bottom-up-attention-vqa wrote them with cPickle) carry str as bytes
            return RestrictedUnpickler(f, path, {}, "VQA caches hold only plain data", error=VQADataError,
                                       encoding="utf-8").load()
    except VQADataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, UnicodeDecodeError) as err:
        raise VQADataError(f"{path} is not a readable pickle ({type(err).__name__}: {err}); re-download it "
                           f"({DOWNLOAD_HINT})") from None


def read_questions(path) -> List[dict]:
    """The questions of one official file, sorted by question id."""
    data = read_json(path)
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list) or not all(
            isinstance(q, dict) and {"question_id", "image_id", "question"} <= set(q) for q in questions):
        raise VQADataError(f"{path} is not a VQA questions file (a {{'questions': [{{question_id, image_id, "
                           f"question}}, ...]}} object); {DOWNLOAD_HINT}")
    return sorted(questions, key=lambda q: q["question_id"])


def read_targets(path) -> List[dict]:
    """The soft-score targets of one cache file, sorted by question id."""
    targets = read_pickle(path)
    if not isinstance(targets, list) or not all(
            isinstance(t, dict) and {"question_id", "image_id", "labels", "scores"} <= set(t) for t in targets):
        raise VQADataError(f"{path} is not a VQA target file (a list of {{question_id, image_id, labels, scores}}, "
                           f"as compute_softscore.py writes); {DOWNLOAD_HINT}")
    for t in targets:
        if len(t["labels"]) != len(t["scores"]):
            raise VQADataError(f"{path}: question {t['question_id']} has {len(t['labels'])} labels but "
                               f"{len(t['scores'])} scores; re-download or recompute it")
    return sorted(targets, key=lambda t: t["question_id"])


def read_answer_vocab(dataroot) -> Tuple[Dict[str, int], List[str]]:
    """(ans2label, label2ans), checked to be inverse of each other."""
    root = Path(dataroot)
    ans2label, label2ans = read_pickle(root / ANS2LABEL), read_pickle(root / LABEL2ANS)
    if not isinstance(ans2label, dict) or not isinstance(label2ans, list):
        raise VQADataError(f"{root / ANS2LABEL} must hold a dict of answer -> label and {root / LABEL2ANS} a list "
                           f"of answers; {DOWNLOAD_HINT}")
    if len(ans2label) != len(label2ans) or any(label2ans[label] != answer if 0 <= label < len(label2ans) else True
                                               for answer, label in ans2label.items()):
        raise VQADataError(f"{root / ANS2LABEL} ({len(ans2label)} answers) and {root / LABEL2ANS} "
                           f"({len(label2ans)}) do not describe the same answer vocabulary; take both from one "
                           "download (or one compute_softscore.py run)")
    return ans2label, label2ans


def load_split(dataroot, split: str, num_labels: int) -> List[dict]:
    """The entries of a split, in the official order: {question_id, image_id, question, labels, scores}
    (labels and scores empty for test). Questions and targets must match pairwise, as the official code asserts;
    every label must be below `num_labels` (the answer vocabulary's size)."""
    check_split(split)
    root = Path(dataroot)
    entries = []
    for part, cut in SPLIT_PARTS[split]:
        questions = read_questions(root / QUESTION_FILES[part])[cut]
        if part not in TARGET_FILES:
            entries += [dict(q, labels=[], scores=[]) for q in questions]
            continue
        target_path = root / TARGET_FILES[part]
        targets = read_targets(target_path)[cut]
        if len(targets) != len(questions):
            raise VQADataError(f"{target_path} holds {len(targets)} targets for the {len(questions)} questions of "
                               f"{QUESTION_FILES[part]}{' (after the minval cut)' if cut != slice(None) else ''}: "
                               "they are not of the same questions; take both from one download")
        for question, target in zip(questions, targets):
            if (question["question_id"], question["image_id"]) != (target["question_id"], target["image_id"]):
                raise VQADataError(
                    f"{target_path}: target of question {target['question_id']} (image {target['image_id']}) "
                    f"stands where {root / QUESTION_FILES[part]} has question {question['question_id']} (image "
                    f"{question['image_id']}): the targets are not of these questions; take both from one download")
            bad = [label for label in target["labels"] if not 0 <= label < num_labels]
            if bad:
                raise VQADataError(f"{target_path}: question {target['question_id']} has label {bad[0]}, outside "
                                   f"the answer vocabulary of {num_labels} ({root / ANS2LABEL}); use the target and "
                                   "label files of one download")
            entries.append(dict(question, labels=list(target["labels"]), scores=list(target["scores"])))
    if not entries:
        raise VQADataError(f"split {split!r} of {root} holds no questions")
    return entries
