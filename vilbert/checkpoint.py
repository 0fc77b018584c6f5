"""Checkpoints: reading official PyTorch files without torch, converting them, strict loading, saving.

The released ViLBERT weights (jiasenlu/vilbert_beta, facebookresearch/vilbert-multi-task) are `torch.save`
pickles of a state_dict, mostly in the legacy (torch < 1.6) stream format, some in the zip format. They are
read here with a restricted unpickler that only knows the few torch rebuild functions and storage types, so
torch is not needed and no pickled code ever runs. The same unpickler reads Paddle `.pdparams` (the earlier
Paddle port's and ours), which are pickles of numpy arrays; `paddle.load` would run any pickled code and make a
Paddle tensor of every array, including the heads that are then dropped.

Conversion keeps the official names (model_spec.md §9): it renames TF-style `gamma`/`beta` as official
`from_pretrained` does, transposes the torch `nn.Linear` weights listed in `LINEAR_WEIGHTS` ([out, in] ->
Paddle's [in, out]; shape cannot tell, 130 of them are square), drops what the model does not hold by named
rule, and checks every shape. Loading is strict: every missing, unexpected or mis-shaped key is reported in
one `CheckpointError`. The only parameters that may be missing are the task-specific ones (the task heads
`vision_logit`, `vil_prediction`, `vil_logit`, and the 12-in-1 task token) when the checkpoint is a pretraining
one that holds no task head at all. A `vil_prediction` of the other family (beta's weight-normed `main.*`,
12-in-1's `logit_fc.*`) or of another answer count is one problem line that says what to change.
"""

import collections
import hashlib
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paddle

from pyutils.restricted_pickle import RestrictedUnpickler

from .fileio import naming_target

# ----------------------------------------------------------------------------------------------------
# Official layout

# Every torch nn.Linear weight of the official VILBertForVLTasks (all 211 of bert_base_6layer_6conect, plus
# beta's weight-normed head). `image_location_embeddings` is a Linear; the `*_embeddings` lookup tables
# (word, position, token_type, task) are not and keep their layout.
LINEAR_WEIGHTS = tuple(re.compile(pattern) for pattern in (
    r"bert\.v_embeddings\.image_(location_)?embeddings\.weight",
    r"bert\.encoder\.(v_)?layer\.\d+\.attention\.self\.(query|key|value)\.weight",
    r"bert\.encoder\.(v_)?layer\.\d+\.(attention\.output|intermediate|output)\.dense\.weight",
    r"bert\.encoder\.c_layer\.\d+\.biattention\.(query|key|value)[12]\.weight",
    r"bert\.encoder\.c_layer\.\d+\.biOutput\.(q_)?dense[12]\.weight",
    r"bert\.encoder\.c_layer\.\d+\.[tv]_(intermediate|output)\.dense\.weight",
    r"bert\.[tv]_pooler\.dense\.weight",
    r"cls\.(predictions|imagePredictions)\.(transform\.dense|decoder)\.weight",
    r"cls\.bi_seq_relationship\.weight",
    r"vil_(prediction|prediction_gqa|binary_prediction)\.logit_fc\.[03]\.weight",
    r"vil_prediction\.main\.[03]\.weight_v",  # beta's weight_norm head (weight_g is a 0-d scale)
    r"(vil_logit|vil_tri_prediction|vision_logit|linguisic_logit)\.weight",
))

# Old TF-style LayerNorm names, renamed by substring as official `from_pretrained` does.
RENAMES = (("gamma", "weight"), ("beta", "bias"))

TASK_HEADS = re.compile(
    r"(vil_prediction|vil_prediction_gqa|vil_binary_prediction|vil_tri_prediction|vil_logit|vision_logit"
    r"|linguisic_logit)\.")
# Parameters a pretraining checkpoint never holds; fine-tuning starts them from the model's own init.
TASK_SPECIFIC = (TASK_HEADS, re.compile(r"bert\.embeddings\.task_embeddings\."))

