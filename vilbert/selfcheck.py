"""Is this machine ready for the long run? `python selfcheck.py` answers in about a minute.

Each check prints one line as it ends and a row in the closing table: PASS, FAIL, SKIP (does not apply here) or
INFO (a measurement); any FAIL makes the exit status 1. On a GPU the numerics run on the GPU; on a CPU machine the
same checks run on the CPU, and the real config's step at a small batch. The numerical checks are the ones
`tests/test_gpu.py` runs on a CUDA build, through the same functions.

- paddle: version (supported?), build, CUDA and cuDNN, device name and memory;
- parity: the task heads (`vision_logit`, beta's `vil_prediction`, `vil_logit`) of the official tiny model
  (tests/data/official_tiny.npz, written by the official PyTorch code) on this device; on a GPU also against the
  same model on the CPU;
- optimizer: BertAdam on this device replays the official BertAdam's recorded run;
- amp: one bf16 and one fp16 training step of the tiny model, loss and weights finite;
- launch: 2 processes on 2 GPUs train the demo's first epoch (when 2 GPUs are visible);
- step: the real config (`--config_file`) at the per-device micro-batch the options imply, with and without
  `--amp`: time, peak memory, the estimated epoch time of the run's train split (counted in the data when it is
  there, else the full dataset's train split) and the `--gradient_accumulation_steps` that fits;
- repeatable: (GPU) two identical training steps with `--deterministic`'s flags give identical weights;
- data: `download_dataset.sh --check` on the data root;
- loader: the first val batches of the loader train.py uses, moved to this device, equal the plain path's
  (collate, `paddle.to_tensor`); the train loader's samples/s with its copies to the device, at the run's
  batch size and `--num_workers` (the feature caches are built first when missing, as train.py does);
- checkpoint: `--from_pretrained` loads into the real config, with the key report.
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle

from .compat import MIN_VERSION, paddle_version
from .config import ViLBertConfig
from .dataset import collate
from .engine import prepare, train_one_epoch
from .features import FeatureCache
from .loader import throughput
from .model import TASK_HEADS, VILBertForVLTasks
from .optimization import BertAdam, build_param_groups
from .options import PROJECT_ROOT, RunOptions
from .tokenization import BertTokenizer
from .tasks import get_task
from .training import build_dataset, build_grad_scaler, build_model, build_optimizer, eval_loader, train_loader

REFERENCE_DATA = PROJECT_ROOT / "tests" / "data"
# train split sizes of the released datasets (data_spec.md): the epoch estimate when the data is not there
TRAIN_EXPRESSIONS = {"refcoco+": 120191, "refcoco": 120624, "refcocog": 80512}
# Paddle's warnings that autocast and the loss scaler do nothing on CPU: the amp check runs its bf16 and fp16 steps
# there on purpose (that they run and stay finite), and its line already says they compute in float32.
CPU_AMP_WARNINGS = ("amp_guard can only be enabled on CUDAPlace", "AmpScaler can only be enabled on CUDAPlace")
PARITY_TOLERANCE = {"cpu": 1e-5, "gpu": 1e-4}  # vs the official output; GPU matmuls may use TF32
OPTIMIZER_TOLERANCE = 1e-6
DATA_SAMPLE = 200  # feature records read back per LMDB by the data check
LOADER_BATCHES = (2, 20)  # val batches compared, train batches timed by the loader check
REFERENCE_INPUTS = ("input_txt", "input_imgs", "image_loc", "token_type_ids", "attention_mask", "image_attention_mask",
                "co_attention_mask")


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL, SKIP, INFO
    detail: str


class CheckFailed(Exception):
    """A check's own verdict (the message is the detail line); any other exception is reported as a FAIL too."""


# ---- the checks tests/test_gpu.py shares ------------------------------------------------------------------------
def official_tiny_reference() -> dict:
    with np.load(REFERENCE_DATA / "official_tiny.npz") as data:
        return {key: data[key] for key in data.files}


