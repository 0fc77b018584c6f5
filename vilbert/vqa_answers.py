"""VQA answers: the official VQA accuracy, and the soft-score targets ViLBERT trains its VQA head on.

Two official sources, reproduced behaviour for behaviour:

* The accuracy is GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (``VQAEval.evaluate``,
  ``processPunctuation``, ``processDigitArticle``; line numbers below are those of commit a013f00).
* The targets are hengyuan-hu/bottom-up-attention-vqa ``tools/compute_softscore.py`` at 978f6d6 (``get_score``,
  ``preprocess_answer``, ``filter_answers``, ``create_ans2label``, ``compute_target``), which wrote the
  ``cache/{train,val}_target.pkl`` and ``cache/trainval_{ans2label,label2ans}.pkl`` that vilbert_beta and 12-in-1
  read (neither ViLBERT repo has a script that writes them).

Both files hold the same normalisation tables (contractions, number words, articles, the two regexes, the
punctuation list: compared entry by entry), so they are written here once. Pure Python, no Paddle: the download
script's audit imports it.
"""
import json
import re
from collections import Counter
from typing import Dict, List, Mapping, Set, Tuple

# vqaEval.py:21-42 (compute_softscore.py:14-57 is the same table). Applied to lower-cased words, so the
# capitalised keys ("Im", "Ive", "Id've") never match; "somebody'd" -> "somebodyd" is reversed in the original.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"
}

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # vqaEval.py:43-55 manualMap
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# vqaEval.py:62 means "(?<!\d)": the "(?!<=\d)" it has is a lookahead that is always true before a ".", so a period
# goes unless a digit follows ("5." -> "5", "3.5" stays, "a.b" -> "ab"). re.ASCII: under Python 2, which the
# original ran on, \d matched 0-9 only.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)
# vqaEval.py:137-139 passes re.UNICODE as the third positional argument of sub(), which is count, not flags:
# only the first 32 periods of an answer are removed.
PERIOD_STRIP_COUNT = int(re.UNICODE)
SOFT_SCORES = (0.0, 0.3, 0.6, 0.9)  # compute_softscore.py:79-89 get_score for 0-3 humans; 4 or more score 1
ANNOTATION_FIELDS = ("question_id", "image_id", "answers", "answer_type", "question_type", "multiple_choice_answer")
DOWNLOAD_HINT = "re-download it (`bash download_dataset.sh --task vqa`, or --check to audit the data root)"


class VQAAnswersError(ValueError):
    """An annotation file that cannot be read, or predictions that do not fit the annotations."""


# ---------------------------------------------------------------- normalisation (vqaEval.py:130-155)

