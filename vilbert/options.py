"""Run options: a YAML task config gives the defaults, command-line flags override them.

One typed dataclass is the single source of truth: the YAML keys, the flags (`--batch_size`, named as in the
official scripts), their types, defaults and --help texts all come from its fields. Each field also names the
entry scripts that offer it (`option(..., used_by=...)`): eval.py and predict.py do not offer the training-only
options, which they still read from the YAML. Unknown or ill-typed YAML keys are errors. The resolved options are
written into the run directory as `config.yaml`.
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


# The entry scripts that offer an option as a flag (build_parser's `script`). Every option is a key of the task
# config and of a run's config.yaml whichever script reads it; a script's --help just leaves out the options it
# never uses (eval.py lists no --learning_rate: the checkpoint is already trained). It still accepts them, so the
# flags of a training command line can be given to eval.py as they are.
TRAIN, EVAL, PREDICT = "train", "eval", "predict"
SCRIPTS = (TRAIN, EVAL, PREDICT)


def option(default, help_text: str, used_by=SCRIPTS, metavar=None):
    """A `RunOptions` field: its default, its --help text, and the entry scripts that offer it as a flag."""
    metadata = {"help": help_text, "used_by": frozenset(used_by), "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunOptions:
    """Everything a run needs besides the model's own JSON config (`config_file`).

    Each field's metadata holds its --help text and the scripts that offer it as a flag (`option`).
    """

    task: str = option("refer", "what the run trains and scores (vilbert/tasks): refer (referring expressions) "
                       "or vqa; also the short form of its task config (config/refcoco+.yml, config/vqa.yml; "
                       "with --demo its demo config)", metavar="{refer,vqa}")
    # data (paths relative to `dataroot` unless absolute)
    dataset: str = option("refcoco+", "refcoco, refcoco+ or refcocog (the options that depend on it, splitBy, "
                          "task_id, the feature files, follow it unless given too); vqa for VQA 2.0",
                          metavar="NAME")
    splitBy: str = option("unc", "which split of the dataset's annotations, refs(<splitBy>).p (unc; RefCOCOg: umd)",
                          used_by=(TRAIN, EVAL), metavar="NAME")
    dataroot: str = option("data/referExpression", "the data root: annotations and features, the paths below are "
                           "relative to it unless absolute; a local folder or s3://", metavar="DIR")
    features_h5path1: str = option("refcoco+_resnet101_faster_rcnn_genome.lmdb", "LMDB of the detected boxes' "
                                   "features", metavar="LMDB")
    features_h5path2: str = option("refcoco+_gt_resnet101_faster_rcnn_genome.lmdb", "LMDB of the ground-truth "
                                   "boxes' features, mixed in for training only", used_by=(TRAIN,), metavar="LMDB")
    features_test: str = option("", "the test split's features when they are an LMDB of their own (VQA: "
                                "test2015)", used_by=(EVAL,), metavar="LMDB")
    feature_cache: bool = option(True, "read the features from their decoded float16 cache (vilbert/features.py) "
                                 "instead of the LMDB")
    build_feature_cache: bool = option(True, "build that cache on first use when it is missing or stale",
                                       used_by=(TRAIN, EVAL))
    train_split: str = option("train", "the split trained on", used_by=(TRAIN,), metavar="SPLIT")
    val_split: str = option("val", "the split scored after every epoch (eval.py: its default --split)",
                            used_by=(TRAIN, EVAL), metavar="SPLIT")
    max_seq_length: int = option(20, "tokens per expression or question, [CLS] and [SEP] included")
    max_region_num: int = option(100, "regions per image, the whole-image region included")
    tokenization: str = option("beta", "beta: [CLS] + word pieces + [SEP], then cut to max_seq_length; 12in1: "
                               "pieces cut first, then [CLS]/[SEP] (the 12-in-1 checkpoints)", metavar="{beta,12in1}")
    bert_model: str = option("bert-base-uncased", "the vocabulary: bert-base-uncased (shipped) or a vocab file",
                             metavar="VOCAB")
    feature_extractor: str = option("butd_resnet101", "what made the training features (feature_lmdb.EXTRACTORS); "
                                    "predict.py warns when the features look otherwise", used_by=(TRAIN, PREDICT),
                                    metavar="NAME")
    # model
    config_file: str = option("config/bert_base_6layer_6conect.json", "the model's JSON config", metavar="JSON")
    from_pretrained: str = option("", "the weights: .bin (official PyTorch) or .pdparams (ours, or the earlier "
                                  "Paddle port); empty: random init", metavar="CKPT")
    task_id: int = option(0, "task-token id, only for 12-in-1 models built with task_specific_tokens")
    classifier: str = option("beta", "vil_prediction's form: beta (weight-normed MLP) or 12in1 (GeLU + LayerNorm "
                             "MLP)", metavar="{beta,12in1}")
    # optimisation (vilbert_beta train_tasks.py + BertAdam)
    batch_size: int = option(256, "training batch, global: over all devices and accumulation steps",
                             used_by=(TRAIN,))
    eval_batch_size: int = option(1024, "evaluation (and prediction) batch, per device")
    num_train_epochs: int = option(20, "epochs to train", used_by=(TRAIN,))
    learning_rate: float = option(4e-5, "peak learning rate of the encoder", used_by=(TRAIN,), metavar="LR")
    head_learning_rate: float = option(1e-4, "peak learning rate of the parameters named by --head_patterns",
                                       used_by=(TRAIN,), metavar="LR")
    head_patterns: List[str] = option(["vil_prediction"], "substrings of the parameter names trained at "
                                      "--head_learning_rate", used_by=(TRAIN,), metavar="PATTERN")
    weight_decay: float = option(0.01, "weight decay of the parameters named by --decay_patterns", used_by=(TRAIN,),
                                 metavar="X")
    decay_patterns: List[str] = option(["bias", "LayerNorm.bias", "LayerNorm.weight"], "substrings of the "
                                       "parameter names that decay (vilbert_beta's rule: only these)",
                                       used_by=(TRAIN,), metavar="PATTERN")
    warmup_proportion: float = option(0.1, "share of all steps with a linear warm-up of the learning rate",
                                      used_by=(TRAIN,), metavar="X")
    lr_milestones: List[int] = option([12, 16], "epochs at which the learning rate is multiplied by --lr_gamma",
                                      used_by=(TRAIN,), metavar="EPOCH")
    lr_gamma: float = option(0.1, "the factor applied at each of --lr_milestones", used_by=(TRAIN,), metavar="X")
    max_grad_norm: float = option(1.0, "gradient norm clip, per tensor (BertAdam)", used_by=(TRAIN,), metavar="X")
    adam_epsilon: float = option(1e-6, "Adam's epsilon (BertAdam: no bias correction)", used_by=(TRAIN,),
                                 metavar="X")
    gradient_accumulation_steps: int = option(1, "steps whose gradients make one update (--batch_size is split "
                                              "over them)", used_by=(TRAIN,))
    # running
    seed: int = option(0, "seed of the shuffling, dropout and fresh weights", used_by=(TRAIN,))
    # Loader threads (vilbert/loader.py); the one default, used by every config. Threads, not processes: a
    # batch is assembled mostly by copies NumPy runs outside the GIL, straight into the memory the device copy
    # reads; Paddle's shared-memory processes copy every batch twice more and stayed near 5,000 samples/s
    # where threads gave 39,000 (bench/bench_loader.py, README Speed). 4: a GPU box has 4 cores to spare for
    # them; on fewer CPUs the loader runs one thread per CPU, as more only contend.
    num_workers: int = option(4, "batch-loading threads (0: in the main thread; at most one per CPU is used)",
                              used_by=(TRAIN, EVAL))
    device: str = option("auto", "auto (gpu when Paddle has CUDA and sees a GPU, else cpu), gpu or cpu",
                         metavar="{auto,gpu,cpu}")
    amp: str = option("off", "mixed precision on GPU: off, bf16 or fp16", used_by=(TRAIN, EVAL),
                      metavar="{off,bf16,fp16}")
    deterministic: bool = option(False, "GPU: deterministic cuDNN and embedding-gradient kernels (repeatable "
                                 "runs, slower)")
    output_dir: str = option("checkpoints", "where run directories are made", used_by=(TRAIN,), metavar="DIR")
    save_name: str = option("", "the run directory's name; empty: <dataset>_<config_file stem>", used_by=(TRAIN,),
                            metavar="NAME")
    resume: str = option("", "a run's last.pdparams to continue, or auto: continue <output_dir>/<save_name> if it "
                         "has one, else start fresh; the run's config.yaml gives the options", used_by=(TRAIN,),
                         metavar="{auto,CKPT}")
    save_every_minutes: float = option(30.0, "also save last.pdparams within an epoch this often (0: at epoch "
                                       "ends only); SIGINT and SIGTERM save it too, then stop", used_by=(TRAIN,),
                                       metavar="MIN")
    overwrite: bool = option(False, "start over in a run directory that holds a finished or stopped run, "
                             "removing its files (without it, such a directory is refused)", used_by=(TRAIN,))

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
        if self.gradient_accumulation_steps >= 1 and self.batch_size % self.gradient_accumulation_steps:
            problems.append(f"batch_size={self.batch_size} is not a multiple of "
                            f"gradient_accumulation_steps={self.gradient_accumulation_steps}")
        for name in ("learning_rate", "head_learning_rate", "lr_gamma", "max_grad_norm", "adam_epsilon"):
            if not getattr(self, name) > 0:  # also NaN
                problems.append(f"{name}={getattr(self, name)} must be > 0")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay={self.weight_decay} must be >= 0")
        if self.device not in ("auto", "gpu", "cpu"):
            problems.append(f"device={self.device!r} must be auto, gpu or cpu")
        if not 0 <= self.warmup_proportion <= 1:
            problems.append(f"warmup_proportion={self.warmup_proportion} must be in [0, 1]")
        if not self.save_every_minutes >= 0:
            problems.append(f"save_every_minutes={self.save_every_minutes} must be >= 0")
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
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise OptionsError(f"task config {path} not found (the shipped ones are in config/*.yml)") from None
    except UnicodeDecodeError as e:
        raise OptionsError(f"task config {path} is not a text file (byte {e.start} is not UTF-8): give a YAML "
                           f"file (the shipped ones are in config/*.yml)") from None
    except yaml.YAMLError as e:
        raise OptionsError(f"task config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if values is None:
        raise OptionsError(f"task config {path} is empty: give a YAML file of option: value (a run's config.yaml "
                           f"is written whole; an empty one was truncated by hand or by another tool)")
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written (its example commands stay one per line); a flag's default where it has one."""

    def _fill_text(self, text, width, indent):  # a text without line breaks (a group's) is wrapped to the terminal
        if "\n" in text.strip():
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(description: str, script: str = None) -> argparse.ArgumentParser:
    """A parser with one flag per option; --help offers those `script` (train, eval, predict; None: all) uses.

    The flags default to None: `parse_options` fills in the rest from the YAML, which holds every option.
    """
    if script is not None and script not in SCRIPTS:
        raise ValueError(f"script={script!r} must be one of {', '.join(SCRIPTS)} or None")
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--task_config", default=None, metavar="YAML",
                        help=f"task YAML giving the defaults (default: the --task's, "
                             f"{DEFAULT_TASK_CONFIG.relative_to(PROJECT_ROOT)} for referring expressions"
                             + ("; for a checkpoint of ours, the config.yaml of its run" if script in (EVAL, PREDICT)
                                else "") + ")")
    parser.add_argument("--demo", action="store_true",
                        help="the small demo recipe of the task (config/demo.yml, config/demo_vqa.yml) on generated "
                             "data; makes it if missing")
    shipped = RunOptions(**load_task_config(DEFAULT_TASK_CONFIG))
    where = ("the checkpoint's run config (config.yaml beside --from_pretrained) when there is one, else the task "
             "config" if script in (EVAL, PREDICT) else "the task config")
    left_out = ("; the training-only options (optimisation, schedule, output, resume) are read from the config "
                "but not offered as flags" if script in (EVAL, PREDICT) else "")
    group = parser.add_argument_group(
        "run options", f"Each is a key of the task config too; a flag given overrides it. Defaults: {where}; the "
                       f"values shown are those of {DEFAULT_TASK_CONFIG.name}{left_out}.")
    for f in dataclasses.fields(RunOptions):
        kind, item = _field_type(f), typing.get_args(f.type)[0] if _field_type(f) is list else f.type
        help_text = f"{f.metadata['help']} (default: {_shown(getattr(shipped, f.name))} in {DEFAULT_TASK_CONFIG.name})"
        # An option the script does not use is still accepted (a training command line's flags can be passed to
        # eval.py as they are) but is not offered: --help and the usage line leave it out.
        offered = script is None or script in f.metadata["used_by"]
        kwargs = {"default": None, "help": help_text.replace("%", "%%") if offered else argparse.SUPPRESS}
        if kind is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(f"--{f.name}", type=item, nargs="+" if kind is list else None,
                               metavar=f.metadata["metavar"] or {int: "N", float: "X"}.get(item), **kwargs)
    return parser


