"""What train.py and eval.py build from the options: task, datasets, loaders, model; and the fit loop, one for
every task (`vilbert/tasks`).

A run directory (`<output_dir>/<save_name>/`) holds everything a run writes: `config.yaml` (the resolved
options), `metrics.jsonl` (one line per epoch), `curves.png`, `last.pdparams` (resumable: model, optimizer,
epoch, best accuracy, options; and where in the next epoch, if it was saved within one) and `best.pdparams`
(model weights of the best validation epoch). `last.pdparams` is written at the end of every epoch, every
--save_every_minutes within one, and when SIGINT or SIGTERM stop the run (`vilbert/interruption.py`). Dropout is
seeded from (seed, epoch, step, rank) at every step, so a run resumed at any update continues exactly as if it had
never stopped.
"""

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import os
import random
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import paddle
import paddle.distributed as dist

from pyutils.refer import AnnotationError

from .checkpoint import CheckpointError, load_pretrained, read_training_state, save_checkpoint
from .config import ConfigError, ViLBertConfig
from .engine import EpochBatchSampler, NonFiniteLossError, evaluate, train_one_epoch
from .features import FeaturesError, ImageNotInFeatures
from .fileio import NO_LOCKS, atomic_path, atomic_write, remove_stale_temporaries
from .interruption import SaveClock, Stopped
from .loader import BatchLoader
from .model import VILBertForVLTasks, ViLBertOutput
from .optimization import BertAdam, build_param_groups, describe_param_groups
from .options import OptionsError, RunOptions, resolve_device
from .refer_datasets import UnknownSplitError
from .storage import EndpointUnreachable, localize
from .tasks import get_task
from .tokenization import BertTokenizer, VocabError
from .vqa_data import VQADataError


class OutOfMemoryError(MemoryError):
    """A training or evaluation step did not fit in memory; the message names the flag that makes it smaller."""


# What the user can fix (paths, downloads, configs, flags, checkpoints, a diverging or too large run): the
# entry scripts report these as one line instead of a traceback.
USER_ERRORS = (FileNotFoundError, PermissionError, OptionsError, ConfigError, CheckpointError, FeaturesError,
               ImageNotInFeatures, NonFiniteLossError, OutOfMemoryError, AnnotationError, UnknownSplitError,
               VQADataError, EndpointUnreachable, VocabError)