# Checkpoint keys the model does not hold and that are dropped on purpose, by reason (only when the model
# really lacks the key: a model that had these parameters would load them).
DROPPED = (
    ("pretraining heads (cls.*)", re.compile(r"cls\.")),
    ("other tasks' heads", TASK_HEADS),
    ("biOutput.q_dense1/2, never used in the official forward",
     re.compile(r"bert\.encoder\.c_layer\.\d+\.biOutput\.q_dense[12]\.")),
)

# Keys only the earlier Paddle port (fuqianya/ViLBERT-Paddle) writes: its untied MLM decoder and text head (our
# model holds neither; its vil_prediction and vil_logit it may hold).
PORT_ONLY = re.compile(r"cls\.|linguisic_logit\.")

# The two families' vil_prediction, by the `--classifier` that builds each: its name, key prefix, answer-count bias.
CLASSIFIER_KEYS = {"beta": ("vilbert_beta", "vil_prediction.main.", "vil_prediction.main.3.bias"),
                   "12in1": ("12-in-1", "vil_prediction.logit_fc.", "vil_prediction.logit_fc.3.bias")}
ANSWER_VOCABULARY = "cache/trainval_ans2label.pkl"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model."""


def is_linear_weight(name: str) -> bool:
    return any(pattern.fullmatch(name) for pattern in LINEAR_WEIGHTS)


# ----------------------------------------------------------------------------------------------------
# Reading: a restricted unpickler for torch.save (legacy and zip) and paddle.save files

TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a legacy torch.save stream
TORCH_LEGACY_PROTOCOL = 1001
PADDLE_METADATA = "StructuredToParameterName@@"  # paddle.save's map to internal names; not a tensor

# torch storage class -> (numpy dtype it is read as, numpy dtype of the result); bfloat16 is widened exactly.
STORAGE_DTYPES = {
    "FloatStorage": ("f4", "f4"), "DoubleStorage": ("f8", "f8"), "HalfStorage": ("f2", "f2"),
    "BFloat16Storage": ("u2", "f4"), "LongStorage": ("i8", "i8"), "IntStorage": ("i4", "i4"),
    "ShortStorage": ("i2", "i2"), "CharStorage": ("i1", "i1"), "ByteStorage": ("u1", "u1"),
    "BoolStorage": ("?", "?"),
}

# Training-state objects pickled beside the weights in 12-in-1's `pytorch_ckpt_latest.tar`. They are read as
# inert attribute bags: their classes are never imported (tbLogger's __setstate__ would open files).
INERT_CLASSES = {("vilbert.utils", "tbLogger"), ("vilbert.utils", "MultiTaskStopOnPlateau")}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass
class _StorageRef:
    key: str
    storage_type: str


@dataclass
class _TensorRef:
    """A tensor in the pickle: shape, strides and offset (in elements) into a storage read later."""

    storage: _StorageRef
    offset: int
    shape: tuple
    stride: tuple


class _Inert:
    """Stand-in for an object of INERT_CLASSES: accepts any arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, *_):  # _v2 adds requires_grad, hooks[, metadata]
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"a tensor is rebuilt from a {type(storage).__name__}, not from a storage")
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_):  # a pickled nn.Parameter: its data is all a state_dict needs
    return data


_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core

# The only globals a checkpoint pickle may name. numpy's are what paddle.save writes for arrays, under both
# module names (files written with numpy 1 say numpy.core).
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "tuple"): tuple,  # paddle.save writes nested tensors as (internal name, array) tuples
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"{module}.multiarray", name): getattr(_NUMPY_CORE.multiarray, name)
       for module in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")},
}


