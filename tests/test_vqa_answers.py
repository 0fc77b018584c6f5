"""The official VQA accuracy and the bottom-up-attention-vqa soft-score targets on hand-made cases.

Every expected value was produced by the unmodified originals (GT-Vision-Lab/VQA ``vqaEval.py``,
bottom-up-attention-vqa ``tools/compute_softscore.py`` at 978f6d6) run under Python 2.7 on the same inputs.
"""
import json

import pytest

from vilbert.vqa_answers import (CONTRACTIONS, VQAAnswersError, compute_targets, create_ans2label, filter_answers,
                                 normalize_answer, question_accuracy, read_annotation_list, read_annotations,
                                 soft_score, vqa_accuracy)


@pytest.mark.parametrize("answer, expected", [
    ("Two dogs.", "2 dogs"),             # number word, lower-case, trailing period
    ("none", "0"),
    ("twenty two", "twenty 2"),          # only single number words are mapped
    ("dont", "don't"),                   # contractions are restored, not expanded
    ("oclock", "o'clock"),
    ("somebody'd", "somebodyd"),         # the table's one reversed entry
    ("Im", "im"),                        # capitalised keys never match lower-cased words
    ("The cat", "cat"),                  # articles dropped
    ("(a) cat's toy", "cat's toy"),      # apostrophes are not punctuation
    ("yes.", "yes"),
    ("no!", "no"),
    ("3.5", "3.5"),                      # a period before a digit stays
    ("a.b", "ab"),                       # ... any other goes (the lookbehind is a typo)
    ("1,000", "1000"),                   # digit,digit: every mark is deleted, not spaced
    ("1,000 well-known", "1000 wellknown"),
    ("red,white", "red white"),          # otherwise a mark not touching a space becomes a space
    ("a-b, c", "b c"),                   # ", " deletes the comma; "-" becomes a space; "a" is an article
    ("\u0663,\u0664", "\u0663 \u0664"),  # Arabic-Indic digits are not \d in Python 2's re
    ("x" + "." * 40, "x" + "." * 8),     # re.UNICODE passed as count: only 32 periods removed
])
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


def test_contractions_table_is_the_official_one():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["yall'd've"] == "y'all'd've" and CONTRACTIONS["'ows'at"] == "'ow's'at"


YES10 = ["yes"] * 10


