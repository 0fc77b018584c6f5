"""Run options: a YAML task config gives the defaults, command-line flags override them.

One typed dataclass is the single source of truth: the YAML keys, the flags (`--batch_size`, named as in the
official scripts), their types and their defaults all come from its fields. Unknown or ill-typed YAML keys are
errors. The resolved options are written into the run directory as `config.yaml`.
"""

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import yaml

from .config import has_type, type_name
from .feature_lmdb import EXTRACTORS
from .refer_datasets import follow_dataset
from .tokenization import TOKENIZATIONS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TASK_CONFIG = PROJECT_ROOT / "config" / "refcoco+.yml"
DEMO_TASK_CONFIG = PROJECT_ROOT / "config" / "demo.yml"


class OptionsError(ValueError):
    """A task config or flag value that cannot be used."""


@dataclass
class RunOptions:
    """Everything a run needs besides the model's own JSON config (`config_file`)."""

    task: str = "refer"  # refer (referring expressions), vqa: what the run trains and scores (vilbert/tasks)
    # data (paths relative to `dataroot` unless absolute)
    dataset: str = "refcoco+"  # refcoco, refcoco+ or refcocog (the options it implies follow --dataset); vqa
    splitBy: str = "unc"
    dataroot: str = "data/referExpression"
    features_h5path1: str = "refcoco+_resnet101_faster_rcnn_genome.lmdb"  # detected boxes
    features_h5path2: str = "refcoco+_gt_resnet101_faster_rcnn_genome.lmdb"  # ground-truth boxes (train only)
    features_test: str = ""  # the test split's features when they are an LMDB of their own (VQA: test2015)
    feature_cache: bool = True  # read the features from their decoded cache (vilbert/features.py)
    build_feature_cache: bool = True  # build that cache (float16) on first use when missing or stale
    train_split: str = "train"
    val_split: str = "val"
    max_seq_length: int = 20
    max_region_num: int = 100
    tokenization: str = "beta"  # beta: [CLS] + pieces + [SEP], then cut; 12in1: pieces cut, then [CLS]/[SEP]
    bert_model: str = "bert-base-uncased"  # the shipped vocab, or a path to a vocab file
    feature_extractor: str = "butd_resnet101"  # what made the training features (feature_lmdb.EXTRACTORS)
    # model
    config_file: str = "config/bert_base_6layer_6conect.json"
    from_pretrained: str = ""  # .bin (official), .pdparams (ours or the earlier Paddle port); empty: random init
    task_id: int = 0  # task-token id, only for 12-in-1 models built with task_specific_tokens
    classifier: str = "beta"  # vil_prediction's form: beta (weight-normed MLP) or 12in1 (GeLU + LayerNorm MLP)
    # optimisation (vilbert_beta train_tasks.py + BertAdam)
    batch_size: int = 256  # global, over all devices and accumulation steps
    eval_batch_size: int = 1024
    num_train_epochs: int = 20
    learning_rate: float = 4e-5
    head_learning_rate: float = 1e-4
    head_patterns: List[str] = field(default_factory=lambda: ["vil_prediction"])
    weight_decay: float = 0.01
    decay_patterns: List[str] = field(default_factory=lambda: ["bias", "LayerNorm.bias", "LayerNorm.weight"])
    warmup_proportion: float = 0.1
    lr_milestones: List[int] = field(default_factory=lambda: [12, 16])
    lr_gamma: float = 0.1
    max_grad_norm: float = 1.0
    adam_epsilon: float = 1e-6
    gradient_accumulation_steps: int = 1
    # running
    seed: int = 0
    # Loader threads (vilbert/loader.py); the one default, used by every config. Threads, not processes: a
    # batch is assembled mostly by copies NumPy runs outside the GIL, straight into the memory the device copy
    # reads; Paddle's shared-memory processes copy every batch twice more and stayed near 5,000 samples/s
    # where threads gave 39,000 (bench/bench_loader.py, README Speed). 4: a GPU box has 4 cores to spare for
    # them; on fewer CPUs the loader runs one thread per CPU, as more only contend.
    num_workers: int = 4
    device: str = "auto"  # auto: gpu when Paddle has CUDA, else cpu
    amp: str = "off"  # off, bf16, fp16
    deterministic: bool = False  # GPU: deterministic cuDNN and embedding-gradient kernels (repeatable runs, slower)
    output_dir: str = "checkpoints"
    save_name: str = ""  # run directory name; empty: <dataset>_<config_file stem>
    resume: str = ""  # a run's last.pdparams, or 'auto' to continue <output_dir>/<save_name> if it exists

    def validate(self) -> None:
        from .tasks import TASKS  # here, not at the top: the tasks import this module

        if self.task not in TASKS:
            raise OptionsError(f"task={self.task!r} must be one of {', '.join(TASKS)}")
        problems = TASKS[self.task].validate(self)
        if self.amp not in ("off", "bf16", "fp16"):
            problems.append(f"amp={self.amp!r} must be off, bf16 or fp16")
        if self.tokenization not in TOKENIZATIONS:
            problems.append(f"tokenization={self.tokenization!r} must be one of {', '.join(TOKENIZATIONS)}")
        if self.feature_extractor not in EXTRACTORS:
            problems.append(f"feature_extractor={self.feature_extractor!r} must be one of {', '.join(EXTRACTORS)}")
        for name in ("batch_size", "eval_batch_size", "num_train_epochs", "gradient_accumulation_steps",
                     "max_seq_length", "max_region_num"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.batch_size % self.gradient_accumulation_steps:
            problems.append(f"batch_size={self.batch_size} is not a multiple of "
                            f"gradient_accumulation_steps={self.gradient_accumulation_steps}")
        if not 0 <= self.warmup_proportion <= 1:
            problems.append(f"warmup_proportion={self.warmup_proportion} must be in [0, 1]")
        if self.num_workers < 0:
            problems.append(f"num_workers={self.num_workers} must be >= 0")
        if problems:
            raise OptionsError("; ".join(problems))

    def data_path(self, path: str) -> str:
        """A data path as given if absolute or a URL, else under `dataroot`."""
        return path if os.path.isabs(path) or "://" in path else os.path.join(self.dataroot, path)

    @property
    def run_dir(self) -> Path:
        name = self.save_name or f"{self.dataset}_{Path(self.config_file).stem}"
        return Path(self.output_dir) / name

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def load_task_config(path) -> dict:
    """Read a task YAML and check each key and type against `RunOptions`."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise OptionsError(f"task config {path} not found (the shipped ones are in config/*.yml)") from None
    except yaml.YAMLError as e:
        raise OptionsError(f"task config {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise OptionsError(f"task config {path} must be a mapping of option: value")
    fields = {f.name: f for f in dataclasses.fields(RunOptions)}
    problems = [f"unknown key {k!r}" for k in values if k not in fields]
    for key, value in values.items():
        if key in fields and not has_type(value, fields[key].type):
            problems.append(f"{key}={value!r} should be {type_name(fields[key].type)}")
    if problems:
        raise OptionsError(f"{path}: " + "; ".join(problems))
    return {k: float(v) if _field_type(fields[k]) is float else v for k, v in values.items()}


def build_parser(description: str) -> argparse.ArgumentParser:
    """A parser with one flag per option; defaults are filled in by `parse_options` from the YAML."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task_config", default=None,
                        help=f"task YAML giving the defaults (default: the --task's, "
                             f"{DEFAULT_TASK_CONFIG.relative_to(PROJECT_ROOT)} for referring expressions)")
    parser.add_argument("--demo", action="store_true",
                        help="the small demo recipe of the task (config/demo.yml, config/demo_vqa.yml) on generated "
                             "data; makes it if missing")
    for f in dataclasses.fields(RunOptions):
        kind = _field_type(f)
        if f.name == "task":
            parser.add_argument("--task", default=None, help="refer or vqa: the task, and the short form of its "
                                "task config (config/refcoco+.yml, config/vqa.yml; with --demo its demo config)")
        elif kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(f.type) is list:
            parser.add_argument(f"--{f.name}", nargs="+", type=typing.get_args(f.type)[0], default=None)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=None)
    return parser