@contextlib.contextmanager
def exit_on_user_error():
    """Turns a `USER_ERRORS` exception into `SystemExit` with its message (what an entry script prints), and so a
    full or read-only disk, the error of a collective that lost a rank (`lost_rank_message`), a run stopped by a
    signal (its exit status: 128 + the signal's number) and Ctrl-C."""
    try:
        yield
    except USER_ERRORS as error:
        raise SystemExit(f"error: {error}") from None
    except Stopped as stopped:
        print(stopped, file=sys.stderr, flush=True)
        raise SystemExit(stopped.code) from None
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): stopped at once; what was saved before is intact (train.py: --resume auto "
              "continues from the last checkpoint)", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None
    except (RuntimeError, OSError) as error:
        message = _full_disk_message(error) or lost_rank_message(error)
        if message is None:
            raise
        raise SystemExit(f"error: {message}") from None


def _full_disk_message(error: BaseException) -> "str | None":
    if not isinstance(error, OSError) or error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return None
    return (f"cannot write {error.filename or 'a file'}: {error.strerror}; free some space or write elsewhere "
            f"(what was written before is intact: every file is written whole or not at all)")

# The backends named by the error of a collective whose peer is gone: gloo's RuntimeError ("Connection reset by
# peer" when a process dies, "TIMEOUT" when it stops answering), NCCL's (OSError, Paddle's ExternalError).
_COLLECTIVE_BACKENDS = ("gloo", "nccl")


def lost_rank_message(error: BaseException) -> "str | None":
    """The one line for a distributed run's collective that failed because another rank (a node, a process) or
    the network went away; None for any other error, which keeps its traceback."""
    if dist.get_world_size() == 1 or not any(name in str(error).lower() for name in _COLLECTIVE_BACKENDS):
        return None
    cause = (str(error).strip().splitlines() or [""])[0][:300]
    return (f"rank {dist.get_rank()} of {dist.get_world_size()} lost contact with another rank ({cause}): a node "
            f"or process stopped, or the network failed. Start every node's launcher again with the same command "
            f"(train.py: add --resume auto to continue from the last checkpoint)")


@contextlib.contextmanager
def out_of_memory_hint(advice: str):
    """Re-raises an out-of-memory error (Paddle raises MemoryError, on CPU and GPU) with `advice` added."""
    try:
        yield
    except MemoryError as error:
        raise OutOfMemoryError(f"out of memory ({str(error).splitlines()[0]}); {advice}") from error


def localize_paths(options: RunOptions) -> RunOptions:
    """The same options with s3:// data roots, feature folders and checkpoints mirrored into the local cache."""
    return dataclasses.replace(options, **{name: localize(getattr(options, name)) for name in (
        "dataroot", "features_h5path1", "features_h5path2", "features_test", "from_pretrained")})


def setup_device(options: RunOptions) -> str:
    """Select the device and, under `paddle.distributed.launch`, join the process group. With `deterministic` on a
    GPU, cuDNN and the embedding gradient use their deterministic kernels (CPU kernels already are)."""
    device = resolve_device(options.device)
    paddle.set_device(device)
    if options.deterministic and device == "gpu":
        paddle.set_flags({"FLAGS_cudnn_deterministic": True, "FLAGS_embedding_deterministic": 1})
    if dist.get_world_size() > 1:
        dist.init_parallel_env()
    return device


def is_main_process() -> bool:
    return dist.get_rank() == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def build_dataset(options: RunOptions, split: str, tokenizer: BertTokenizer):
    """The dataset of `split` for the options' task."""
    return get_task(options.task).build_dataset(options, split, tokenizer)


def train_loader(dataset, options: RunOptions) -> BatchLoader:
    """Shuffled micro-batches: global batch / (devices x accumulation) samples each."""
    world = dist.get_world_size()
    micro = options.batch_size // (world * options.gradient_accumulation_steps)
    if micro < 1 or micro * world * options.gradient_accumulation_steps != options.batch_size:
        raise OptionsError(f"--batch_size {options.batch_size} cannot be split over {world} device(s) x "
                           f"{options.gradient_accumulation_steps} accumulation steps; choose a multiple")
    sampler = EpochBatchSampler(len(dataset), options.batch_size, shuffle=True, seed=options.seed,
                                rank=dist.get_rank(), world_size=world,
                                accumulation=options.gradient_accumulation_steps)
    return BatchLoader(dataset, sampler, options.num_workers)


def eval_loader(dataset, options: RunOptions) -> BatchLoader:
    """Every sample exactly once: rank r takes samples r, r + world, ... (no padding)."""
    indices = list(range(dist.get_rank(), len(dataset), dist.get_world_size()))
    batches = [indices[i:i + options.eval_batch_size] for i in range(0, len(indices), options.eval_batch_size)]
    return BatchLoader(dataset, batches, options.num_workers)


def build_model(options: RunOptions, checkpoint: str = "", log=print) -> VILBertForVLTasks:
    """The model of `config_file` with the task's heads, with weights from `checkpoint` (else `from_pretrained`)
    when given."""
    model = VILBertForVLTasks(ViLBertConfig.from_json(options.config_file),
                              **get_task(options.task).model_heads(options))
    checkpoint = checkpoint or options.from_pretrained
    if checkpoint:
        load_pretrained(model, checkpoint)
        log(f"Loaded weights from {checkpoint}")
    else:
        log("Training from random initialisation (no --from_pretrained given).")
    return model


class TaskOutputDataParallel(paddle.DataParallel):
    """DataParallel that traces the backward graph from the one output the task's loss reads (`output`).

    DataParallel looks for the output tensors in tensors, lists, tuples and dicts only, so the model's
    `ViLBertOutput` would look like no output at all (every gradient then fails as "ready before"); and
    tracing from all its fields would wait forever for the gradients of parameters the loss never reaches
    (for REC the poolers and the text side of the last co-attention layer; the official code runs apex DDP,
    which skips them).
    """

    def __init__(self, model, output: str):
        super().__init__(model, find_unused_parameters=True)
        self.output = output

    def _find_tensor(self, obj):
        return [getattr(obj, self.output)] if isinstance(obj, ViLBertOutput) else super()._find_tensor(obj)


def build_optimizer(model, options: RunOptions, steps_per_epoch: int) -> BertAdam:
    groups = build_param_groups(model.named_parameters(), base_lr=options.learning_rate,
                                head_lr=options.head_learning_rate, head_patterns=options.head_patterns,
                                weight_decay=options.weight_decay, decay_patterns=options.decay_patterns)
    return BertAdam(groups, warmup=options.warmup_proportion, t_total=steps_per_epoch * options.num_train_epochs,
                    eps=options.adam_epsilon, max_grad_norm=options.max_grad_norm,
                    milestones=options.lr_milestones, gamma=options.lr_gamma), groups


def build_grad_scaler(amp: str) -> "paddle.amp.GradScaler | None":
    """fp16 needs loss scaling (bf16 has fp32's range and does not). Dynamic, as torch's and apex's scalers: a step
    with an inf/nan gradient is skipped and the scale halved; after 1000 good steps in a row it doubles."""
    if amp != "fp16":
        return None
    return paddle.amp.GradScaler(init_loss_scaling=2.0 ** 15, incr_ratio=2.0, decr_ratio=0.5, incr_every_n_steps=1000,
                                 decr_every_n_nan_or_inf=1)


def fit(options: RunOptions) -> dict:
    """Fine-tune, evaluate every epoch, keep the best and the last checkpoint; returns the last metrics."""
    device = setup_device(options)
    options = localize_paths(options)
    with claimed_run_dir(options):
        return _fit(options, device)


# What a run writes into its directory: a directory holding any of these holds a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "curves.png", "last.pdparams", "best.pdparams")


@contextlib.contextmanager
def claimed_run_dir(options: RunOptions):
    """The run directory, held by this run: rank 0 locks it for the whole run (a second run into it is refused at
    once, not after its data is loaded), refuses to start over a run there unless told to resume it or to
    --overwrite it, and removes the temporary files of killed runs. Every rank stops on rank 0's refusal."""
    run_dir, problem = options.run_dir, None
    with contextlib.ExitStack() as held:
        if is_main_process():
            try:
                problem = _claim(run_dir, options, held)
            except OSError as error:
                problem = (f"--output_dir {options.output_dir}: cannot write the run directory {run_dir} "
                           f"({error.strerror or error}); choose a writable folder")
        if dist.get_world_size() > 1:
            problems: list = []
            dist.all_gather_object(problems, problem)
            problem = problems[0]
        if problem:
            raise OptionsError(problem)
        yield


def _claim(run_dir: Path, options: RunOptions, held: contextlib.ExitStack) -> "str | None":
    """Rank 0's part of `claimed_run_dir`: the reason it cannot have the directory, or None once it holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = held.enter_context(open(run_dir / ".run.lock", "a+"))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        return (f"{run_dir} is in use by another run (pid {holder}); wait for it to end, or give this one another "
                f"--save_name")
    except OSError as error:
        if error.errno not in NO_LOCKS:
            raise
        print(f"Note: {run_dir} has no file locks ({error.strerror}): nothing stops a second run into it", flush=True)
    lock.truncate(0)
    lock.write(f"{os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if present and not options.resume:
        if not options.overwrite:
            epochs = len(_read_history(run_dir / "metrics.jsonl", before=10 ** 9))
            return (f"{run_dir} holds a run ({epochs} epoch(s) in metrics.jsonl; {', '.join(present)}): continue it "
                    f"with --resume auto, give this one another --save_name, or start over with --overwrite")
        for name in present:
            (run_dir / name).unlink()
        print(f"Starting over in {run_dir} (--overwrite): removed {', '.join(present)}", flush=True)
    stale = remove_stale_temporaries(run_dir)
    if stale:
        print(f"Removed {len(stale)} temporary file(s) of a killed run from {run_dir}: {', '.join(stale)}", flush=True)
    return None


def _fit(options: RunOptions, device: str) -> dict:
    main = is_main_process()
    log = functools.partial(print, flush=True) if main else (lambda *a, **k: None)  # flushed: logs go to files
    task = get_task(options.task)
    seed_everything(options.seed)
    run_dir = options.run_dir
    tokenizer = BertTokenizer(options.bert_model)
    train_set = build_dataset(options, options.train_split, tokenizer)
    val_set = build_dataset(options, options.val_split, tokenizer)
    train_batches, val_batches = train_loader(train_set, options), eval_loader(val_set, options)

    resume_path = _resume_path(options)
    model = build_model(options, checkpoint="" if resume_path else options.from_pretrained, log=log)
    steps_per_epoch = len(train_batches) // options.gradient_accumulation_steps
    micro = train_batches.batch_sampler.micro_batch
    optimizer, groups = build_optimizer(model, options, steps_per_epoch)
    log(f"Device: {device} x {dist.get_world_size()}; {len(train_set)} train / {len(val_set)} val {task.unit}; "
        f"batch {options.batch_size} = {dist.get_world_size()} device(s) x "
        f"{options.gradient_accumulation_steps} step(s) x {micro}; "
        f"{steps_per_epoch} steps/epoch")
    log(describe_param_groups(groups))

    scaler = build_grad_scaler(options.amp)  # weights stay fp32 under O1 autocast
    metric = f"val_{task.metric}"
    start_epoch, best, within = 0, {metric: -1.0, "epoch": -1}, {}
    if resume_path:
        state = read_training_state(resume_path)
        start_epoch, best, within = state["epoch"] + 1, state["best"], state.get("within_epoch") or {}
        _check_recipe(state.get("options", {}), options, start_epoch, resume_path, log)
        model.set_state_dict(state["model"])
        optimizer.set_state_dict(state["optimizer"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        at_step = f", update {within['updates']} of {steps_per_epoch}" if within else ""
        log(f"Resumed from {resume_path}: continuing at epoch {start_epoch}{at_step}")
    _check_every_rank_starts_at((start_epoch, within.get("updates", 0)), options)
    if main:  # the run directory exists: claimed_run_dir made it
        atomic_write(run_dir / "config.yaml", options.to_yaml())
    network = TaskOutputDataParallel(model, task.output) if dist.get_world_size() > 1 else model
    if options.amp != "off" and device == "cpu":
        log(f"Note: --amp {options.amp} has no effect on CPU: Paddle's autocast only acts on GPU (and XPU) devices.")
        warnings.filterwarnings("ignore", message="amp_guard can only be enabled")

    clock = SaveClock(options.save_every_minutes)

    def save(epoch_done: int, within_epoch: "dict | None" = None) -> None:
        """last.pdparams: resumable after `epoch_done`, or within the epoch after it (`within_epoch`)."""
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler else {}, "epoch": epoch_done, "best": best,
                 "options": dataclasses.asdict(options)}
        if within_epoch:
            state["within_epoch"] = within_epoch
        save_checkpoint(state, run_dir / "last.pdparams")
        clock.saved()

    def after_update(epoch: int, started: float, updates: int, sums: tuple) -> None:
        save_now, stop = clock.due()
        if save_now:
            ranks_sums: list = []
            if dist.get_world_size() > 1:
                dist.all_gather_object(ranks_sums, sums)
            if main:
                save(epoch - 1, {"updates": updates, "sums": ranks_sums or [sums],
                                 "seconds": time.time() - started})
        if stop:
            raise Stopped(f"stopped by {signal.Signals(stop).name} at epoch {epoch}, update {updates} of "
                          f"{steps_per_epoch}: {run_dir / 'last.pdparams'} holds it; continue with --resume auto",
                          stop)

    history = _read_history(run_dir / "metrics.jsonl", before=start_epoch) if main else []
    metrics = {}
    with clock.catching_signals():
        for epoch in range(start_epoch, options.num_train_epochs):
            start = within.get("updates", 0)  # > 0: resumed within this epoch
            optimizer.set_epoch(epoch)
            train_batches.batch_sampler.set_epoch(epoch, skip=start * options.gradient_accumulation_steps)
            started = time.time() - within.get("seconds", 0.0)
            sums = _rank_sums(within.get("sums"))
            with out_of_memory_hint(f"each step holds {micro} sample(s) per device: raise "
                                    f"--gradient_accumulation_steps (now {options.gradient_accumulation_steps}) to "
                                    f"split every batch of {options.batch_size} into smaller steps with the same "
                                    f"result"):
                train_loss, train_score = train_one_epoch(
                    network, train_batches, optimizer, task=task, epoch=epoch, seed=options.seed,
                    start=start, sums=sums,
                    after_update=functools.partial(after_update, epoch, started), amp=options.amp,
                    accumulation=options.gradient_accumulation_steps, task_id=options.task_id, scaler=scaler,
                    show_progress=main)
            within = {}
            with out_of_memory_hint(f"lower --eval_batch_size (now {options.eval_batch_size})"):
                result = evaluate(model, val_batches, task=task, amp=options.amp, task_id=options.task_id)
            value = result.metric(task)
            metrics = {"epoch": epoch, "train_loss": train_loss, f"train_{task.metric}": train_score,
                       "val_loss": result.loss, metric: value, "lr": optimizer.get_lr(),
                       "seconds": round(time.time() - started, 1)}
            log(f"Epoch {epoch} done! Train loss: {train_loss:.5f}, Val {task.metric}: {value:.4f}")
            if main:
                history.append(metrics)
                if value > best[metric]:
                    best = {metric: value, "epoch": epoch}
                    save_checkpoint(model.state_dict(), run_dir / "best.pdparams")
                atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
                plot_curves(history, run_dir / "curves.png", task)
                # last, as the commit point: a run killed before it redoes this epoch, with nothing of it missing
                save(epoch)
            _, stop = clock.due()  # a signal during the evaluation: the epoch is saved whole
            if stop and epoch + 1 < options.num_train_epochs:
                raise Stopped(f"stopped by {signal.Signals(stop).name} after epoch {epoch}: "
                              f"{run_dir / 'last.pdparams'} holds it; continue with --resume auto", stop)
    log(f"Best val {task.metric} {best[metric]:.4f} at epoch {best['epoch']}; checkpoints in {run_dir}")
    return metrics


def _rank_sums(saved: "list | None") -> tuple:
    """This rank's (loss, score, samples) totals of a resumed epoch's updates before the stop: its own if the
    run has as many ranks as the one that saved them, else all of them on rank 0 (the epoch's means stay exact)."""
    if not saved:
        return 0.0, 0.0, 0
    if len(saved) == dist.get_world_size():
        return tuple(saved[dist.get_rank()])
    return tuple(map(sum, zip(*saved))) if dist.get_rank() == 0 else (0.0, 0.0, 0)


def _resume_path(options: RunOptions):
    if not options.resume:
        return None
    path = options.run_dir / "last.pdparams" if options.resume == "auto" else Path(options.resume)
    if path.exists():
        return path
    if options.resume == "auto":
        return None  # nothing to resume yet: start fresh
    raise FileNotFoundError(f"--resume {path}: no such checkpoint (use --resume auto to start fresh if none)")


# What a resumed run must keep: the model, its inputs, the data splits and the optimizer's recipe. What may change:
# where things are, how batches are computed (devices, accumulation, workers, precision), and the epoch count.
RECIPE = ("task", "dataset", "train_split", "val_split", "max_seq_length", "max_region_num", "tokenization",
          "feature_extractor", "config_file", "task_id", "classifier", "batch_size", "learning_rate",
          "head_learning_rate", "head_patterns", "weight_decay", "decay_patterns", "warmup_proportion", "lr_milestones",
          "lr_gamma", "max_grad_norm", "adam_epsilon", "seed")


def _check_recipe(saved: dict, options: RunOptions, start_epoch: int, resume_path: Path, log) -> None:
    """Resuming continues the saved run: a changed recipe is refused (the result would be neither run), more epochs
    are announced (the schedule then spans them), fewer than those done are refused."""
    changed = [f"{key} {saved[key]!r} -> {getattr(options, key)!r}" for key in RECIPE
               if key in saved and saved[key] != getattr(options, key)]
    if changed:
        raise OptionsError(f"--resume {resume_path}: the run was trained with another recipe ({'; '.join(changed)}); "
                           f"resume it without those flags (its config.yaml has its own) or start a new run with "
                           f"another --save_name")
    planned = saved.get("num_train_epochs", options.num_train_epochs)
    if options.num_train_epochs < start_epoch:
        raise OptionsError(f"--num_train_epochs {options.num_train_epochs}: the run in {resume_path.parent} has "
                           f"trained {start_epoch} epochs already; give at least {start_epoch} (it was started with "
                           f"{planned})")
    if options.num_train_epochs != planned:
        log(f"Training {options.num_train_epochs} epochs instead of the {planned} the run was started with "
            f"(--num_train_epochs): its learning-rate schedule now spans {options.num_train_epochs}")


def _check_every_rank_starts_at(position: tuple, options: RunOptions) -> None:
    """Ranks that resumed from different checkpoints (a node that sees no run folder, or another one) would
    train different models under one name: stop them all with one line instead. `position`: (epoch, update)."""
    if dist.get_world_size() == 1:
        return
    starts: list = []
    dist.all_gather_object(starts, (tuple(position), socket.gethostname()))
    if len({start for start, _ in starts}) > 1:
        groups: dict = {}
        for rank, start in enumerate(starts):
            groups.setdefault(start, []).append(rank)
        where = "; ".join(f"{host}: {_ranks(ranks)} at epoch {epoch}" + (f" update {update}" if update else "")
                          for ((epoch, update), host), ranks in groups.items())
        raise OptionsError(f"--resume {options.resume}: the ranks start at different points ({where}), as they "
                           f"do not all see the same {options.run_dir}; put --output_dir on a filesystem every node "
                           f"shares, or copy the run folder to every node before resuming")


def _ranks(ranks: list) -> str:
    """'rank 3', 'ranks 8-15' (a node's ranks are consecutive), else 'ranks 1,4'."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    consecutive = ranks == list(range(ranks[0], ranks[-1] + 1))
    return f"ranks {ranks[0]}-{ranks[-1]}" if consecutive else f"ranks {','.join(map(str, ranks))}"


def _read_history(path: Path, before: int) -> list:
    if not path.exists():
        return []
    return [m for m in map(json.loads, path.read_text().splitlines()) if m["epoch"] < before]


def plot_curves(history: list, path: Path, task) -> None:
    """Loss and the task's metric per epoch, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in history], "o-", label="train")
    ax_loss.plot(epochs, [m["val_loss"] for m in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{task.title}: loss")
    ax_acc.plot(epochs, [m[f"train_{task.metric}"] for m in history], "o-", label="train")
    ax_acc.plot(epochs, [m[f"val_{task.metric}"] for m in history], "o-", label="val")
    ax_acc.set(xlabel="epoch", ylabel=task.metric, title=task.metric)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
