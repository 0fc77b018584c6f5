"""A small generated VQA 2.0 in the official on-disk layout, for the demo and the tests.

Every file is in the format the official code reads (`vilbert/vqa_data.py` says which code reads what), so the
VQA pipeline runs on it unchanged, and `bash download_dataset.sh --check --task vqa --dataroot ROOT/VQA` audits
it like the real data:

    <root>/VQA/v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json   visualqa.org's question files
    <root>/VQA/v2_mscoco_{train,val}2014_annotations.json                      10 human answers per question
    <root>/VQA/cache/{train,val}_target.pkl, trainval_{ans2label,label2ans}.pkl  as compute_softscore.py writes
    <root>/coco/coco_trainval_resnet101_faster_rcnn_genome.lmdb/   train2014 + val2014 images' region features
    <root>/coco/coco_test_resnet101_faster_rcnn_genome.lmdb/       test2015 images' region features

The cache files are computed from the annotations as bottom-up-attention-vqa's `tools/compute_softscore.py`
does (`vilbert/vqa_answers.py`: answers that are the consensus of at least 9 train+val questions, soft scores
0.3 per human up to 1). `layout='beta'` writes vilbert_beta's LMDB records (str fields, base64 float32 arrays;
`cls_prob` None, as `script/convert_trainval_lmdb.py`'s fields have none), `layout='mt'` 12-in-1's (ints, numpy
arrays); the paths are vilbert_beta's for both.

The images are drawn as the generated RefCOCO's (`vilbert/demo_data.py`): 4-8 objects with a colour and a kind,
whose region features carry both as scaled one-hot blocks plus noise. The questions are answered by those
features, in the question types of the real data: colour ("What color is the dog?", of a kind present once),
kind ("What is the red object?", "What animal is white?", "Who is wearing blue?", of a colour that singles
one out), count ("How many cats are there?", "How many people are there?": 0-4) and yes/no ("Is there a horse?",
"Are there any chairs?", "Is the man green?"), 3-8 per image. Ten simulated annotators answer each question:
most give the right answer; per question up to 30% give a wrong one (another colour, a synonym such as
"puppy", a count off by one, the other of yes/no), and a few write the right one in another form ("two", "a
dog", "Yes"), which the official accuracy normalises but the targets do not (compute_softscore.py looks up
the raw answers). So targets hold soft scores below 1, and answering well needs the image: answering "0" to
everything, the best single answer, scores 0.19 on minval at the default size and seed (0.15-0.19 over seeds
0-2; `majority_baseline`), the right answers 0.999.

Ids follow the real data: image ids are COCO-range ids (1-581929), distinct across train2014, val2014 and
test2015; the k-th question of an image has question_id = image_id * 1000 + k (LXMERT's VQA example:
image 458752, question 458752000).

Splits: `vilbert/vqa_data.py` builds them as vilbert_beta does, with minval the LAST 3,000 val questions by
id. The default demo has fewer val questions than that, so there minval is all of val and trainval is train
only: the demo's train_split trainval and val_split minval train on train2014 and validate on all of val2014.

Completeness: every file is written atomically (`vilbert/fileio.py`, and the LMDBs by `FeatureLMDBWriter`),
and the train question file is written last, so a root holding it is complete (`COMPLETE_MARKER`).
"""

import json
import pickle
from collections import Counter
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

import numpy as np

from .demo_data import (ALL_KINDS, COLOURS, IMAGE_SIZES, KINDS, LAYOUTS, PERSON_KINDS, detections, place_objects,
                        scene_objects)
from .feature_lmdb import FeatureLMDBWriter, encode_record
from .fileio import atomic_write
from .vqa_answers import compute_targets, create_ans2label, filter_answers
from .vqa_data import (ANNOTATION_FILES, ANS2LABEL, LABEL2ANS, QUESTION_FILES, TARGET_FILES, load_split,
                       read_answer_vocab)

