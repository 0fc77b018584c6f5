"""The official REC and VQA losses and scores on hand-worked examples (model_spec.md §6, tasks_spec.md §1.4)."""
import numpy as np
import paddle
import pytest

from vilbert.metrics import rec_loss, rec_select, vqa_loss, vqa_score

# 2 expressions x 3 regions, shaped [B, R, 1] like the model's vision_logit.
# sample 0: region 2 is padding (logit -1e4); region 0 wins with IoU 0.6 -> correct
# sample 1: region 1 wins with IoU exactly 0.5 -> wrong (strict > 0.5), although region 2 has IoU 0.9
LOGITS = [[2.0, 0.0, -10000.0], [0.0, 1.0, -1.0]]
TARGET = [[0.6, 0.0, 0.0], [0.0, 0.5, 0.9]]


def _tensor(rows, dtype='float32'):
    return paddle.to_tensor(np.array(rows, dtype=dtype)[:, :, None])


def test_rec_loss_hand_worked():
    # per entry max(x,0) - x*y + log(1 + exp(-|x|)):
    #   (2, .6): 0.8 + log(1+e^-2) = 0.9269280   (0, 0): log 2 = 0.6931472   (-1e4, 0): 0
    #   (0, 0):  0.6931472   (1, .5): 0.5 + log(1+e^-1) = 0.8132617   (-1, .9): 0.9 + log(1+e^-1) = 1.2132617
    # sum 4.3397457; mean over the 6 entries x 3 regions = sum / 2 expressions = 2.1698729
    loss = rec_loss(_tensor(LOGITS), _tensor(TARGET))
    assert loss.shape == [] and loss.dtype == paddle.float32
    assert float(loss) == pytest.approx(2.1698728736, rel=1e-6)


def test_rec_loss_gradient_is_per_expression():
    # d loss / d x = (sigmoid(x) - y) / B: the x regions cancels the 1 / (B R) of the mean
    logits = _tensor(LOGITS)
    logits.stop_gradient = False
    rec_loss(logits, _tensor(TARGET)).backward()
    grad = logits.grad.numpy()[:, :, 0]
    assert grad[0, 1] == pytest.approx(0.25, rel=1e-6)             # (0.5 - 0) / 2
    assert grad[0, 0] == pytest.approx(0.1403985390, rel=1e-6)     # (sigmoid(2) - 0.6) / 2
    assert grad[1, 2] == pytest.approx(-0.3155292893, rel=1e-6)    # (sigmoid(-1) - 0.9) / 2
    assert grad[0, 2] == 0.0                                       # padding: sigmoid(-1e4) = 0


def test_rec_loss_ignores_extra_padding_regions():
    padded_logits = [row + [-10000.0] * 4 for row in LOGITS]
    padded_target = [row + [0.0] * 4 for row in TARGET]
    assert float(rec_loss(_tensor(padded_logits), _tensor(padded_target))) == pytest.approx(
        float(rec_loss(_tensor(LOGITS), _tensor(TARGET))), rel=1e-6)


def test_rec_loss_is_float32_for_half_inputs():
    loss = rec_loss(_tensor(LOGITS, 'float16'), _tensor(TARGET, 'float16'))
    assert loss.dtype == paddle.float32
    assert float(loss) == pytest.approx(2.1698728736, rel=1e-3)  # fp16 targets: 0.6 and 0.9 are rounded


def test_rec_select_hand_worked():
    index, iou, correct = rec_select(_tensor(LOGITS), _tensor(TARGET))
    assert index.dtype == paddle.int64 and iou.dtype == paddle.float32 and correct.dtype == paddle.bool
    assert index.numpy().tolist() == [0, 1]
    np.testing.assert_allclose(iou.numpy(), [0.6, 0.5], rtol=1e-7)
    assert correct.numpy().tolist() == [True, False]                # IoU exactly 0.5 counts as wrong


def test_rec_select_never_picks_padding_and_breaks_ties_low():
    logits = [[-5.0, -7.0, -10000.0], [3.0, 3.0, 1.0]]
    target = [[0.2, 0.9, 1.0], [0.7, 0.1, 0.0]]
    index, iou, correct = rec_select(_tensor(logits), _tensor(target))
    assert index.numpy().tolist() == [0, 0]
    assert correct.numpy().tolist() == [False, True]


@pytest.mark.parametrize('fn', [rec_loss, rec_select])
def test_shapes_are_checked(fn):
    with pytest.raises(ValueError, match=r'\[batch, regions, 1\]'):
        fn(paddle.to_tensor(LOGITS), paddle.to_tensor(TARGET))
    with pytest.raises(ValueError, match=r'\[batch, regions, 1\]'):
        fn(_tensor(LOGITS), _tensor([row[:2] for row in TARGET]))


# VQA: the same 2 x 3 numbers as answer logits [B, num_labels] against soft targets
def test_vqa_loss_is_the_rec_sum_over_answers():
    logits, target = np.array(LOGITS, np.float32), np.array(TARGET, np.float32)
    loss = vqa_loss(paddle.to_tensor(logits), paddle.to_tensor(target))
    # BCEWithLogits mean over the 2 x 3 entries, times 3 answers: the hand-worked sum above over 2 questions
    assert loss.shape == [] and float(loss) == pytest.approx(2.1698728736, rel=1e-6)


def test_vqa_score_is_the_target_of_the_argmax_answer():
    logits = paddle.to_tensor(np.array([[0.1, 3.0, 2.0], [5.0, 5.0, -1.0]], np.float32))
    target = paddle.to_tensor(np.array([[1.0, 0.3, 0.9], [0.6, 1.0, 0.0]], np.float32))
    # question 0 picks answer 1 (score 0.3, though answer 0 was worth 1); question 1 ties and takes answer 0
    np.testing.assert_allclose(vqa_score(logits, target).numpy(), [0.3, 0.6])
    with pytest.raises(ValueError, match="vil_prediction and target must both be"):
        vqa_score(logits, target[:, :2])
