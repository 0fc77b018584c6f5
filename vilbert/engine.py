"""Batches, the training epoch and evaluation, written once for every task (`vilbert/tasks`).

A task gives the model output its loss reads, the loss, the per-sample score and the predictions; the official
ones for each (`vilbert/metrics.py`). Two things differ from the official loop on purpose, and neither changes
a number: batches are padded only to the most regions and tokens any of their samples uses (`dataset.collate`,
the datasets' `batch`), and evaluation counts every sample once, also over several devices (no sampler padding).
"""

import itertools
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import paddle
import paddle.distributed as dist

from .dataset import collate
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
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate over `epoch`'s order, leaving out this rank's first `skip` micro-batches (done before a stop)."""
        self.epoch, self.skip = epoch, skip

    def _order(self) -> np.ndarray:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples) if self.shuffle
                 else np.arange(self.num_samples))
        padded = math.ceil(self.num_samples / self.parts) * self.parts
        return np.resize(order, padded)  # wraps around

    def __iter__(self):
        return itertools.islice(self._micro_batches(), self.skip, None)

    def _micro_batches(self):
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


def forward(model, batch: Dict[str, paddle.Tensor], task, amp: str = "off", task_id: int = 0):
    """Runs the model on a batch; returns (the task's loss, the output it reads, in float32)."""
    inputs = task.model_inputs(batch)
    with autocast(amp):
        output = model(*(inputs[k] for k in MODEL_INPUTS), task_ids=task_ids_for(inputs, task_id, model))
    logit = task.logit(output, batch)
    return task.loss(logit, batch), logit


def task_ids_for(batch, task_id: int, model) -> "paddle.Tensor | None":
    """[B, 1] task-token ids for 12-in-1 models built with task tokens, else None."""
    config = getattr(model, "config", None) or model._layers.config
    if not config.task_specific_tokens:
        return None
    return paddle.full([batch["input_ids"].shape[0], 1], task_id, dtype="int64")


def step_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of one micro-step's dropout on this rank: a function of the step's place in the run, so a run
    resumed at any step draws the masks the uninterrupted run drew."""
    return int(np.random.SeedSequence([seed, epoch, step, dist.get_rank()]).generate_state(1)[0])


def train_one_epoch(model, loader, optimizer, *, task, epoch: int, seed: int = 0, start: int = 0,
                    sums=(0.0, 0.0, 0), after_update=None, amp: str = "off", accumulation: int = 1,
                    task_id: int = 0, scaler=None, show_progress: bool = True):
    """One pass over the loader, which resumes the epoch at update `start` (its sampler leaves out the micro-batches
    before: `EpochBatchSampler.set_epoch`); returns (mean train loss, mean train score) over all ranks' samples.
    `sums` are this rank's (loss, score, samples) totals of the updates before `start`; after each update,
    `after_update(updates done, sums)` runs (the fit loop saves there)."""
    model.train()
    first = start * accumulation
    total_loss, correct, seen = sums
    bar = progress(loader, f"Epoch {epoch}", enabled=show_progress, initial=first)
    for step, batch in enumerate(bar, first):
        paddle.seed(step_seed(seed, epoch, step))
        batch = prepare(batch)
        last_micro = (step + 1) % accumulation == 0 or step + 1 == len(loader)
        sync = model.no_sync() if hasattr(model, "no_sync") and not last_micro else nullcontext()
        with sync:
            loss, logit = forward(model, batch, task, amp, task_id)
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"training loss is {loss_value} at epoch {epoch}, step {step} ({task.id_key}s "
                    f"{batch[task.id_key][:8].tolist()}...); the last good checkpoint is kept. Lower "
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
        size = batch[task.id_key].shape[0]
        total_loss += loss_value * size
        correct += float(task.scores(logit, batch).sum())
        seen += size
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", **{task.metric[:5]: f"{correct / seen:.4f}"})
        if last_micro and after_update:
            after_update(math.ceil((step + 1) / accumulation), (total_loss, correct, seen))
    if dist.get_world_size() > 1:
        sums = paddle.to_tensor([total_loss, correct, seen], dtype="float64")
        dist.all_reduce(sums)
        total_loss, correct, seen = sums.tolist()
    return total_loss / max(seen, 1), correct / max(seen, 1)


@dataclass
class EvalResult:
    summary: Dict[str, float]  # the task's figures (its `metric` among them)
    loss: float
    count: int  # samples evaluated
    predictions: List[dict]

    def metric(self, task) -> float:
        return self.summary[task.metric]


@paddle.no_grad()
def evaluate(model, loader, *, task, amp: str = "off", task_id: int = 0, show_progress: bool = False,
             desc: str = "eval") -> EvalResult:
    """The task's predictions and figures over every sample exactly once, gathered from all ranks when
    distributed; predictions sorted by the task's sample id."""
    model.eval()
    predictions, loss_sum = [], 0.0
    for batch in progress(loader, desc, enabled=show_progress):
        batch = prepare(batch)
        loss, logit = forward(model, batch, task, amp, task_id)
        batch_predictions = task.predictions(logit, batch, loader.dataset)
        loss_sum += float(loss) * len(batch_predictions)
        predictions += batch_predictions
    loss_sum, predictions = _gather(loss_sum, predictions)
    return EvalResult(summary=task.summarize(predictions), loss=loss_sum / max(len(predictions), 1),
                      count=len(predictions), predictions=sorted(predictions, key=task.sort_key))


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
    kept = min(regions.num_boxes, max_region_num)
    logits = score_queries(model, [(regions, input_ids)], max_region_num, "vision_logit", task_id)[0]
    return logits[:kept, 0], regions.boxes[:kept]


@paddle.no_grad()
def score_queries(model, queries, max_region_num: int, head: str, task_id: int = 0) -> List[np.ndarray]:
    """The model's output `head` for every (RegionFeatures, token ids) query, run as one batch padded by `collate`:
    per query an array in float32 (vision_logit: [the batch's most regions, 1], rows past the query's own
    regions padding; vil_prediction: [num_labels])."""
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
    result = model(*(batch[k] for k in MODEL_INPUTS), task_ids=task_ids_for(batch, task_id, model))
    return list(getattr(result, head).astype("float32").numpy())