class _RestrictedUnpickler(RestrictedUnpickler):
    """Unpickles only state_dict-shaped data: refuses every global outside ALLOWED_GLOBALS, torch storage
    types and INERT_CLASSES, so no pickled code can run."""

    def __init__(self, file, path):
        super().__init__(file, path, ALLOWED_GLOBALS, "a checkpoint holds only tensors and plain containers, so "
                         "this file is not a checkpoint or is unsafe", error=CheckpointError)
        self.storages = {}  # key -> _StorageRef of every storage the pickle refers to

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in INERT_CLASSES:
            return _Inert
        return super().find_class(module, name)

    def persistent_load(self, pid):
        # zip: ('storage', storage type, key, location, numel); legacy adds view metadata, None since torch 0.4
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.path}: unknown persistent id {pid!r} in the pickle")
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointError(f"{self.path}: storage views (files of torch < 0.4) are not supported; load and "
                                  "re-save the state_dict with a newer torch")
        key = str(pid[2])
        return self.storages.setdefault(key, _StorageRef(key, pid[1].name))


@dataclass
class Checkpoint:
    """A checkpoint's tensors and where they come from.

    `source` decides the conversion: "torch" (official, Linear weights [out, in]), "paddle-port" (the
    earlier Paddle port: [in, out], own heads and an untied MLM decoder) or "paddle" (this project).
    """

    state: dict
    source: str
    container: str  # "torch legacy", "torch zip" or "paddle pickle"
    notes: list = field(default_factory=list)


def read_state_dict(path) -> dict:
    """Name -> numpy array of an official `.bin`/`.tar` (either torch format) or a `.pdparams`."""
    return read_checkpoint(path).state


def read_checkpoint(path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; check the path, or download the released "
                                "weights as README.md describes")
    notes = []
    if zipfile.is_zipfile(path):
        state, container = _read_torch_zip(path, notes), "torch zip"
    else:
        state, container = _read_pickle_stream(path, notes)
    if container.startswith("torch"):
        source = "torch"
    else:
        source = "paddle-port" if any(PORT_ONLY.match(key) for key in state) else "paddle"
    return Checkpoint(state, source, container, notes)


def read_training_state(path) -> dict:
    """A resumable `last.pdparams` (model, optimizer, epoch, best, options), read by the same restricted
    unpickler as every checkpoint: `paddle.load` would run any code pickled into it. Tensors come back as numpy
    arrays (paddle.save stores each as an (internal name, array) pair), which `set_state_dict` takes as they are."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    with open(path, "rb") as f:
        state = _plain_tree(_load(_RestrictedUnpickler(f, path), path), path)
    missing = [key for key in ("model", "optimizer", "epoch", "best")
               if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a resumable checkpoint of train.py (no {', '.join(missing)}); resume "
                              "from a run's last.pdparams, or start the run with --from_pretrained")
    return state


def _plain_tree(obj, path: Path):
    """`obj` with paddle.save's (name, array) pairs replaced by their arrays; torch tensors are refused."""
    if isinstance(obj, dict):
        return type(obj)((key, _plain_tree(value, path)) for key, value in obj.items())
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        return obj[1]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain_tree(value, path) for value in obj)
    if isinstance(obj, (_TensorRef, _StorageRef, _Inert)):
        raise CheckpointError(f"{path}: holds a torch tensor or training object, not the state train.py saves")
    return obj


def _read_torch_zip(path: Path, notes: list) -> dict:
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: a zip file without exactly one <archive>/data.pkl is not a torch.save "
                                  "checkpoint")
        prefix = pickles[0][:-len("data.pkl")]
        names = set(archive.namelist())
        byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        with archive.open(pickles[0]) as f:
            unpickler = _RestrictedUnpickler(f, path)
            state = _unwrap(_load(unpickler, path), path, notes)

        def read_storage(ref: _StorageRef) -> np.ndarray:
            name = f"{prefix}data/{ref.key}"
            if name not in names:
                raise CheckpointError(f"{path}: storage {name} is missing from the archive (truncated download?)")
            return _storage_array(archive.read(name), ref, byteorder, path)

        return _materialize(state, read_storage)