def official_tiny_outputs(reference: dict, device: str) -> dict:
    """The official tiny model's outputs on `device` (its converted beta weights, every task head, its recorded
    padded batch)."""
    from .checkpoint import convert_state_dict

    paddle.set_device(device)
    model = VILBertForVLTasks(ViLBertConfig.from_dict(json.loads(str(reference["config_json"]))), heads=TASK_HEADS,
                              num_labels=len(reference["weight/vil_prediction.main.3.bias"]), classifier="beta")
    model.eval()
    official = {key[len("weight/"):]: value for key, value in reference.items() if key.startswith("weight/")}
    converted, _ = convert_state_dict(official, {k: tuple(v.shape) for k, v in model.state_dict().items()}, "torch")
    model.set_state_dict(converted)
    return reference_outputs(model, reference)


def reference_outputs(model, reference: dict) -> dict:
    """The model's outputs (name -> array) on the reference's recorded batch, in the official argument order; the
    heads it does not build are left out."""
    with paddle.no_grad():
        output = model(*(paddle.to_tensor(reference[f"input/{name}"]) for name in REFERENCE_INPUTS))
    return {field.name: getattr(output, field.name).numpy() for field in dataclasses.fields(output)
            if getattr(output, field.name) is not None}


def head_differences(reference: dict, outputs: dict) -> dict:
    """Max |Δ| of each task head against the official output (beta's vil_prediction); `vision_logit` over the real
    (unpadded) regions."""
    real = reference["input/image_attention_mask"].astype(bool)
    diffs = {name: np.abs(outputs[name] - reference[f"output/{recorded}"]) for name, recorded in
             (("vision_logit", "vision_logit"), ("vil_prediction", "vil_prediction_beta"), ("vil_logit", "vil_logit"))}
    diffs["vision_logit"] = diffs["vision_logit"][..., 0][real]
    return {name: float(diff.max()) for name, diff in diffs.items()}


