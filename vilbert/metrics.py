"""The official losses and scores: RefCOCO+ (task type "V-logit") and VQA ("VL-classifier") of vilbert_beta /
12-in-1 ``task_utils.py``.

Both codebases score a referring expression as correct when the region with the highest ``vision_logit`` has IoU
STRICTLY above 0.5 with the referred box; the global whole-image region is a candidate like any other. Padded
regions carry logit -1e4, so they are never chosen and add ~0 to the loss.
"""
import paddle
import paddle.nn.functional as F


def _check_shapes(vision_logit, target):
    if len(vision_logit.shape) != 3 or vision_logit.shape[2] != 1 or vision_logit.shape != target.shape:
        raise ValueError(f"vision_logit and target must both be [batch, regions, 1]; got {vision_logit.shape} "
                         f"and {target.shape}")


def bce_sum_loss(logit, target):
    """``BCEWithLogits`` averaged over all entries, times ``target.shape[1]``: the official loss of REC (over
    regions) and VQA (over answers), i.e. "sum over dim 1, mean over samples" (padding included).

    Computed in float32 even under autocast, as the official loss is: the mean runs over B x R terms.
    Written as torch computes it, ``(1-y)*x + log(1+exp(-x))``, rather than with
    ``F.binary_cross_entropy_with_logits``, whose gradient at a logit of exactly 0 is wrong in Paddle 3.3
    (-0.5 - y instead of 0.5 - y).
    """
    with paddle.amp.auto_cast(enable=False):
        logit, target = logit.astype('float32'), target.astype('float32')
        loss = ((1.0 - target) * logit + F.softplus(-logit)).mean()
    return loss * target.shape[1]


def rec_loss(vision_logit, target):
    """The REC loss: `bce_sum_loss` over the regions of [B, R, 1] logits and IoU targets."""
    _check_shapes(vision_logit, target)
    return bce_sum_loss(vision_logit, target)


def rec_select(vision_logit, target):
    """The chosen region per expression, its IoU with the referred box, and whether that IoU is above 0.5.

    Returns ``(select_idx int64 [B], select_iou float32 [B], correct bool [B])``. Ties go to the lowest index.
    """
    _check_shapes(vision_logit, target)
    select_idx = paddle.argmax(vision_logit.squeeze(2), axis=1)
    select_iou = paddle.take_along_axis(target.squeeze(2).astype('float32'), select_idx.unsqueeze(1),
                                        axis=1).squeeze(1)
    return select_idx, select_iou, select_iou > 0.5


def vqa_loss(vil_prediction, target):
    """The VQA loss: `bce_sum_loss` of [B, num_labels] logits against the soft targets (beta task_utils.py
    ForwardModelsTrain: ``loss.mean() * target.size(1)``)."""
    _check_answers(vil_prediction, target)
    return bce_sum_loss(vil_prediction, target)


def vqa_score(vil_prediction, target):
    """The soft score [B] of each question's argmax answer (``compute_score_with_logits``): 0, 0.3, 0.6, 0.9 or 1
    with the cached targets. Ties go to the lowest index, as torch.max does on CPU."""
    _check_answers(vil_prediction, target)
    chosen = paddle.argmax(vil_prediction, axis=1)
    return paddle.take_along_axis(target.astype('float32'), chosen.unsqueeze(1), axis=1).squeeze(1)


def _check_answers(vil_prediction, target):
    if len(vil_prediction.shape) != 2 or vil_prediction.shape != target.shape:
        raise ValueError(f"vil_prediction and target must both be [batch, num_labels]; got {vil_prediction.shape} "
                         f"and {target.shape}")