def _read_pickle_stream(path: Path, notes: list):
    """A legacy torch.save stream (magic, protocol, sys_info, pickle, storage keys, raw storages) or a paddle pickle."""
    with open(path, "rb") as f:
        first = _load(_RestrictedUnpickler(f, path), path)
        if first != TORCH_MAGIC:
            return _materialize(_unwrap(first, path, notes), _no_storages(path)), "paddle pickle"
        protocol = _load(_RestrictedUnpickler(f, path), path)
        if protocol != TORCH_LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: torch legacy protocol {protocol} is not supported (only 1001)")
        _load(_RestrictedUnpickler(f, path), path)  # sys_info; the storages are little-endian regardless
        unpickler = _RestrictedUnpickler(f, path)
        state = _unwrap(_load(unpickler, path), path, notes)
        keys = _load(_RestrictedUnpickler(f, path), path)
        offsets = {}  # key -> (file offset of the data, numel)
        for key in keys:
            header = f.read(8)
            if key not in unpickler.storages or len(header) != 8:
                raise CheckpointError(f"{path}: storage {key} is not described by the pickle or is truncated")
            numel = int.from_bytes(header, "little")
            offsets[key] = (f.tell(), numel)
            f.seek(numel * np.dtype(STORAGE_DTYPES[unpickler.storages[key].storage_type][0]).itemsize, os.SEEK_CUR)

        def read_storage(ref: _StorageRef) -> np.ndarray:
            if ref.key not in offsets:
                raise CheckpointError(f"{path}: storage {ref.key} is missing from the file (truncated download?)")
            start, numel = offsets[ref.key]
            itemsize = np.dtype(STORAGE_DTYPES[ref.storage_type][0]).itemsize
            f.seek(start)
            return _storage_array(f.read(numel * itemsize), ref, "little", path)

        return _materialize(state, read_storage), "torch legacy"


def _no_storages(path: Path):
    def read_storage(ref: _StorageRef):
        raise CheckpointError(f"{path}: a Paddle pickle that refers to torch storages is not a checkpoint")
    return read_storage


def _load(unpickler: _RestrictedUnpickler, path: Path):
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or foreign files fail in many ways inside pickle
        raise CheckpointError(f"{path}: not a readable PyTorch or Paddle checkpoint ({type(e).__name__}: {e}); "
                              "re-download it or check the path") from None


def _storage_array(data: bytes, ref: _StorageRef, byteorder: str, path: Path) -> np.ndarray:
    stored, result = STORAGE_DTYPES[ref.storage_type]
    dtype = np.dtype(stored).newbyteorder("<" if byteorder == "little" else ">")
    if len(data) % dtype.itemsize:
        raise CheckpointError(f"{path}: storage {ref.key} has {len(data)} bytes, not a whole number of {dtype}")
    array = np.frombuffer(data, dtype)
    if ref.storage_type == "BFloat16Storage":  # bfloat16 is the upper half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(result, copy=False)


def _unwrap(obj, path: Path, notes: list) -> dict:
    """The state_dict inside `obj`: unwraps training checkpoints and strips a DataParallel `module.` prefix."""
    for wrapper in ("model_state_dict", "state_dict", "model"):  # 12-in-1 .tar, common, our last.pdparams
        if isinstance(obj, dict) and not _is_state_dict(obj) and isinstance(obj.get(wrapper), dict):
            others = sorted(str(k) for k in obj if k != wrapper)
            notes.append(f"read the weights under {wrapper!r}; ignored {', '.join(others) or 'nothing else'}")
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    state = {}
    for key, value in obj.items():
        if key == PADDLE_METADATA:
            continue
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
            value = value[1]  # paddle.save of a nested state_dict: (internal name, array)
        if not isinstance(value, (np.ndarray, _TensorRef)) or getattr(value, "dtype", None) == object:
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                                  "this file is not a model state_dict")
        state[str(key)] = value
    if state and all(key.startswith("module.") for key in state):
        notes.append("stripped the DataParallel 'module.' prefix from every key")
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, (np.ndarray, _TensorRef)) or k == PADDLE_METADATA for k, v in obj.items())