def parse_options(parser: argparse.ArgumentParser, argv=None, config_beside_checkpoint: bool = False):
    """Returns (options, args): YAML defaults, then every flag given on the command line.

    With `config_beside_checkpoint`, a `config.yaml` next to `--from_pretrained` (a run directory of ours)
    is the YAML unless `--task_config` is given, so a checkpoint is evaluated with the options it was trained with.
    """
    from .tasks import TASKS  # here, not at the top: the tasks import this module

    args = parser.parse_args(argv)
    if args.task is not None and args.task not in TASKS:
        parser.error(f"--task {args.task}: the tasks are {', '.join(TASKS)}")
    task_config = args.task_config
    if config_beside_checkpoint and not task_config and args.from_pretrained:
        beside = Path(args.from_pretrained).parent / "config.yaml"
        task_config = beside if beside.exists() else None
    if not task_config:
        task_config = PROJECT_ROOT / "config" / TASKS[args.task or "refer"].configs[bool(args.demo)]
    values = load_task_config(task_config)
    if args.task is not None and values.get("task", "refer") != args.task:
        raise OptionsError(f"--task {args.task} does not match {task_config}, a {values.get('task', 'refer')} "
                           f"config: leave out one of them")
    if args.dataset is not None:  # what follows from the dataset follows it, unless given as a flag too
        values.update(follow_dataset(dataclasses.asdict(RunOptions(**values)), args.dataset))
    for f in dataclasses.fields(RunOptions):
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    options = RunOptions(**values)
    options.validate()
    return options, args


def _field_type(f: dataclasses.Field):
    return list if typing.get_origin(f.type) is list else f.type


def resolve_device(device: str) -> str:
    """'auto' -> 'gpu' when this Paddle build has CUDA and sees a device, else 'cpu'."""
    import paddle

    if device == "auto":
        return "gpu" if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0 else "cpu"
    return device