def bertadam_replay_difference(device: str) -> float:
    """Max |ours - official| over the parameters after replaying tests/data/bertadam_reference.npz (the official
    BertAdam + LambdaLR run on recorded gradients) through our BertAdam on `device`."""
    paddle.set_device(device)
    with np.load(REFERENCE_DATA / "bertadam_reference.npz") as data:
        ref = {key: data[key] for key in data.files}
    names = [str(name) for name in ref["names"]]
    params = []
    for i in range(len(names)):
        param = paddle.create_parameter(list(ref[f"init_{i}"].shape), "float32")
        param.set_value(ref[f"init_{i}"])
        params.append(param)
    groups = build_param_groups(zip(names, params), base_lr=float(ref["base_lr"]), head_lr=float(ref["head_lr"]),
                                weight_decay=float(ref["weight_decay"]))
    optimizer = BertAdam(groups, t_total=int(ref["t_total"]), warmup=float(ref["warmup"]),
                         milestones=tuple(ref["milestones"].tolist()), gamma=float(ref["gamma"]))
    worst = 0.0
    for step in range(ref["has_grad"].shape[0]):
        optimizer.set_epoch(step // int(ref["steps_per_epoch"]))
        optimizer.clear_grad()
        loss = sum((param * paddle.to_tensor(ref[f"grads_{i}"][step])).sum()
                   for i, param in enumerate(params) if ref["has_grad"][step, i])
        loss.backward()
        optimizer.step()
        worst = max(worst, max(float(np.abs(param.numpy() - ref[f"after_{i}"][step]).max())
                               for i, param in enumerate(params)))
    return worst


def synthetic_batch(config: ViLBertConfig, size: int, tokens: int = 20, regions: int = 100, seed: int = 0) -> dict:
    """A full batch as the loader hands it (fp16 features, which `engine.prepare` casts), every token and region
    real: the real config's cost."""
    rng = np.random.default_rng(seed)
    target = rng.random((size, regions, 1)).astype("float32")
    target[target < 0.5] = 0
    batch = {
        "input_ids": paddle.to_tensor(rng.integers(1000, config.vocab_size, (size, tokens))),
        "segment_ids": paddle.zeros([size, tokens], "int64"), "input_mask": paddle.ones([size, tokens], "int64"),
        "image_mask": paddle.ones([size, regions], "int64"),
        "features": paddle.to_tensor(rng.random((size, regions, config.v_feature_size)).astype("float16")),
        "spatials": paddle.to_tensor(rng.random((size, regions, 5)).astype("float32")),
        "target": paddle.to_tensor(target), "co_attention_mask": paddle.zeros([size, regions, tokens], "float32"),
        "sent_id": paddle.arange(size),
    }
    return batch


def train_steps(model, optimizer, batch: dict, amp: str, steps: int) -> float:
    """`steps` training steps on `batch`, run by train.py's own `train_one_epoch` (fp16 with its loss scaler);
    returns their mean loss."""
    loss, _ = train_one_epoch(model, [batch] * steps, optimizer, task=get_task("refer"), epoch=0, amp=amp,
                              scaler=build_grad_scaler(amp),
                              show_progress=False)
    return loss


def tiny_training(device: str, amp: str, steps: int = 2, seed: int = 0):
    """(mean loss, weights) of `steps` steps of the demo model from a fixed init on a fixed batch."""
    paddle.set_device(device)
    paddle.seed(seed)
    options = RunOptions(config_file=str(PROJECT_ROOT / "config" / "vilbert_demo.json"), learning_rate=1e-3,
                         warmup_proportion=0.0)
    model = build_model(options, log=lambda *a: None)
    optimizer, _ = build_optimizer(model, options, steps_per_epoch=steps)
    batch = synthetic_batch(model.config, 4, tokens=8, regions=10, seed=seed)
    loss = train_steps(model, optimizer, batch, amp, steps)
    return loss, {name: p.numpy() for name, p in model.named_parameters()}


def loader_check(options: RunOptions, device: str, compared: int = LOADER_BATCHES[0],
                 timed: int = LOADER_BATCHES[1]):
    """(names of the arrays that differ, train loader samples/s, the train loader). The first `compared` val
    batches of `eval_loader` after `engine.prepare` (on a GPU: assembled in page-locked memory, then copied)
    against collate + paddle.to_tensor + prepare of the same samples; then `timed` batches of `train_loader`, each
    prepared, after the ones its threads had ready."""
    paddle.set_device(device)
    tokenizer = BertTokenizer(options.bert_model)
    val = build_dataset(options, options.val_split, tokenizer)
    loader = eval_loader(val, options)
    differing = set()
    for _, batch, indices in zip(range(compared), loader, loader.batch_sampler):
        plain = prepare({k: paddle.to_tensor(v) for k, v in collate([val[i] for i in indices], val.region_keys).items()})
        batch = prepare(batch)
        differing.update(key for key in plain if key not in batch or batch[key].shape != plain[key].shape
                         or not np.array_equal(batch[key].numpy(), plain[key].numpy()))
    train = train_loader(build_dataset(options, options.train_split, tokenizer), options)
    rate, _, _ = throughput(train, timed, skip=train.threads + 2, consume=prepare)
    return sorted(differing), rate, train


# ---- the self-check -----------------------------------------------------------------------------------------------
class SelfCheck:
    """Runs every check for the given run options; `results` fills as they end."""

    def __init__(self, options: RunOptions, *, quick: bool, gpus: int, out=print):
        self.options, self.quick, self.out = options, quick, out
        self.gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
        self.device = "gpu" if self.gpu else "cpu"
        self.gpus = gpus or (paddle.device.cuda.device_count() if self.gpu else 1)
        self.results = []

    def run(self) -> int:
        for name, check in (("paddle", self.check_paddle), ("parity", self.check_parity),
                            ("optimizer", self.check_optimizer), ("amp", self.check_amp),
                            ("launch", self.check_launch), ("step", self.check_step),
                            ("repeatable", self.check_repeatable), ("data", self.check_data),
                            ("loader", self.check_loader), ("checkpoint", self.check_checkpoint)):
            started = time.monotonic()
            try:
                status, detail = check()
            except CheckFailed as verdict:
                status, detail = "FAIL", str(verdict)
            except Exception as error:  # noqa: BLE001 - a crash of any check is that check's FAIL
                status, detail = "FAIL", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            self.results.append(Result(name, status, detail))
            self.out(f"[{status}] {name}: {detail} ({time.monotonic() - started:.1f} s)")
        self.out("\n" + self.table())
        failed = [r.name for r in self.results if r.status == "FAIL"]
        self.out(f"\n{'FAIL: ' + ', '.join(failed) if failed else 'PASS: ready'}")
        return 1 if failed else 0

    def table(self) -> str:
        width = max(len(r.name) for r in self.results)
        return "\n".join([f"{'check':<{width}}  result  detail"] +
                         [f"{r.name:<{width}}  {r.status:<6}  {r.detail}" for r in self.results])

    def check_paddle(self):
        build = (f"CUDA {paddle.version.cuda()}, cuDNN {paddle.version.cudnn()}" if paddle.is_compiled_with_cuda()
                 else "CPU build")
        if self.gpu:
            props = paddle.device.cuda.get_device_properties(0)
            where = (f"{paddle.device.cuda.device_count()} x {props.name}, {props.total_memory / 2 ** 30:.1f} GiB; "
                     f"training on {self.gpus}")
        else:
            where = f"CPU: {os.cpu_count()} cores, {_total_memory() / 2 ** 30:.1f} GiB"
        supported = paddle_version() >= MIN_VERSION
        return ("PASS" if supported else "FAIL"), f"Paddle {paddle.__version__} ({build}); {where}"

    def check_parity(self):
        reference = official_tiny_reference()
        outputs = official_tiny_outputs(reference, self.device)
        diffs = head_differences(reference, outputs)
        diff = max(diffs.values())
        detail = (f"task heads on {self.device} vs the official PyTorch output: max |Δ| "
                  + ", ".join(f"{name} {value:.1e}" for name, value in diffs.items()))
        if self.gpu:
            cpu = official_tiny_outputs(reference, "cpu")
            paddle.set_device("gpu")
            cross = max(float(np.abs(outputs[name] - cpu[name]).max()) for name in TASK_HEADS)
            detail += f"; gpu vs cpu {cross:.1e}"
            diff = max(diff, cross)
        tolerance = PARITY_TOLERANCE[self.device]
        if diff > tolerance:
            raise CheckFailed(f"{detail} > {tolerance:g}")
        return "PASS", detail

    def check_optimizer(self):
        diff = bertadam_replay_difference(self.device)
        detail = f"BertAdam on {self.device} vs the official run: max |Δ| {diff:.1e}"
        if diff > OPTIMIZER_TOLERANCE:
            raise CheckFailed(f"{detail} > {OPTIMIZER_TOLERANCE:g}")
        return "PASS", detail

    def check_amp(self):
        with warnings.catch_warnings():
            if not self.gpu:
                for message in CPU_AMP_WARNINGS:
                    warnings.filterwarnings("ignore", message=message, category=UserWarning)
            losses = {amp: tiny_training(self.device, amp) for amp in ("bf16", "fp16")}
        finite = {amp: np.isfinite(loss) and all(np.isfinite(w).all() for w in weights.values())
                  for amp, (loss, weights) in losses.items()}
        detail = ", ".join(f"{amp} 2 steps, mean loss {loss:.4f}" for amp, (loss, _) in losses.items())
        if not self.gpu:
            detail += " (autocast does nothing on CPU: float32)"
        if not all(finite.values()):
            raise CheckFailed(f"non-finite loss or weights: {detail}")
        return "PASS", detail

    def check_launch(self):
        if not self.gpu or paddle.device.cuda.device_count() < 2 or self.quick:
            return "SKIP", "needs 2 visible GPUs" if not self.quick else "quick mode"
        return launch_two_gpus()

    def check_step(self):
        options = self.options
        config_file = PROJECT_ROOT / "config" / "vilbert_demo.json" if self.quick else options.config_file
        wanted = options.batch_size // (self.gpus * options.gradient_accumulation_steps)
        micro = wanted if self.gpu or self.quick else min(wanted, 2)  # the real config on CPU: a small batch
        paddle.set_device(self.device)
        paddle.seed(0)
        model = VILBertForVLTasks(ViLBertConfig.from_json(config_file))
        optimizer, _ = build_optimizer(model, options, steps_per_epoch=1000)
        amps = [options.amp if options.amp != "off" else "bf16", "off"] if self.gpu else ["off"]
        rows = []
        for amp in amps:  # the smaller run first: 2.6 cannot reset the peak counter, so each peak includes those before
            fitted, seconds, peak = fit_micro_batch(model, optimizer, micro, amp, self.gpu)
            rows.append((amp, fitted, seconds, peak))
        samples, data = self.train_samples()
        parts = []
        for amp, fitted, seconds, peak in rows:
            rate = fitted / seconds
            epoch = (f"epoch ~{_duration(samples / (rate * self.gpus))} on {self.gpus} device(s)" if samples
                     else "epoch: unknown")
            fits = (f"--gradient_accumulation_steps {options.gradient_accumulation_steps * wanted // fitted} fits"
                    if self.gpu else "CPU: a small batch" if micro < wanted else "CPU: the run's micro-batch")
            parts.append(f"amp {amp}: micro-batch {fitted}, {seconds:.2f} s/step, {rate:.1f} samples/s/device, peak "
                         f"{peak / 2 ** 30:.1f} GiB, {epoch}, {fits}")
        name = Path(config_file).stem + (" (quick: demo model)" if self.quick else "")
        return "INFO", f"{name}: " + "; ".join(parts) + f" (epoch of {data})"

    def train_samples(self):
        """(samples, what they are) of the train split the run would build, counted in its data when that is
        there (the LMDBs read, no feature cache built); else the released dataset's train split size, (None, why)
        when there is none to assume."""
        options = self.options
        try:
            quiet = dataclasses.replace(options, build_feature_cache=False)
            dataset = build_dataset(quiet, options.train_split, BertTokenizer(options.bert_model))
            return len(dataset), f"the {len(dataset):,} {options.train_split} samples in {options.dataroot}"
        except Exception as error:  # noqa: BLE001 - no data (or unreadable): the data check reports why
            reason = f"no readable {options.train_split} data in {options.dataroot}: {type(error).__name__}"
        if options.task == "refer" and options.dataset in TRAIN_EXPRESSIONS:
            count = TRAIN_EXPRESSIONS[options.dataset]
            return count, f"the full {options.dataset} train split, {count:,} expressions, assumed ({reason})"
        return None, f"unknown size: {reason}"

    def check_repeatable(self):
        if not self.gpu:
            return "SKIP", "CPU kernels are deterministic; resume is bit-identical (tests/test_resume.py)"
        paddle.set_flags({"FLAGS_cudnn_deterministic": True, "FLAGS_embedding_deterministic": 1})
        (_, first), (_, second) = tiny_training("gpu", "off"), tiny_training("gpu", "off")
        diff = max(float(np.abs(first[k] - second[k]).max()) for k in first)
        if diff == 0:
            return "PASS", "with --deterministic two identical runs give bit-identical weights: resume is exact"
        return "INFO", f"with --deterministic two identical runs differ by up to {diff:.1e}: resume is not bit-exact"

    def check_data(self):
        """`download_dataset.sh --check`, reading back a sample of each LMDB's records (all of them: minutes)."""
        command = ["bash", str(PROJECT_ROOT / "download_dataset.sh"), "--check", "--sample", str(DATA_SAMPLE),
                   "--dataset", self.options.dataset, "--dataroot", self.options.dataroot]
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable))
        lines = [line.strip() for line in done.stdout.splitlines()]
        summary = ([line for line in lines if line.startswith("PROBLEM")] + [line for line in lines if "readable" in line]
                   or lines[-1:] or [done.stderr.strip()])
        if done.returncode:
            raise CheckFailed(f"{self.options.dataroot}: {summary[0]} (bash download_dataset.sh {' '.join(command[2:])})")
        return "PASS", f"{self.options.dataroot}: {summary[0]}"

    def check_loader(self):
        if any(result.name == "data" and result.status == "FAIL" for result in self.results):
            return "SKIP", "no readable data (the data check failed)"
        options = self.options
        differing, rate, train = loader_check(options, self.device)
        reader = train.dataset.det_features
        features = f"{reader.dtype} cache" if isinstance(reader, FeatureCache) else "LMDB, no cache"
        detail = (f"val batches on {self.device} equal collate + to_tensor; train loader {rate:,.0f} samples/s "
                  f"with its copies to {self.device} (batch {options.batch_size}, {train.threads} worker threads, "
                  f"{features})")
        if differing:
            raise CheckFailed(f"the loader's val batches differ from collate + to_tensor in {', '.join(differing)}")
        return "PASS", detail

    def check_checkpoint(self):
        if not self.options.from_pretrained:
            return "SKIP", "no --from_pretrained given"
        from .checkpoint import load_pretrained

        paddle.set_device("cpu")
        lines = []
        model = VILBertForVLTasks(ViLBertConfig.from_json(self.options.config_file),
                                  **get_task(self.options.task).model_heads(self.options))
        report = load_pretrained(model, self.options.from_pretrained, log=lines.append)
        return "PASS", f"{self.options.from_pretrained}: {report.container}; " + " ".join(lines)[:300]