def _materialize(state: dict, read_storage) -> dict:
    """Turns each _TensorRef into its own C-contiguous array; each storage is read once, shared ones included."""
    cache = {}
    arrays = {}
    for key, value in state.items():
        if isinstance(value, _TensorRef):
            ref = value.storage
            if ref.key not in cache:
                cache[ref.key] = read_storage(ref)
            value = _view(cache[ref.key], value, key)
        arrays[key] = value
    return arrays


def _view(storage: np.ndarray, ref: _TensorRef, key: str) -> np.ndarray:
    if len(ref.shape) != len(ref.stride) or any(s < 0 for s in ref.stride):
        raise CheckpointError(f"tensor {key}: invalid size {ref.shape} / stride {ref.stride}")
    if 0 in ref.shape:
        return np.zeros(ref.shape, storage.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if ref.offset < 0 or last >= storage.size:
        raise CheckpointError(f"tensor {key}: size {ref.shape} stride {ref.stride} offset {ref.offset} runs past "
                              f"its storage of {storage.size} elements; the file is corrupt or truncated")
    strides = [s * storage.itemsize for s in ref.stride]
    return np.lib.stride_tricks.as_strided(storage[ref.offset:], ref.shape, strides).copy(order="C")


# ----------------------------------------------------------------------------------------------------
# Conversion


@dataclass
class LoadReport:
    """What a conversion did with each checkpoint key, and what does not fit."""

    source: str
    container: str = ""  # set when read from a file
    kept: list = field(default_factory=list)
    transposed: list = field(default_factory=list)
    renamed: list = field(default_factory=list)  # (old, new)
    dropped: dict = field(default_factory=dict)  # reason -> keys
    fresh: list = field(default_factory=list)  # model keys left at their init (task-specific, allowed)
    missing: list = field(default_factory=list)  # (key, model shape)
    unexpected: list = field(default_factory=list)  # (key, checkpoint shape)
    mismatched: list = field(default_factory=list)  # (key, checkpoint shape as converted, model shape, transposed)
    head_conflicts: list = field(default_factory=list)  # one line per head the checkpoint cannot fill as it is
    notes: list = field(default_factory=list)

    def problems(self) -> list:
        lines = list(self.head_conflicts)
        lines += [f"missing from the checkpoint: {key} {list(shape)}" for key, shape in self.missing]
        lines += [f"unexpected in the checkpoint: {key} {list(shape)}" for key, shape in self.unexpected]
        for key, shape, wanted, transposed in self.mismatched:
            how = " (after transposing the torch Linear weight)" if transposed else ""
            lines.append(f"shape mismatch: {key} is {list(shape)}{how} in the checkpoint, {list(wanted)} in the model")
        return lines

    def summary(self) -> str:
        origin = {"torch": "official PyTorch", "paddle-port": "earlier Paddle port", "paddle": "ViLBERT-Paddle"}
        first = f"kept {len(self.kept)} tensors from the {origin[self.source]} checkpoint"
        first += f" ({self.container})" if self.container else ""
        first += f"; transposed {len(self.transposed)} Linear weights to [in, out]" if self.transposed else ""
        lines = [first] + self.notes
        if self.renamed:
            lines.append(f"renamed {len(self.renamed)} TF-style gamma/beta keys to weight/bias")
        lines += [f"dropped {len(keys)} {reason}" for reason, keys in self.dropped.items()]
        if self.fresh:
            heads = sorted({key.split(".")[0] if TASK_HEADS.match(key) else key.rsplit(".", 1)[0]
                            for key in self.fresh})
            lines.append(f"freshly initialised {', '.join(heads)}: the checkpoint holds no task head (pretraining)")
        return "\n".join(lines)


def convert_state_dict(state: dict, target_shapes: dict, source: str, *, allow_fresh_heads: bool = True):
    """Official (or port/our) tensors -> the model's names and layout; returns (converted, LoadReport).

    `target_shapes` maps each model key to its shape. Nothing is raised here: every key that does not fit is
    recorded in the report, whose `problems()` is empty exactly when the converted dict fits the model.
    """
    if source not in ("torch", "paddle-port", "paddle"):
        raise ValueError(f"unknown checkpoint source {source!r}")
    report = LoadReport(source)
    state = dict(state)
    if any(k.startswith("bert.") for k in target_shapes) and state and not any(k.startswith("bert.") for k in state):
        state = {"bert." + key: value for key, value in state.items()}  # official: loaded into model.bert
        report.notes.append("no key starts with 'bert.': read as the weights of the trunk (model.bert)")
    conflict = _vil_prediction_conflict(state, target_shapes)
    if conflict:  # one line instead of a missing, unexpected or mis-shaped key per tensor of the head
        report.head_conflicts.append(conflict)
        state = {key: value for key, value in state.items() if not key.startswith("vil_prediction.")}
        target_shapes = {key: shape for key, shape in target_shapes.items() if not key.startswith("vil_prediction.")}
    converted = {}
    for key, value in state.items():
        name = key
        for old, new in RENAMES:
            name = name.replace(old, new)
        if name != key:
            report.renamed.append((key, name))
        if name not in target_shapes:
            reason = next((reason for reason, pattern in DROPPED if pattern.match(name)), None)
            if reason is None:
                report.unexpected.append((name, value.shape))
            else:
                report.dropped.setdefault(reason, []).append(name)
            continue
        transpose = source == "torch" and is_linear_weight(name)
        if transpose:
            value = value.T
        if tuple(value.shape) != tuple(target_shapes[name]):
            report.mismatched.append((name, value.shape, tuple(target_shapes[name]), transpose))
            continue
        if transpose:
            report.transposed.append(name)
        converted[name] = value
        report.kept.append(name)
    task_specific_held = any(TASK_HEADS.match(key) for key in state)
    present = set(converted) | {key for key, *_ in report.mismatched}
    for name, shape in target_shapes.items():
        if name in present:
            continue
        if allow_fresh_heads and not task_specific_held and any(p.match(name) for p in TASK_SPECIFIC):
            report.fresh.append(name)
        else:
            report.missing.append((name, tuple(shape)))
    return converted, report


def _classifier_of(keys) -> str:
    """The family ("beta" or "12in1") of the vil_prediction among `keys`, or "" when there is none."""
    return next((family for family, (_, prefix, _) in CLASSIFIER_KEYS.items()
                 if any(key.startswith(prefix) for key in keys)), "")


def _vil_prediction_conflict(state: dict, target_shapes: dict) -> str:
    """Why the checkpoint's vil_prediction cannot fill the model's (other family, other answer count), or ""."""
    held, built = _classifier_of(state), _classifier_of(target_shapes)
    if not held or not built:
        return ""
    if held != built:
        (held_name, held_prefix, _), (built_name, built_prefix, _) = CLASSIFIER_KEYS[held], CLASSIFIER_KEYS[built]
        return (f"vil_prediction: the checkpoint holds {held_name}'s classifier ({held_prefix}*), the model "
                f"{built_name}'s ({built_prefix}*): set --classifier {held}")
    bias = CLASSIFIER_KEYS[held][2]
    if bias in state and bias in target_shapes and state[bias].shape[0] != target_shapes[bias][0]:
        return (f"the checkpoint's vil_prediction has {state[bias].shape[0]} answers, the model "
                f"{target_shapes[bias][0]}: use the answer vocabulary ({ANSWER_VOCABULARY}) the checkpoint was "
                "trained with")
    return ""


def heads_of(state: dict, head_names) -> dict:
    """The `VILBertForVLTasks` head arguments (heads, classifier, num_labels) that keep every task head of
    `state` among `head_names` (the model's): what a converted checkpoint keeps. None for a pretraining one."""
    kwargs = {"heads": tuple(head for head in head_names if any(key.startswith(head + ".") for key in state))}
    family = _classifier_of(state)
    if family:
        kwargs.update(classifier=family, num_labels=int(state[CLASSIFIER_KEYS[family][2]].shape[0]))
    return kwargs


# ----------------------------------------------------------------------------------------------------
# Loading into a model, saving


def convert_checkpoint(path, target_shapes, *, allow_fresh_heads: bool = True):
    """Reads and converts a checkpoint for a model of `target_shapes` (a dict, or a function of the checkpoint's
    state dict returning one: the model to convert for can depend on the heads the file holds); returns
    (converted, LoadReport).

    Raises FileNotFoundError for a missing file and one CheckpointError listing every key that does not fit.
    """
    checkpoint = read_checkpoint(path)
    if callable(target_shapes):
        target_shapes = target_shapes(checkpoint.state)
    converted, report = convert_state_dict(checkpoint.state, target_shapes, checkpoint.source,
                                           allow_fresh_heads=allow_fresh_heads)
    report.container = checkpoint.container
    report.notes[:0] = checkpoint.notes
    problems = report.problems()
    where = f"{path} ({checkpoint.container}) does not fit the model"
    if problems and problems == report.head_conflicts:  # each says what to change: one line
        raise CheckpointError(f"{where}: {'; '.join(problems)}")
    if problems:
        hint = ("\nCheck that the model config (--config_file) is the one the checkpoint was trained with "
                "(config/bert_base_6layer_6conect.json for the released ViLBERT weights).")
        if any("task_embeddings" in line for line in problems):
            hint += "\nbert.embeddings.task_embeddings is the 12-in-1 task token: set task_specific_tokens to match."
        raise CheckpointError(f"{where}: {len(problems)} problem(s)\n  " + "\n  ".join(problems) + hint)
    return converted, report


def load_pretrained(model, path, *, allow_fresh_heads: bool = True, log=print) -> LoadReport:
    """Sets `model`'s weights from a checkpoint of any supported kind, strictly (see `convert_checkpoint`).

    Values are cast to each parameter's dtype. With `allow_fresh_heads`, a pretraining checkpoint (no task head)
    leaves the model's task heads (and a 12-in-1 task token) at its init, with a notice.
    """
    params = model.state_dict()
    converted, report = convert_checkpoint(path, {k: tuple(v.shape) for k, v in params.items()},
                                           allow_fresh_heads=allow_fresh_heads)
    for name, array in converted.items():
        param = params[name]  # numpy in, so the value lands on the parameter's device (a Tensor would be adopted)
        # np.asarray, not np.ascontiguousarray, which makes a 0-d array (weight_norm's weight_g) 1-d
        param.set_value(np.asarray(array, dtype=str(param.dtype).removeprefix("paddle."), order="C"))
    log(f"{path}: " + report.summary())
    return report


def save_checkpoint(obj, path, *, hash_in_name: bool = False) -> Path:
    """`paddle.save(obj)` written atomically (temp file beside it + os.replace); returns the final path.

    With `hash_in_name`, the name gets the first 8 hex digits of the file's sha256 before its suffix
    (`out/model.pdparams` -> `out/model-1a2b3c4d.pdparams`), so a copy can be checked against its name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        paddle.save(obj, str(tmp))
        if hash_in_name:
            path = path.with_name(f"{path.stem}-{sha256_of(tmp)[:8]}{path.suffix}")
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        renamed = naming_target(error, path, tmp)
        if renamed:
            raise renamed from error
        raise
    return path


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