VQA_DIR = "VQA"  # <root>/VQA is the data root (vilbert_beta's data/VQA)
COCO_DIR = "coco"  # the features sit beside it (vilbert_beta's data/coco)
TRAINVAL_LMDB = "coco_trainval_resnet101_faster_rcnn_genome.lmdb"
TEST_LMDB = "coco_test_resnet101_faster_rcnn_genome.lmdb"
COMPLETE_MARKER = QUESTION_FILES["train"]  # written last
SUBTYPES = {"train": "train2014", "val": "val2014", "test": "test2015"}
MAX_COCO_IMAGE_ID = 581_929  # the largest COCO 2014/2015 image id
MIN_OCCURENCE = 9  # compute_softscore.py's threshold for an answer to get a label
ANNOTATORS = 10

ANIMAL_KINDS = tuple(i for i, kind in enumerate(KINDS) if kind.supercategory == "animal")
PLURALS = {"man": "men", "woman": "women", "child": "children"}  # the others add an "s"
SYNONYMS = {"man": ("person", "guy"), "woman": ("lady", "girl"), "child": ("kid", "boy"), "dog": ("puppy",),
            "cat": ("kitten",), "horse": ("pony",), "car": ("vehicle", "taxi"), "chair": ("seat",)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
MAX_COUNT = 4  # counting questions are asked only where the answer is 0-4
# how often a question of each family is asked, among the families an image has a question of
FAMILY_WEIGHTS = {"colour": 0.3, "kind": 0.3, "count": 0.25, "yes/no": 0.15}
MAX_WRONG = 0.3  # per question, the share of annotators giving a wrong answer is drawn from [0, MAX_WRONG)
RESPELLED = 0.08  # the share writing the right answer in another form
LICENSE = {"url": "", "name": "generated data, no license restrictions"}


class Question(NamedTuple):
    family: str  # colour, kind, count or yes/no
    text: str
    answer: str  # as compute_softscore.py normalises answers: lower case, digits, no articles
    question_type: str  # the real data's question types (its first words)
    answer_type: str  # "other", "number" or "yes/no"


def make_vqa_demo(root, *, seed: int = 0, layout: str = "beta", num_train_images: int = 600,
                  num_val_images: int = 120, num_test_images: int = 100, max_detections: int = 0) -> Path:
    """Write the generated VQA data under `root` (deterministic in `seed`); return its data root, `root/VQA`.

    The features go to `root/coco/`. The default size (820 images; about 3,300 train, 660 val and 550 test
    questions; 80 MB in beta layout) takes a few seconds. max_detections > 0 adds background boxes up to that
    many per image, as `vilbert.demo_data.make_demo_dataset` does (real detectors return 10-100: the loader
    benchmark's realistic rows).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if num_train_images < 1 or num_val_images < 1 or num_test_images < 1:
        raise ValueError("need num_train_images, num_val_images and num_test_images >= 1")
    root, rng = Path(root), np.random.default_rng(seed)
    counts = {"train": num_train_images, "val": num_val_images, "test": num_test_images}
    ids = (1 + rng.choice(MAX_COCO_IMAGE_ID, size=sum(counts.values()), replace=False)).tolist()
    image_ids, start = {}, 0
    for part, count in counts.items():
        image_ids[part] = sorted(ids[start:start + count])
        start += count

    questions: Dict[str, List[dict]] = {part: [] for part in counts}
    annotations: Dict[str, List[dict]] = {part: [] for part in ("train", "val")}
    for lmdb_name, parts in ((TRAINVAL_LMDB, ("train", "val")), (TEST_LMDB, ("test",))):
        with FeatureLMDBWriter(root / COCO_DIR / lmdb_name) as features:
            for part in parts:
                for image_id in image_ids[part]:
                    width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
                    colours, kinds = scene_objects(rng)
                    boxes, free_cells = place_objects(rng, len(kinds), width, height)
                    regions = detections(rng, image_id, width, height, colours, kinds, boxes, free_cells,
                                         max_detections)
                    features.put(image_id, encode_record(regions._replace(cls_prob=None), layout))
                    for k, question in enumerate(_ask(rng, colours, kinds)):
                        question_id = image_id * 1000 + k
                        questions[part].append({"image_id": image_id, "question": question.text,
                                                "question_id": question_id})
                        if part in annotations:
                            annotations[part].append(_annotate(rng, question, image_id, question_id))

    data_root = root / VQA_DIR
    for part, records in annotations.items():
        atomic_write(data_root / ANNOTATION_FILES[part], json.dumps(_annotation_file(part, records, seed)))
    ans2label, label2ans = create_ans2label(filter_answers(annotations["train"] + annotations["val"],
                                                           MIN_OCCURENCE))
    for part, records in annotations.items():
        atomic_write(data_root / TARGET_FILES[part], pickle.dumps(compute_targets(records, ans2label), protocol=2))
    atomic_write(data_root / ANS2LABEL, pickle.dumps(ans2label, protocol=2))
    atomic_write(data_root / LABEL2ANS, pickle.dumps(label2ans, protocol=2))
    for part in ("test", "val", "train"):  # train last: COMPLETE_MARKER
        atomic_write(data_root / QUESTION_FILES[part], json.dumps(_question_file(part, questions[part], seed)))
    return data_root


def majority_baseline(data_root, train_split: str = "trainval", val_split: str = "minval") -> Tuple[str, float]:
    """The answer with the highest total soft score in `train_split`, and its mean soft score on `val_split`
    (the metric ViLBERT reports): what a model that ignores image and question scores."""
    ans2label, label2ans = read_answer_vocab(data_root)
    totals = Counter()
    for entry in load_split(data_root, train_split, len(ans2label)):
        totals.update(dict(zip(entry["labels"], entry["scores"])))
    label = totals.most_common(1)[0][0]
    entries = load_split(data_root, val_split, len(ans2label))
    return label2ans[label], sum(dict(zip(e["labels"], e["scores"])).get(label, 0.0) for e in entries) / len(entries)


def _plural(word: str) -> str:
    return PLURALS.get(word, word + "s")


def _candidates(colours: List[int], kinds: List[int]) -> List[Question]:
    """Every question the image's objects answer unambiguously."""
    found, kind_count = [], Counter(kinds)
    for kind in ALL_KINDS:
        word, count = KINDS[kind].word, kind_count[kind]
        there = "yes" if count else "no"
        found += [Question("yes/no", f"is there a {word}?", there, "is there a", "yes/no"),
                  Question("yes/no", f"are there any {_plural(word)}?", there, "are there any", "yes/no")]
        if count <= MAX_COUNT:
            found.append(Question("count", f"how many {_plural(word)} are there?", str(count), "how many", "number"))
        if count == 1:
            colour = colours[kinds.index(kind)]
            found.append(Question("colour", f"what color is the {word}?", COLOURS[colour], "what color is the",
                                  "other"))
            found += [Question("yes/no", f"is the {word} {COLOURS[other]}?", "yes" if other == colour else "no",
                               "is the", "yes/no") for other in range(len(COLOURS))]
    people = sum(kind_count[kind] for kind in PERSON_KINDS)
    if people <= MAX_COUNT:
        found.append(Question("count", "how many people are there?", str(people), "how many people are", "number"))
    for colour in sorted(set(colours)):
        name = COLOURS[colour]
        for among, text, question_type in ((ALL_KINDS, f"what is the {name} object?", "what is the"),
                                           (ANIMAL_KINDS, f"what animal is {name}?", "what animal is"),
                                           (PERSON_KINDS, f"who is wearing {name}?", "who is")):
            which = [k for c, k in zip(colours, kinds) if c == colour and k in among]
            if len(which) == 1:
                found.append(Question("kind", text, KINDS[which[0]].word, question_type, "other"))
    return found


def _ask(rng, colours: List[int], kinds: List[int]) -> List[Question]:
    """3-8 different questions about one image: a family drawn by FAMILY_WEIGHTS among those the image has
    questions of, then an answer drawn uniformly among its questions' answers (so yes and no, and the counts,
    are about equally likely), then one of the questions with that answer. Every image has 16 yes/no questions
    (is there a / are there any, of each kind), so there are always enough."""
    left = _candidates(colours, kinds)
    asked = []
    for _ in range(int(rng.integers(3, 9))):
        families = [family for family in FAMILY_WEIGHTS if any(q.family == family for q in left)]
        weights = np.array([FAMILY_WEIGHTS[family] for family in families])
        family = families[rng.choice(len(families), p=weights / weights.sum())]
        answers = sorted({q.answer for q in left if q.family == family})
        answer = answers[rng.integers(len(answers))]
        pool = [q for q in left if q.family == family and q.answer == answer]
        question = pool[rng.integers(len(pool))]
        left.remove(question)
        asked.append(question._replace(text=question.text[0].upper() + question.text[1:]))
    return asked


def _wrong(rng, question: Question) -> str:
    """An answer a careless or disagreeing annotator gives instead of the right one."""
    answer = question.answer
    if question.answer_type == "yes/no":
        return "no" if answer == "yes" else "yes"
    if question.answer_type == "number":
        count = int(answer)
        return str(count + 1 if count == 0 or rng.random() < 0.5 else count - 1)
    if question.family == "colour":
        others = [c for c in COLOURS if c != answer]
        return others[rng.integers(len(others))]
    if rng.random() < 0.6:  # a kind: a synonym, or another kind
        return SYNONYMS[answer][rng.integers(len(SYNONYMS[answer]))]
    others = [k.word for k in KINDS if k.word != answer]
    return others[rng.integers(len(others))]


def _respelled(rng, question: Question) -> str:
    """The right answer in a form the official accuracy normalises to it ("two", "a dog", "Yes")."""
    if question.answer_type == "number":
        return NUMBER_WORDS[int(question.answer)]
    if question.family == "kind":
        return ("a ", "the ")[rng.integers(2)] + question.answer
    return question.answer.capitalize()


def _annotate(rng, question: Question, image_id: int, question_id: int) -> dict:
    """One record of an annotation file: ten humans' answers and the consensus."""
    wrong = rng.uniform(0, MAX_WRONG)
    answers = []
    for answer_id in range(1, ANNOTATORS + 1):
        draw = rng.random()
        if draw < wrong:
            answer, confidence = _wrong(rng, question), ("yes", "maybe", "no")[rng.choice(3, p=[0.4, 0.5, 0.1])]
        else:
            answer = _respelled(rng, question) if draw < wrong + RESPELLED else question.answer
            confidence = "yes" if rng.random() < 0.9 else "maybe"
        answers.append({"answer": answer, "answer_confidence": confidence, "answer_id": answer_id})
    consensus = Counter(a["answer"] for a in answers).most_common(1)[0][0]
    return {"question_type": question.question_type, "multiple_choice_answer": consensus, "answers": answers,
            "image_id": image_id, "answer_type": question.answer_type, "question_id": question_id}


def _info(seed: int) -> dict:
    return {"description": "ViLBERT-Paddle generated VQA 2.0-format demo data", "url": "", "version": "2.0",
            "year": 2024, "contributor": "vilbert/vqa_demo_data.py", "date_created": "2024-01-01", "seed": seed}


def _question_file(part: str, questions: List[dict], seed: int) -> dict:
    """A question file with the official top-level fields (v2_OpenEnded_mscoco_*_questions.json)."""
    return {"info": _info(seed), "task_type": "Open-Ended", "data_type": "mscoco", "license": LICENSE,
            "data_subtype": SUBTYPES[part], "questions": questions}


def _annotation_file(part: str, annotations: List[dict], seed: int) -> dict:
    """An annotation file with the official top-level fields (v2_mscoco_*_annotations.json)."""
    return {"info": _info(seed), "license": LICENSE, "data_subtype": SUBTYPES[part], "annotations": annotations,
            "data_type": "mscoco"}
