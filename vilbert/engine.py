"""Batches, the training epoch and evaluation for referring expressions.

The loss and score are the official ones (`vilbert/metrics.py`). Two things differ from the official loop
on purpose, and neither changes a number: batches are padded only to the most regions and tokens any of
their samples uses (`dataset.collate`), and evaluation counts every expression once, also over several
devices (no sampler padding).
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import paddle
import paddle.distributed as dist

from .dataset import collate
from .metrics import rec_loss, rec_select
from .progress import progress

MODEL_INPUTS = ("input_ids", "features", "spatials", "segment_ids", "input_mask", "image_mask", "co_attention_mask")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the last good checkpoint is left untouched."""


class EpochBatchSampler(paddle.io.Sampler):
    """Yields this rank's micro-batches of index lists, in an order fixed by (seed, epoch).

    Every global batch of `global_batch` samples is split into `world_size * accumulation` equal
    micro-batches, so N devices with accumulation see exactly the samples one device would. With more than
    one micro-batch per global batch the shuffled order is padded by wrapping around to a multiple of their
    count (as a distributed sampler does), so every rank runs the same number of steps.
    """

    def __init__(self, num_samples: int, global_batch: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, accumulation: int = 1):
        self.num_samples, self.global_batch = num_samples, global_batch
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.parts = world_size * accumulation
        self.micro_batch = global_batch // self.parts  # samples per step of a full global batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples) if self.shuffle
                 else np.arange(self.num_samples))
        padded = math.ceil(self.num_samples / self.parts) * self.parts
        return np.resize(order, padded)  # wraps around

    def __iter__(self):
        order = self._order()
        for start in range(0, len(order), self.global_batch):
            chunk = order[start:start + self.global_batch]
            micro = len(chunk) // self.parts
            for part in range(self.rank, self.parts, self.world_size):
                # consecutive micro-batches of one global batch go to rank 0, 1, ..., then again
                yield chunk[part * micro:(part + 1) * micro].tolist()

    def __len__(self):
        return math.ceil(len(self._order()) / self.global_batch) * (self.parts // self.world_size)


def prepare(batch: Dict[str, paddle.Tensor]) -> Dict[str, paddle.Tensor]:
    """A loader batch on the current device; float16 cached features are cast once here."""
    on_gpu = paddle.device.get_device().startswith("gpu")
    batch = {k: v.cuda() if on_gpu and not v.place.is_gpu_place() else v for k, v in batch.items()}
    batch["features"] = batch["features"].astype("float32")
    return batch


def autocast(amp: str):
    return paddle.amp.auto_cast(enable=amp != "off", dtype="bfloat16" if amp == "bf16" else "float16", level="O1")


def forward(model, batch: Dict[str, paddle.Tensor], amp: str = "off", task_ids=None):
    """Runs the model on a batch; returns (loss, vision_logit [B, N, 1] in float32)."""
    with autocast(amp):
        output = model(*(batch[k] for k in MODEL_INPUTS), task_ids=task_ids)
    logit = output.vision_logit.astype("float32")
    return rec_loss(logit, batch["target"]), logit


def task_ids_for(batch, task_id: int, model) -> "paddle.Tensor | None":
    """[B, 1] task-token ids for 12-in-1 models built with task tokens, else None."""
    config = getattr(model, "config", None) or model._layers.config
    if not config.task_specific_tokens:
        return None
    return paddle.full([batch["input_ids"].shape[0], 1], task_id, dtype="int64")


def train_one_epoch(model, loader, optimizer, *, epoch: int, amp: str = "off", accumulation: int = 1,
                    task_id: int = 0, scaler=None, show_progress: bool = True):
    """One pass over the loader; returns (mean train loss, train accuracy) over all ranks' samples."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = progress(loader, f"Epoch {epoch}", enabled=show_progress)
    for step, batch in enumerate(bar):
        batch = prepare(batch)
        last_micro = (step + 1) % accumulation == 0 or step + 1 == len(loader)
        sync = model.no_sync() if hasattr(model, "no_sync") and not last_micro else nullcontext()
        with sync:
            loss, logit = forward(model, batch, amp, task_ids_for(batch, task_id, model))
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"training loss is {loss_value} at epoch {epoch}, step {step} (sent_ids "
                    f"{batch['sent_id'][:8].tolist()}...); the last good checkpoint is kept. Lower "
                    f"--learning_rate, or try --amp off if mixed precision is on.")
            scaled = loss / accumulation
            (scaler.scale(scaled) if scaler else scaled).backward()
        if last_micro:
            if scaler:
                scaler.step(optimizer)  # unscales, then updates unless a gradient is inf/nan
                scaler.update()  # lowers the scale after a skipped step, raises it after a run of good ones
            else:
                optimizer.step()
            optimizer.clear_grad()
        size = batch["sent_id"].shape[0]
        total_loss += loss_value * size
        correct += int(rec_select(logit, batch["target"])[2].astype("int64").sum())
        seen += size
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
    if dist.get_world_size() > 1:
        sums = paddle.to_tensor([total_loss, correct, seen], dtype="float64")
        dist.all_reduce(sums)
        total_loss, correct, seen = sums.tolist()
    return total_loss / max(seen, 1), correct / max(seen, 1)


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    num_expressions: int
    upper_bound: float  # fraction of expressions with any candidate box at IoU > 0.5
    predictions: List[dict]


@paddle.no_grad()
def evaluate(model, loader, *, amp: str = "off", task_id: int = 0, show_progress: bool = False,
             desc: str = "eval") -> EvalResult:
    """Accuracy = the chosen region's IoU target > 0.5 (strict), over every expression exactly once,
    summed over all ranks when distributed."""
    model.eval()
    predictions, loss_sum = [], 0.0
    for batch in progress(loader, desc, enabled=show_progress):
        batch = prepare(batch)
        loss, logit = forward(model, batch, amp, task_ids_for(batch, task_id, model))
        index, iou, correct = (t.numpy() for t in rec_select(logit, batch["target"]))
        scores = logit.squeeze(2).numpy()
        loss_sum += float(loss) * len(index)
        reachable = (batch["target"].squeeze(2) > 0.5).any(1).numpy()
        ids = {k: batch[k].numpy() for k in ("sent_id", "ref_id", "image_id", "boxes")}
        for i, chosen in enumerate(index):
            predictions.append({
                "sent_id": int(ids["sent_id"][i]), "ref_id": int(ids["ref_id"][i]),
                "image_id": int(ids["image_id"][i]), "box": [round(float(v), 2) for v in ids["boxes"][i, chosen]],
                "region": int(chosen), "score": float(scores[i, chosen]), "iou": float(iou[i]),
                "correct": bool(correct[i]), "reachable": bool(reachable[i]),
            })
    loss_sum, predictions = _gather(loss_sum, predictions)
    n = len(predictions)
    return EvalResult(
        accuracy=sum(p["correct"] for p in predictions) / max(n, 1), loss=loss_sum / max(n, 1),
        num_expressions=n, upper_bound=sum(p["reachable"] for p in predictions) / max(n, 1),
        predictions=sorted(predictions, key=lambda p: p["sent_id"]))


def _gather(loss_sum: float, predictions: List[dict]):
    """All ranks' predictions and loss sums, so accuracy is exact over the whole split."""
    if dist.get_world_size() == 1:
        return loss_sum, predictions
    gathered: list = []
    dist.all_gather_object(gathered, (loss_sum, predictions))
    return sum(g[0] for g in gathered), [p for g in gathered for p in g[1]]



@paddle.no_grad()
def score_regions(model, regions, input_ids: List[int], max_region_num: int, task_id: int = 0):
    """Logits [R] and pixel boxes [R, 4] of one image's first `max_region_num` regions (a `RegionFeatures`)
    for one tokenized expression: what predict.py prints and eval.py's pictures show."""
    return score_expressions(model, [(regions, input_ids)], max_region_num, task_id)[0]


@paddle.no_grad()
def score_expressions(model, queries, max_region_num: int, task_id: int = 0):
    """`score_regions` of every (RegionFeatures, token ids) query, run as one batch padded by `collate`."""
    model.eval()
    length = max(len(input_ids) for _, input_ids in queries)
    samples = []
    for regions, input_ids in queries:
        kept = min(regions.num_boxes, max_region_num)
        samples.append({
            "features": regions.features[:kept], "spatials": regions.spatials[:kept],
            "image_mask": np.ones(kept, np.int64),
            "input_ids": np.pad(np.asarray(input_ids, np.int64), (0, length - len(input_ids))),
            "input_mask": (np.arange(length) < len(input_ids)).astype(np.int64),
            "segment_ids": np.zeros(length, np.int64)})
    batch = prepare({key: paddle.to_tensor(value) for key, value in collate(samples).items()})
    output = model(*(batch[k] for k in MODEL_INPUTS), task_ids=task_ids_for(batch, task_id, model))
    logits = output.vision_logit[:, :, 0].astype("float32").numpy()
    return [(logits[i, :len(sample["image_mask"])], regions.boxes[:len(sample["image_mask"])])
            for i, (sample, (regions, _)) in enumerate(zip(samples, queries))]