def _process_punctuation(text: str) -> str:
    """vqaEval.py:130-140: each mark is deleted where it touches a space in the input (or, for every mark, where
    the input has a digit,digit comma such as "1,000"), else replaced by a space; then periods are stripped."""
    digit_comma = COMMA_STRIP.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if spaced or digit_comma else " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """vqaEval.py:142-155: lower-case, number words to digits, articles dropped, then contractions restored."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """``processPunctuation`` then ``processDigitArticle`` of vqaEval.py, e.g. "Two dogs." -> "2 dogs".

    Also compute_softscore.py's ``preprocess_answer`` (126-129): its extra ``.replace(',', '')`` is a no-op,
    since "," is in the punctuation list and every comma is already deleted or made a space.
    """
    return _process_digit_article(_process_punctuation(answer))


# ---------------------------------------------------------------- the official accuracy (vqaEval.py:69-128)

def _clean(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()  # vqaEval.py:88-94


def question_accuracy(prediction: str, gt_answers: List[str]) -> float:
    """One question's accuracy: the mean over its human answers of min(1, matches among the others / 3).

    With 10 answers, 1, 2 and 3 matching humans score 0.3, 0.6 and 0.9 (not 1/3 and 2/3), 4 or more 1.
    Answers and prediction are normalised only when the humans disagree (vqaEval.py:98-103): where all 10
    answers are the same string, the prediction must equal it exactly ("yes." or "Yes" scores 0 against ten
    "yes"). The original drops the one answer dict equal to the current one (vqaEval.py:106); answer ids make the
    dicts unique, so that is leaving out this answer, as here.
    """
    answers = [_clean(answer) for answer in gt_answers]
    prediction = _clean(prediction)
    if len(set(answers)) > 1:
        answers = [normalize_answer(answer) for answer in answers]
        prediction = normalize_answer(prediction)
    matches = answers.count(prediction)
    return sum(min(1, (matches - (answer == prediction)) / 3) for answer in answers) / len(answers)


def _mean_by(accuracies: Mapping[int, float], group: Mapping[int, str]) -> Dict[str, float]:
    values: Dict[str, List[float]] = {}
    for qid, accuracy in accuracies.items():
        values.setdefault(group[qid], []).append(accuracy)
    return {name: sum(vals) / len(vals) for name, vals in values.items()}


def vqa_accuracy(predictions: Mapping[int, str], annotations: Mapping[int, dict]) -> dict:
    """The official accuracy of ``predictions`` (question id -> answer) over the questions they answer.

    As ``VQAEval.evaluate(quesIds=...)`` with the predicted ids, in annotation-file order. Returns
    ``{"overall", "per_answer_type": {type: acc}, "per_question_type": {type: acc}, "per_question": {qid: acc},
    "questions": count}``; the averages are plain means over questions. All are raw floats in [0, 1]: the
    original reports 100 x these rounded to 2 decimals (vqaEval.py:158-173) by Python 2, whose ``round`` takes
    halves away from zero (63.125 -> 63.13; Python 3's gives 63.12). (The original also rewrites the ground
    truth in place, vqaEval.py:88-101, so a second ``evaluate`` on the same object can differ; this is its
    first call.)
    """
    unknown = [qid for qid in predictions if qid not in annotations]
    if unknown:
        raise VQAAnswersError(f"{len(unknown):,} of {len(predictions):,} predictions are for questions not in the "
                              f"annotations (e.g. question {unknown[0]!r}); score them against the annotations "
                              "of the split they were predicted on")
    if not predictions:
        raise VQAAnswersError("no predictions to score")
    per_question = {qid: question_accuracy(predictions[qid], annotations[qid]["answers"])
                    for qid in annotations if qid in predictions}
    return {"overall": sum(per_question.values()) / len(per_question),
            "per_answer_type": _mean_by(per_question, {q: annotations[q]["answer_type"] for q in per_question}),
            "per_question_type": _mean_by(per_question,
                                          {q: annotations[q]["question_type"] for q in per_question}),
            "per_question": per_question,
            "questions": len(per_question)}


# ---------------------------------------------------------------- annotation files

def read_annotation_list(path) -> List[dict]:
    """The raw ``annotations`` list of a ``v2_mscoco_{train,val}2014_annotations.json``, fields checked."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as err:
        raise VQAAnswersError(f"{path} cannot be read ({err.strerror or err}); {DOWNLOAD_HINT}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise VQAAnswersError(f"{path} is not readable JSON ({err}); {DOWNLOAD_HINT}") from None
    records = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise VQAAnswersError(f"{path} has no \"annotations\" list: it is not a VQA annotation file; {DOWNLOAD_HINT}")
    _check_fields(path, records)
    return records


def _check_fields(path, records: List[dict]) -> None:
    """One error naming the fields some annotation lacks (and how many lack them)."""
    lacking = Counter(name for record in records for name in ANNOTATION_FIELDS
                      if not isinstance(record, dict) or name not in record)
    lacking.update("answers[].answer" for record in records if isinstance(record, dict)
                   and not all(isinstance(a, dict) and "answer" in a for a in record.get("answers", [])))
    if lacking:
        shown = ", ".join(f"{name!r} ({count:,} of {len(records):,})" for name, count in lacking.items())
        raise VQAAnswersError(f"{path}: annotations are missing fields {shown}; {DOWNLOAD_HINT}")


def read_annotations(path) -> Dict[int, dict]:
    """question id -> {"answers": [10 human answers], "answer_type", "question_type", "image_id"}."""
    return {record["question_id"]: {"answers": [answer["answer"] for answer in record["answers"]],
                                    "answer_type": record["answer_type"],
                                    "question_type": record["question_type"],
                                    "image_id": record["image_id"]}
            for record in read_annotation_list(path)}


# ---------------------------------------------------------------- soft-score targets (compute_softscore.py)

def soft_score(count: int) -> float:
    """compute_softscore.py:79-89 ``get_score``: 0, 0.3, 0.6, 0.9 for 0-3 humans giving an answer, 1 for 4+.

    The literals, not ``min(1, 0.3 * count)`` (0.3 * 3 is 0.8999999999999999). Always a float here; the original
    returns the ints 0 and 1 for those two cases.
    """
    return SOFT_SCORES[count] if count < len(SOFT_SCORES) else 1.0


def filter_answers(annotations_list: List[dict], min_occurence: int = 9) -> Dict[str, Set[int]]:
    """compute_softscore.py:132-150: normalised answer -> ids of the questions whose consensus it is.

    What is counted is questions, by their ``multiple_choice_answer`` (after ``normalize_answer``), not the 10
    human answers; answers that are the consensus of fewer than ``min_occurence`` questions are dropped. The
    official caches used train + val annotations and 9.
    """
    occurence: Dict[str, Set[int]] = {}
    for record in annotations_list:
        occurence.setdefault(normalize_answer(record["multiple_choice_answer"]), set()).add(record["question_id"])
    return {answer: qids for answer, qids in occurence.items() if len(qids) >= min_occurence}


def create_ans2label(occurence: Mapping[str, object]) -> Tuple[Dict[str, int], List[str]]:
    """compute_softscore.py:153-174: labels 0..N-1 for the answers of ``filter_answers``, as (ans2label, label2ans).

    The original numbers answers in the iteration order of its Python 2 dict (hash order, 163), which Python 3
    cannot reproduce; here they are sorted, so the same annotations always give the same labels. These labels
    therefore differ from the official ``trainval_ans2label.pkl``: a head trained on the official caches (all
    released ViLBERT VQA checkpoints) must be used with those pickles, not with labels made here.
    """
    label2ans = sorted(occurence)
    return {answer: label for label, answer in enumerate(label2ans)}, label2ans


def compute_targets(annotations_list: List[dict], ans2label: Mapping[str, int]) -> List[dict]:
    """compute_softscore.py:177-211: per question {"question_id", "image_id", "labels", "scores"}.

    Each distinct human answer that has a label scores ``soft_score(how many of the 10 gave it)``; answers without
    a label are dropped (a question can end with no labels). As in the original (189), the RAW human answers are
    looked up, not normalised ones (its docstring asks for preprocessed answers, but its main never preprocesses
    them), while the labels are normalised consensus answers: "yes." or "two" find no label even when "yes" and
    "2" have one. Labels come in order of first appearance among the answers (the original: Python 2 dict order);
    only the label-score pairing matters to the target.
    """
    targets = []
    for record in annotations_list:
        counts = Counter(answer["answer"] for answer in record["answers"])
        kept = [answer for answer in counts if answer in ans2label]
        targets.append({"question_id": record["question_id"], "image_id": record["image_id"],
                        "labels": [ans2label[answer] for answer in kept],
                        "scores": [soft_score(counts[answer]) for answer in kept]})
    return targets