def parse_options(parser: argparse.ArgumentParser, argv=None, config_beside_checkpoint: bool = False):
    """Returns (options, args): YAML defaults, then every flag given on the command line.

    With `config_beside_checkpoint`, a `config.yaml` next to `--from_pretrained` (a run directory of ours)
    is the YAML unless `--task_config` is given, so a checkpoint is evaluated with the options it was trained with.
    Likewise `--resume` takes the resumed run's own `config.yaml` as the YAML, so a run continues its recipe.
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
    options = _options(task_config, args)
    resumed = getattr(args, "resume", None)
    if resumed and not args.task_config:
        saved = (options.run_dir if resumed == "auto" else Path(resumed).parent) / "config.yaml"
        if saved.exists():
            options = _options(saved, args)
    options.validate()
    return options, args


def _options(task_config, args) -> "RunOptions":
    """The options of the YAML `task_config` with the flags given in `args` over them."""
    values = load_task_config(task_config)
    if args.task is not None and values.get("task", "refer") != args.task:
        raise OptionsError(f"--task {args.task} does not match {task_config}, a {values.get('task', 'refer')} "
                           f"config: leave out one of them")
    if args.dataset is not None:  # what follows from the dataset follows it, unless given as a flag too
        values.update(follow_dataset(dataclasses.asdict(RunOptions(**values)), args.dataset))
    for f in dataclasses.fields(RunOptions):  # a flag the script does not offer is not in `args`
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return RunOptions(**values)


def _shown(value) -> str:
    """An option's value as --help shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value) if value != "" else "empty"


def _field_type(f: dataclasses.Field):
    return list if typing.get_origin(f.type) is list else f.type


def resolve_device(device: str) -> str:
    """'auto' -> 'gpu' when this Paddle build has CUDA and sees a device, else 'cpu'."""
    import paddle

    if device == "auto":
        return "gpu" if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0 else "cpu"
    return device