def fit_micro_batch(model, optimizer, micro: int, amp: str, gpu: bool):
    """(micro-batch that fits, seconds per step, peak bytes): 1 warm-up and 2 timed steps, halving the micro-batch
    while a step runs out of memory."""
    while True:
        try:
            batch = synthetic_batch(model.config, micro)
            train_steps(model, optimizer, batch, amp, 1)
            started = time.perf_counter()
            train_steps(model, optimizer, batch, amp, 2)
            if gpu:
                paddle.device.cuda.synchronize()
            seconds = (time.perf_counter() - started) / 2
            peak = (paddle.device.cuda.max_memory_allocated() if gpu
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            return micro, seconds, peak
        except MemoryError:
            optimizer.clear_grad()
            if micro == 1:
                raise
            micro //= 2


def launch_two_gpus():
    """The demo's first epoch as 2 processes on GPUs 0 and 1 (paddle.distributed.launch)."""
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"vilbert_selfcheck_launch_{os.getpid()}"
    done = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--devices", "0,1", "--log_dir",
                           str(log_dir), str(PROJECT_ROOT / "train.py"), "--demo", "--num_train_epochs", "1",
                           "--output_dir", str(log_dir / "run")], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=900)
    epoch = [line for line in done.stdout.splitlines() if "Epoch 0 done!" in line]
    if done.returncode or not epoch:
        raise CheckFailed(f"2-GPU demo epoch failed (exit {done.returncode}); logs in {log_dir}")
    return "PASS", f"2 GPUs: {epoch[0].strip()}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 2 * 3600 else f"{seconds / 3600:.1f} h"


def _total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