@pytest.mark.parametrize("answers, prediction, expected", [
    (YES10, "yes", 1.0),
    (YES10, "Yes", 0.0),                 # all ten the same: nothing is normalised
    (YES10, "yes.", 0.0),
    (YES10, " yes\n", 1.0),              # ... but newlines, tabs and outer spaces always go
    (["yes"] * 9 + ["yes."], "Yes", 1.0),  # humans differ: everything normalised
    (["2"] * 1 + ["3"] * 9, "2", 0.3),
    (["2"] * 2 + ["3"] * 8, "2", 0.6),   # leave-one-out mean (8 x 2/3 + 2 x 1/3) / 10, not the naive 2/3
    (["2", "two"] + ["3"] * 8, "2", 0.6),  # "two" -> "2"
    (["2"] * 3 + ["3"] * 7, "2", 0.9),
    (["2"] * 4 + ["3"] * 6, "2", 1.0),
    (["red"] * 5 + ["blue"] * 5, "green", 0.0),
])
def test_question_accuracy(answers, prediction, expected):
    assert question_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def _annotation(qid, answers, answer_type, question_type, mca=None):
    return {"question_id": qid, "image_id": 100 + qid, "answer_type": answer_type, "question_type": question_type,
            "multiple_choice_answer": mca or answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


ANNOTATIONS = [_annotation(1, YES10, "yes/no", "is the"),
               _annotation(2, ["2"] * 2 + ["3"] * 8, "number", "how many", mca="3"),
               _annotation(3, ["red"] * 10, "other", "what color"),
               _annotation(4, ["no"] * 10, "yes/no", "is the"),
               _annotation(5, ["cat"] * 10, "other", "what is")]


@pytest.fixture
def annotation_file(tmp_path):
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    path.write_text(json.dumps({"info": {}, "annotations": ANNOTATIONS}))
    return path


def test_read_annotations(annotation_file):
    annotations = read_annotations(annotation_file)
    assert list(annotations) == [1, 2, 3, 4, 5]
    assert annotations[2] == {"answers": ["2", "2"] + ["3"] * 8, "answer_type": "number",
                              "question_type": "how many", "image_id": 102}
    assert read_annotation_list(annotation_file) == ANNOTATIONS


def test_vqa_accuracy_per_type_over_the_predicted_questions(annotation_file):
    predictions = {4: "yes", 2: "2", 1: "yes", 3: "red"}  # question 5 not predicted: not scored
    result = vqa_accuracy(predictions, read_annotations(annotation_file))
    assert result["questions"] == 4
    assert result["per_question"] == pytest.approx({1: 1.0, 2: 0.6, 3: 1.0, 4: 0.0})
    assert list(result["per_question"]) == [1, 2, 3, 4]  # annotation-file order, as the original sums
    assert result["overall"] == pytest.approx(2.6 / 4)
    assert result["per_answer_type"] == pytest.approx({"yes/no": 0.5, "number": 0.6, "other": 1.0})
    assert result["per_question_type"] == pytest.approx({"is the": 0.5, "how many": 0.6, "what color": 1.0})


def test_vqa_accuracy_rejects_unknown_questions(annotation_file):
    annotations = read_annotations(annotation_file)
    with pytest.raises(VQAAnswersError, match=r"2 of 3 predictions .* \(e\.g\. question 7\)"):
        vqa_accuracy({1: "yes", 7: "no", 8: "no"}, annotations)
    with pytest.raises(VQAAnswersError, match="no predictions"):
        vqa_accuracy({}, annotations)


@pytest.mark.parametrize("content, message", [
    (b'{"annotations": [', "is not readable JSON"),
    (b"\xff\xfe", "is not readable JSON"),
    (b"<html>login</html>", "is not readable JSON"),
    (b'{"questions": []}', 'has no "annotations" list'),
    (b"[1, 2]", 'has no "annotations" list'),
    (json.dumps({"annotations": [{"question_id": 1}]}).encode(), "missing fields 'image_id' \\(1 of 1\\)"),
    (json.dumps({"annotations": [dict(ANNOTATIONS[0], answers=[{"id": 1}])]}).encode(),
     r"missing fields 'answers\[\]\.answer' \(1 of 1\)"),
])
def test_bad_annotation_files(tmp_path, content, message):
    path = tmp_path / "annotations.json"
    path.write_bytes(content)
    with pytest.raises(VQAAnswersError, match=message) as error:
        read_annotations(path)
    assert str(path) in str(error.value) and "download_dataset.sh" in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(VQAAnswersError, match="cannot be read"):
        read_annotations(tmp_path / "absent.json")


def test_soft_score():
    assert [soft_score(c) for c in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]  # 0.9 exactly, not 3 * 0.3


def _consensus(qid, mca, answers=("x",) * 10):
    return {"question_id": qid, "image_id": qid, "multiple_choice_answer": mca,
            "answers": [{"answer": a} for a in answers]}


def test_filter_answers_counts_questions_by_normalised_consensus():
    records = [_consensus(1, "Two"), _consensus(2, "2"), _consensus(3, "two."), _consensus(4, "red"),
               _consensus(5, "red"), _consensus(6, "blue", answers=["green"] * 10)]  # "green": never the consensus
    assert filter_answers(records, min_occurence=2) == {"2": {1, 2, 3}, "red": {4, 5}}
    assert filter_answers(records, min_occurence=3) == {"2": {1, 2, 3}}
    assert filter_answers(records) == {}  # the official threshold, 9
    assert set(filter_answers(records, min_occurence=1)) == {"2", "red", "blue"}


def test_create_ans2label_is_sorted():
    ans2label, label2ans = create_ans2label({"yes": {1}, "2": {2}, "no": {3}, "cat": {4}})
    assert label2ans == ["2", "cat", "no", "yes"]
    assert ans2label == {"2": 0, "cat": 1, "no": 2, "yes": 3}


def test_compute_targets_uses_the_raw_human_answers():
    ans2label = {"yes": 0, "2": 1, "red": 2}
    records = [_consensus(1, "yes", answers=["yes"] * 6 + ["yes."] * 3 + ["no"]),  # "yes." has no label
               _consensus(2, "2", answers=["two"] * 5 + ["2"] * 2 + ["red"] * 3),  # nor has "two"
               _consensus(3, "blue", answers=["blue"] * 10)]                     # no label at all
    targets = compute_targets(records, ans2label)
    assert targets == [{"question_id": 1, "image_id": 1, "labels": [0], "scores": [1.0]},
                       {"question_id": 2, "image_id": 2, "labels": [1, 2], "scores": [0.6, 0.9]},
                       {"question_id": 3, "image_id": 3, "labels": [], "scores": []}]
