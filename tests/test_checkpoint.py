"""Checkpoint reading, conversion and strict loading, on synthetic official files.

The torch files are written here byte for byte (a pure-Python pickler that emits the torch globals by name),
in both the legacy stream format and the zip format, so these tests need no torch.
"""

import collections
import hashlib
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from vilbert.checkpoint import (DROPPED, LINEAR_WEIGHTS, CheckpointError, convert_state_dict, is_linear_weight,
                                load_pretrained, read_checkpoint, read_state_dict, read_training_state,
                                save_checkpoint)
from vilbert.config import ViLBertConfig
from vilbert.model import TASK_HEADS, VILBertForVLTasks
from tools.convert_checkpoint import main as convert_main

ROOT = Path(__file__).resolve().parents[1]
CLS, HEADS, Q_DENSE = (reason for reason, _ in DROPPED)
# name / shape / numel of every entry of the official 12-in-1 VILBertForVLTasks state_dict (bert_base_6layer_6conect)
OFFICIAL_TABLE = ROOT / "tests" / "data" / "official_state_dict_bert_base_6layer_6conect.tsv"
TINY = dict(vocab_size=40, hidden_size=12, num_hidden_layers=3, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=10, v_feature_size=6, v_hidden_size=8, v_num_hidden_layers=2,
            v_num_attention_heads=2, v_intermediate_size=10, bi_hidden_size=8, bi_num_attention_heads=2,
            v_biattention_id=[0, 1], t_biattention_id=[1, 2], num_task_tokens=3)


# ----------------------------------------------------------------------------------------------------
# A minimal torch.save writer


class Global(NamedTuple):
    """A torch global written by name; never called here."""

    module: str
    name: str

    def __call__(self, *args):  # the pickler only accepts callables as reduce functions
        raise TypeError(f"{self.module}.{self.name} is a stand-in")


class Storage:
    def __init__(self, data: np.ndarray, kind: str = "FloatStorage"):
        self.data, self.kind = np.ascontiguousarray(data).reshape(-1), kind


class Tensor:
    """What torch pickles for a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage: Storage, shape, stride=None, offset=0):
        shape = tuple(shape)
        if stride is None:
            stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        self.storage, self.shape, self.stride, self.offset = storage, shape, tuple(stride), offset

    def __reduce_ex__(self, protocol):
        return (Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict()))


class Parameter:
    """What torch pickles for an nn.Parameter: _rebuild_parameter(tensor, requires_grad, hooks)."""

    def __init__(self, data: Tensor):
        self.data = data

    def __reduce_ex__(self, protocol):
        return Global("torch._utils", "_rebuild_parameter"), (self.data, True, collections.OrderedDict())


def tensor(array, kind="FloatStorage") -> Tensor:
    array = np.asarray(array)
    return Tensor(Storage(array, kind), array.shape)


class TorchPickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy, self.storages = legacy, {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        key = self.storages.setdefault(id(obj), (str(len(self.storages)), obj))[0]
        pid = ("storage", Global("torch", obj.kind), key, "cpu", obj.data.size)
        return pid + (None,) if self.legacy else pid

    def save_global_ref(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[Global] = save_global_ref


def write_torch(path, obj, legacy: bool, byteorder: str = "little") -> Path:
    buffer = io.BytesIO()
    pickler = TorchPickler(buffer, legacy)
    pickler.dump(obj)
    storages = dict(pickler.storages.values())
    if legacy:
        with open(path, "wb") as f:
            for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
                pickle.dump(header, f, protocol=2)
            f.write(buffer.getvalue())
            pickle.dump(sorted(storages), f, protocol=2)
            for key in sorted(storages):
                f.write(struct.pack("<q", storages[key].data.size) + storages[key].data.tobytes())
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("pytorch_model/data.pkl", buffer.getvalue())
            archive.writestr("pytorch_model/byteorder", byteorder)
            for key, storage in storages.items():
                data = storage.data.astype(storage.data.dtype.newbyteorder("<" if byteorder == "little" else ">"))
                archive.writestr(f"pytorch_model/data/{key}", data.tobytes())
            archive.writestr("pytorch_model/version", "3\n")
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# Synthetic official checkpoints of the tiny model


def tiny_model(seed: int, heads=("vision_logit",), num_labels=0, classifier="beta", **changes) -> VILBertForVLTasks:
    paddle.seed(seed)
    return VILBertForVLTasks(ViLBertConfig.from_dict({**TINY, **changes}), heads=heads, num_labels=num_labels,
                             classifier=classifier)


def model_linear_weights(model) -> set:
    return {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}


def official_state(model, heads: str = "mt", rng=None) -> collections.OrderedDict:
    """The model's weights as the official code saves them (torch layout, tied decoder, q_dense, cls, heads).

    heads: "mt" (12-in-1 VILBertForVLTasks), "beta" (weight-normed vil_prediction) or "pretraining" (none).
    """
    rng = rng or np.random.default_rng(0)
    config = model.config
    linear = model_linear_weights(model)
    state = collections.OrderedDict()
    for name, value in model.state_dict().items():
        array = value.numpy()
        if name.startswith("vision_logit"):
            continue  # added with the other heads below
        if name == "bert.embeddings.word_embeddings.weight":
            state[name] = words = tensor(array)
        else:
            state[name] = tensor(array.T if name in linear else array)  # torch Linear weights are [out, in]

    def linear_(prefix, n_in, n_out, bias=True):
        state[prefix + ".weight"] = tensor(rng.standard_normal((n_out, n_in)).astype("float32"))
        if bias:
            state[prefix + ".bias"] = tensor(rng.standard_normal(n_out).astype("float32"))

    for i in range(len(config.v_biattention_id)):
        linear_(f"bert.encoder.c_layer.{i}.biOutput.q_dense1", config.bi_hidden_size, config.v_hidden_size)
        linear_(f"bert.encoder.c_layer.{i}.biOutput.q_dense2", config.bi_hidden_size, config.hidden_size)
    state["cls.predictions.bias"] = tensor(np.zeros(config.vocab_size, "float32"))
    linear_("cls.predictions.transform.dense", config.hidden_size, config.hidden_size)
    state["cls.predictions.decoder.weight"] = Tensor(words.storage, words.shape)  # tied: the same storage
    linear_("cls.bi_seq_relationship", config.bi_hidden_size, 2)
    linear_("cls.imagePredictions.decoder", config.v_hidden_size, 7)
    if heads == "pretraining":
        return state
    if heads == "beta":
        for layer, (n_in, n_out) in (("0", (config.bi_hidden_size, 2 * config.bi_hidden_size)),
                                     ("3", (2 * config.bi_hidden_size, 1))):
            state[f"vil_prediction.main.{layer}.weight_g"] = tensor(np.float32(1.5))  # 0-d
            state[f"vil_prediction.main.{layer}.weight_v"] = tensor(rng.standard_normal((n_out, n_in)).astype("f4"))
            state[f"vil_prediction.main.{layer}.bias"] = tensor(np.zeros(n_out, "float32"))
    else:
        linear_("vil_prediction.logit_fc.0", config.bi_hidden_size, 2 * config.bi_hidden_size)
        state["vil_prediction.logit_fc.2.weight"] = tensor(np.ones(2 * config.bi_hidden_size, "float32"))
        linear_("vil_tri_prediction", config.bi_hidden_size, 3)
    linear_("vil_logit", config.bi_hidden_size, 1)
    state["vision_logit.weight"] = tensor(model.vision_logit.weight.numpy().T)
    state["vision_logit.bias"] = tensor(model.vision_logit.bias.numpy())
    linear_("linguisic_logit", config.hidden_size, 1)
    return state


def assert_same_weights(model, reference, skip=()):
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        if not name.startswith(tuple(skip)):
            np.testing.assert_array_equal(value.numpy(), expected[name].numpy(), err_msg=name)


@pytest.fixture(scope="module")
def source_model():
    return tiny_model(seed=1)


# ----------------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("legacy,byteorder", [(True, "little"), (False, "little"), (False, "big")],
                         ids=["legacy", "zip", "zip-big-endian"])
def test_reads_dtypes_views_offsets_and_shared_storages(tmp_path, legacy, byteorder):
    rng = np.random.default_rng(0)
    base = rng.standard_normal(24).astype("float32")
    shared = Storage(base)
    bf16 = rng.standard_normal(5).astype("float32")
    bf16 = (bf16.view(np.uint32) & 0xFFFF0000).view(np.float32)  # exactly representable in bfloat16
    state = collections.OrderedDict([
        ("matrix", Tensor(shared, (4, 6))),
        ("transposed", Tensor(shared, (6, 4), stride=(1, 6))),  # a non-contiguous view of the same storage
        ("slice", Tensor(shared, (2, 3), stride=(6, 2), offset=7)),
        ("scalar", tensor(np.float32(2.5))),  # 0-d, as beta's weight_norm weight_g
        ("half", tensor(rng.standard_normal(3).astype("float16"), "HalfStorage")),
        ("bf16", tensor((bf16.view(np.uint32) >> 16).astype(np.uint16), "BFloat16Storage")),
        ("long", tensor(np.arange(-2, 3, dtype="int64"), "LongStorage")),
        ("mask", tensor(np.array([True, False, True]), "BoolStorage")),
        ("empty", tensor(np.zeros((0, 3), "float32"))),
        ("parameter", Parameter(tensor(np.arange(3, dtype="float32")))),
    ])
    read = read_state_dict(write_torch(tmp_path / "f.bin", state, legacy, byteorder))
    matrix = base.reshape(4, 6)
    expected = {"matrix": matrix, "transposed": matrix.T, "slice": matrix[1:3, 1::2], "scalar": np.float32(2.5),
                "half": state["half"].storage.data, "bf16": bf16, "long": np.arange(-2, 3), "mask": [True, False, True],
                "empty": np.zeros((0, 3), "float32"), "parameter": np.arange(3, dtype="float32")}
    assert list(read) == list(expected)
    for name, value in expected.items():
        value = np.asarray(value)
        assert read[name].dtype == value.dtype and read[name].shape == value.shape, name
        np.testing.assert_array_equal(read[name], value, err_msg=name)
        assert read[name].flags.c_contiguous and read[name].flags.writeable
    read["matrix"][0, 0] = 99.0  # each tensor owns its memory, even when the file shares a storage
    assert read["transposed"][0, 0] == base[0]


def test_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Global("os", "system"), (f"touch {marker}",))

    for legacy in (True, False):
        path = write_torch(tmp_path / f"evil{legacy}.bin", {"w": Exploit()}, legacy)
        with pytest.raises(CheckpointError, match="refusing to unpickle global os.system"):
            read_state_dict(path)
    evil = tmp_path / "evil.pdparams"  # a Paddle-style pickle
    evil.write_bytes(b"\x80\x02cbuiltins\neval\nX\x0e\x00\x00\x00print('pwned')\x85R.")
    with pytest.raises(CheckpointError, match="builtins.eval"):
        read_state_dict(evil)
    assert not marker.exists()


@pytest.mark.parametrize("wrapper", ["model_state_dict", "state_dict"])
def test_unwraps_training_checkpoints_and_strips_module_prefix(tmp_path, source_model, wrapper):
    # 12-in-1 pytorch_ckpt_latest.tar: weights under model_state_dict, beside optimizer state and a tbLogger
    state = official_state(source_model)
    wrapped = {wrapper: collections.OrderedDict(("module." + k, v) for k, v in state.items()),
               "optimizer_state_dict": {"state": {0: {"exp_avg": tensor(np.ones(2, "float32"))}}},
               "tb_logger": Logger(), "epoch_id": 3}
    path = write_torch(tmp_path / "pytorch_ckpt_latest.tar", wrapped, legacy=True)
    checkpoint = read_checkpoint(path)
    assert list(checkpoint.state) == list(state)
    assert f"read the weights under {wrapper!r}; ignored epoch_id, optimizer_state_dict, tb_logger" in checkpoint.notes
    assert any("'module.' prefix" in note for note in checkpoint.notes)
    model = tiny_model(seed=2)
    load_pretrained(model, path, log=lambda *_: None)
    assert_same_weights(model, source_model)


class Logger:
    """Pickled as 12-in-1's vilbert.utils.tbLogger, a class that must never be imported or run."""

    def __reduce__(self):
        return (Global("vilbert.utils", "tbLogger"), (), {"log_dir": "logs", "task_loss": {1: 0.5}})


def test_truncated_or_foreign_files_are_reported_as_such(tmp_path, source_model):
    path = write_torch(tmp_path / "model.bin", official_state(source_model), legacy=True)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(path)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch or Paddle checkpoint"):
        read_state_dict(text)


@pytest.mark.parametrize("name", ["official_tiny_beta_legacy.bin", "official_tiny_mt_zip.bin"])
def test_files_written_by_real_torch_read_exactly_and_load(name):
    """Fixtures saved by the official code with torch (tools/make_parity_reference.py); weights in the npz."""
    reference = np.load(ROOT / "tests" / "data" / "official_tiny.npz")
    weights = {key[len("weight/"):]: reference[key] for key in reference.files if key.startswith("weight/")}
    state = read_state_dict(ROOT / "tests" / "data" / name)
    common = set(state) & set(weights)
    assert len(common) >= len(weights) - 6  # the mt file has its own vil_prediction head instead of beta's
    for key in common:
        assert state[key].dtype == weights[key].dtype and state[key].shape == weights[key].shape, key
        np.testing.assert_array_equal(state[key], weights[key], err_msg=key)
    if "beta" in name:
        assert set(state) == set(weights) and state["vil_prediction.main.0.weight_g"].shape == ()
    model = VILBertForVLTasks(ViLBertConfig.from_dict(json.loads(str(reference["config_json"]))))
    report = load_pretrained(model, ROOT / "tests" / "data" / name, log=lambda *_: None)
    assert report.fresh == [] and report.problems() == []
    for key, value in model.state_dict().items():
        expected = weights[key].T if is_linear_weight(key) else weights[key]
        np.testing.assert_array_equal(value.numpy(), expected, err_msg=key)


def real_torch_file_model(classifier: str, num_labels: int) -> VILBertForVLTasks:
    """The model of tests/data/official_tiny*.bin with every task head."""
    reference = np.load(ROOT / "tests" / "data" / "official_tiny.npz")
    return VILBertForVLTasks(ViLBertConfig.from_dict(json.loads(str(reference["config_json"]))), heads=TASK_HEADS,
                             num_labels=num_labels, classifier=classifier)


@pytest.mark.parametrize("name, classifier, num_labels, other_heads", [
    ("official_tiny_beta_legacy.bin", "beta", 7, 2),  # linguisic_logit
    ("official_tiny_mt_zip.bin", "12in1", 3129, 16),  # + vil_prediction_gqa, vil_binary_prediction, vil_tri_prediction
])
def test_each_familys_file_loads_every_head_with_every_key_accounted_for(name, classifier, num_labels, other_heads):
    path = ROOT / "tests" / "data" / name
    lines = []
    report = load_pretrained(real_torch_file_model(classifier, num_labels), path, log=lines.append)
    assert report.problems() == [] and report.fresh == []
    dropped = {reason: len(keys) for reason, keys in report.dropped.items()}
    assert dropped == {Q_DENSE: 8, CLS: 14, HEADS: other_heads}
    assert sorted(report.kept + sum(report.dropped.values(), [])) == sorted(read_state_dict(path))
    assert len(report.kept) == 201 and len(report.transposed) == 74
    assert {key.split(".")[0] for key in report.kept if not key.startswith("bert.")} == set(TASK_HEADS)
    assert lines[0].splitlines()[0].endswith("; transposed 74 Linear weights to [in, out]")


@pytest.mark.parametrize("name, classifier, num_labels, held", [
    ("official_tiny_mt_zip.bin", "beta", 3129, "12in1"), ("official_tiny_beta_legacy.bin", "12in1", 7, "beta")])
def test_a_vil_prediction_of_the_other_family_says_which_classifier_to_set(name, classifier, num_labels, held):
    with pytest.raises(CheckpointError) as excinfo:
        load_pretrained(real_torch_file_model(classifier, num_labels), ROOT / "tests" / "data" / name)
    message = str(excinfo.value)
    assert "\n" not in message and message.endswith(f": set --classifier {held}")
    assert "vil_prediction.logit_fc.*" in message and "vil_prediction.main.*" in message


def test_a_vil_prediction_of_another_answer_count_names_the_answer_vocabulary():
    with pytest.raises(CheckpointError) as excinfo:
        load_pretrained(real_torch_file_model("beta", 5), ROOT / "tests" / "data" / "official_tiny_beta_legacy.bin")
    assert str(excinfo.value).endswith(
        "official_tiny_beta_legacy.bin (torch legacy) does not fit the model: the checkpoint's vil_prediction has 7 "
        "answers, the model 5: use the answer vocabulary (cache/trainval_ans2label.pkl) the checkpoint was trained with")


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_beta_vil_prediction_keeps_its_0d_weight_g_through_torch_and_paddle_files(tmp_path, source_model, legacy):
    state = official_state(source_model, "beta")
    path = write_torch(tmp_path / "pytorch_model_19.bin", state, legacy)
    model = tiny_model(seed=2, heads=TASK_HEADS, num_labels=1)
    report = load_pretrained(model, path, log=lambda *_: None)
    assert report.problems() == [] and "vil_prediction.main.0.weight_g" in report.kept
    head = model.vil_prediction.main[0]
    assert head.weight_g.shape == [] and float(head.weight_g) == 1.5
    np.testing.assert_array_equal(head.weight_v.numpy(), state["vil_prediction.main.0.weight_v"].storage.data
                                  .reshape(2 * TINY["bi_hidden_size"], TINY["bi_hidden_size"]).T)
    ours = save_checkpoint(model.state_dict(), tmp_path / "vqa.pdparams")
    read = read_checkpoint(ours)
    assert read.source == "paddle" and read.state["vil_prediction.main.0.weight_g"].shape == ()
    again = tiny_model(seed=3, heads=TASK_HEADS, num_labels=1)
    load_pretrained(again, ours, log=lambda *_: None)
    assert_same_weights(again, model)


# ----------------------------------------------------------------------------------------------------
# Official layout: which weights are transposed


def full_size_model(task_tokens: bool) -> VILBertForVLTasks:
    """The bert_base_6layer_6conect model, parameters not allocated (shapes only)."""
    config = json.loads((ROOT / "config" / "bert_base_6layer_6conect.json").read_text())
    with paddle.LazyGuard():
        return VILBertForVLTasks(ViLBertConfig.from_dict({**config, "task_specific_tokens": task_tokens}))


def official_table():
    rows = [line.split("\t") for line in OFFICIAL_TABLE.read_text().splitlines()[1:]]
    return {name: tuple(int(n) for n in shape.strip("[]").split(", ") if n) for name, shape, _ in rows}


def test_transpose_list_is_every_official_linear_weight():
    table = official_table()
    lookup_tables = {f"bert.embeddings.{t}_embeddings.weight" for t in ("word", "position", "token_type")}
    matched = {name for name in table if is_linear_weight(name)}
    assert matched == {name for name, shape in table.items() if len(shape) == 2} - lookup_tables
    assert len(matched) == 211
    assert "bert.v_embeddings.image_location_embeddings.weight" in matched
    torch_only = [p for p in LINEAR_WEIGHTS if not p.pattern.startswith(r"vil_prediction\.main")]  # beta's head
    assert all(any(p.fullmatch(name) for name in table) for p in torch_only), "a pattern matches nothing"
    assert is_linear_weight("vil_prediction.main.0.weight_v") and not is_linear_weight("vil_prediction.main.0.weight_g")


@pytest.mark.parametrize("task_tokens", [False, True])
def test_transpose_list_is_every_linear_weight_of_the_paddle_model(task_tokens):
    model = full_size_model(task_tokens)
    assert {name for name in model.state_dict() if is_linear_weight(name)} == model_linear_weights(model)


@pytest.mark.parametrize("task_tokens", [False, True])
def test_official_state_dict_converts_with_every_key_accounted_for(task_tokens):
    table = official_table()
    if task_tokens:  # 12-in-1 multi_task_model.bin
        table["bert.embeddings.task_embeddings.weight"] = (20, 768)
    shapes = {name: tuple(p.shape) for name, p in full_size_model(task_tokens).state_dict().items()}
    state = {name: np.broadcast_to(np.float32(0), shape) for name, shape in table.items()}  # no memory
    converted, report = convert_state_dict(state, shapes, "torch")
    assert report.problems() == [] and report.fresh == []
    assert set(converted) == set(shapes) == set(report.kept)
    dropped = {reason: len(keys) for reason, keys in report.dropped.items()}
    assert dropped == {CLS: 14, HEADS: 24, Q_DENSE: 24}
    assert len(report.kept) + sum(dropped.values()) == len(table)
    assert len(report.transposed) == 185
    assert converted["bert.v_embeddings.image_location_embeddings.weight"].shape == (5, 1024)


# ----------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("heads,legacy", [("beta", True), ("mt", False), ("mt", True)])
def test_official_files_load_every_weight_exactly(tmp_path, source_model, heads, legacy):
    path = write_torch(tmp_path / "pytorch_model_19.bin", official_state(source_model, heads), legacy)
    model = tiny_model(seed=2)
    lines = []
    report = load_pretrained(model, path, log=lines.append)
    assert_same_weights(model, source_model)
    assert report.source == "torch" and report.fresh == [] and report.problems() == []
    assert set(report.transposed) == model_linear_weights(model)
    heads_dropped = report.dropped[HEADS]
    assert "vil_logit.weight" in heads_dropped and "linguisic_logit.bias" in heads_dropped
    if heads == "beta":
        assert "vil_prediction.main.0.weight_g" in heads_dropped
    assert len(report.dropped[CLS]) == 8 and len(report.dropped[Q_DENSE]) == 8
    assert "dropped 8 pretraining heads (cls.*)" in lines[0]


def test_pretraining_checkpoint_leaves_vision_logit_fresh_with_a_notice(tmp_path, source_model):
    path = write_torch(tmp_path / "pytorch_model_8.bin", official_state(source_model, "pretraining"), legacy=True)
    model = tiny_model(seed=2)
    init = model.vision_logit.weight.numpy().copy()
    lines = []
    report = load_pretrained(model, path, log=lines.append)
    assert report.fresh == ["vision_logit.weight", "vision_logit.bias"]
    assert_same_weights(model, source_model, skip=["vision_logit"])
    np.testing.assert_array_equal(model.vision_logit.weight.numpy(), init)
    assert sum("freshly initialised vision_logit" in line for line in lines[0].splitlines()) == 1

    with pytest.raises(CheckpointError) as excinfo:
        load_pretrained(tiny_model(seed=2), path, allow_fresh_heads=False)
    assert "missing from the checkpoint: vision_logit.weight [8, 1]" in str(excinfo.value)
    assert "missing from the checkpoint: vision_logit.bias [1]" in str(excinfo.value)


@pytest.mark.parametrize("classifier", ["beta", "12in1"])
def test_pretraining_checkpoint_leaves_every_task_head_fresh(tmp_path, source_model, classifier):
    path = write_torch(tmp_path / "pytorch_model_8.bin", official_state(source_model, "pretraining"), legacy=True)
    model = tiny_model(seed=2, heads=TASK_HEADS, num_labels=4, classifier=classifier)
    init = {name: value.numpy().copy() for name, value in model.state_dict().items()}
    lines = []
    report = load_pretrained(model, path, log=lines.append)
    assert set(report.fresh) == {name for name in init if not name.startswith("bert.")}
    assert "freshly initialised vil_logit, vil_prediction, vision_logit" in lines[0]
    for name in report.fresh:
        np.testing.assert_array_equal(model.state_dict()[name].numpy(), init[name])


def test_pretraining_checkpoint_leaves_the_task_token_fresh_too(tmp_path, source_model):
    path = write_torch(tmp_path / "pretrained_model.bin", official_state(source_model, "pretraining"), legacy=False)
    report = load_pretrained(tiny_model(seed=2, task_specific_tokens=True), path, log=lambda *_: None)
    assert report.fresh == ["bert.embeddings.task_embeddings.weight", "vision_logit.weight", "vision_logit.bias"]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/pytorch_model_8.bin"):
        load_pretrained(tiny_model(seed=0), tmp_path / "nowhere" / "pytorch_model_8.bin")


def test_every_problem_is_listed_in_one_error(tmp_path, source_model):
    state = official_state(source_model)
    del state["bert.encoder.layer.0.attention.self.key.bias"]  # missing trunk keys are never tolerated
    del state["bert.t_pooler.dense.weight"]
    state["bert.encoder.layer.9.output.dense.weight"] = tensor(np.zeros((12, 16), "float32"))  # unexpected
    state["something.else"] = tensor(np.zeros(3, "float32"))
    state["bert.v_embeddings.image_location_embeddings.weight"] = tensor(np.zeros((5, 8), "float32"))  # [in, out]
    state["bert.embeddings.LayerNorm.weight"] = tensor(np.zeros(13, "float32"))
    path = write_torch(tmp_path / "bad.bin", state, legacy=True)
    model = tiny_model(seed=2)
    before = model.bert.embeddings.word_embeddings.weight.numpy().copy()
    with pytest.raises(CheckpointError) as excinfo:
        load_pretrained(model, path)
    message = str(excinfo.value)
    assert "6 problem(s)" in message
    for line in ("missing from the checkpoint: bert.encoder.layer.0.attention.self.key.bias [12]",
                 "missing from the checkpoint: bert.t_pooler.dense.weight [12, 8]",
                 "unexpected in the checkpoint: bert.encoder.layer.9.output.dense.weight [12, 16]",
                 "unexpected in the checkpoint: something.else [3]",
                 "shape mismatch: bert.v_embeddings.image_location_embeddings.weight is [8, 5] (after transposing "
                 "the torch Linear weight) in the checkpoint, [5, 8] in the model",
                 "shape mismatch: bert.embeddings.LayerNorm.weight is [13] in the checkpoint, [12] in the model"):
        assert line in message
    assert "--config_file" in message
    np.testing.assert_array_equal(model.bert.embeddings.word_embeddings.weight.numpy(), before)  # nothing set


def test_a_checkpoint_with_task_heads_must_hold_vision_logit(tmp_path, source_model):
    state = official_state(source_model)
    del state["vision_logit.weight"], state["vision_logit.bias"]
    path = write_torch(tmp_path / "other_task.bin", state, legacy=False)
    with pytest.raises(CheckpointError) as excinfo:
        load_pretrained(tiny_model(seed=2), path)
    assert "missing from the checkpoint: vision_logit.weight [8, 1]" in str(excinfo.value)


def test_task_token_mismatch_says_what_to_change(tmp_path, source_model):
    state = official_state(source_model)
    state["bert.embeddings.task_embeddings.weight"] = tensor(np.zeros((3, 12), "float32"))
    path = write_torch(tmp_path / "multi_task_model.bin", state, legacy=True)
    with pytest.raises(CheckpointError, match="task_specific_tokens"):
        load_pretrained(tiny_model(seed=2), path)
    model = tiny_model(seed=2, task_specific_tokens=True)
    load_pretrained(model, path, log=lambda *_: None)
    assert not model.bert.embeddings.task_embeddings.weight.numpy().any()


def test_tf_style_names_and_a_bare_trunk_load_as_official(tmp_path, source_model):
    state = official_state(source_model, "pretraining")
    trunk = collections.OrderedDict(
        (k[len("bert."):].replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"), v)
        for k, v in state.items() if k.startswith("bert."))
    path = write_torch(tmp_path / "bert.bin", trunk, legacy=True)
    model = tiny_model(seed=2)
    report = load_pretrained(model, path, log=lambda *_: None)
    assert_same_weights(model, source_model, skip=["vision_logit"])
    assert ("bert.embeddings.LayerNorm.gamma", "bert.embeddings.LayerNorm.weight") in report.renamed
    assert any("model.bert" in note for note in report.notes)


def test_half_precision_checkpoint_is_cast_to_the_parameter_dtype(tmp_path, source_model):
    state = official_state(source_model, "pretraining")
    for name, t in state.items():
        t.storage = Storage(t.storage.data.astype("float16"), "HalfStorage")
    path = write_torch(tmp_path / "fp16.bin", state, legacy=False)
    model = tiny_model(seed=2)
    load_pretrained(model, path, log=lambda *_: None)
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    assert weight.dtype == paddle.float32
    expected = source_model.bert.encoder.layer[0].attention.self.query.weight.numpy().astype("float16")
    np.testing.assert_array_equal(weight.numpy(), expected.astype("float32"))


# ----------------------------------------------------------------------------------------------------
# Paddle files: the earlier port's and ours


def test_paddle_port_pdparams_load(tmp_path, source_model):
    """The port saves [in, out] Linear weights, an untied MLM decoder with its own bias, a weight-normed head."""
    state = {name: value.numpy() for name, value in source_model.state_dict().items()}
    config = source_model.config
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].T.copy()
    state["cls.predictions.decoder.bias"] = np.zeros(config.vocab_size, "float32")
    state["vil_prediction.main.0.weight_g"] = np.ones(1, "float32")  # [1] under Paddle 2.1
    state["vil_prediction.main.0.weight_v"] = np.ones((config.bi_hidden_size, 16), "float32")
    state["bert.encoder.c_layer.0.biOutput.q_dense1.weight"] = np.ones((8, 8), "float32")
    path = tmp_path / "paddle_model_19.pdparams"
    paddle.save(state, str(path))
    model = tiny_model(seed=2)
    report = load_pretrained(model, path, log=lambda *_: None)
    assert report.source == "paddle-port" and report.transposed == []
    assert_same_weights(model, source_model)
    assert set(report.dropped[CLS]) == {"cls.predictions.decoder.weight",
                                                                 "cls.predictions.decoder.bias"}


def test_our_checkpoints_round_trip_and_read_like_paddle_load(tmp_path, source_model):
    best = save_checkpoint(source_model.state_dict(), tmp_path / "run" / "best.pdparams")
    assert best == tmp_path / "run" / "best.pdparams" and [p.name for p in best.parent.iterdir()] == ["best.pdparams"]
    reference = paddle.load(str(best))
    read = read_checkpoint(best)
    assert read.source == "paddle" and list(read.state) == list(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(read.state[name], value.numpy())
    last = save_checkpoint({"model": source_model.state_dict(), "optimizer": {"state": {}, "last_lr": 1e-5},
                            "epoch": 4, "best": {"val_accuracy": 0.5}}, tmp_path / "run" / "last.pdparams")
    for path in (best, last):
        model = tiny_model(seed=2)
        report = load_pretrained(model, path, log=lambda *_: None)
        assert report.dropped == {} and report.fresh == []
        assert_same_weights(model, source_model)


def test_save_checkpoint_is_atomic_and_can_name_the_file_by_its_hash(tmp_path):
    path = save_checkpoint({"w": np.arange(3.0)}, tmp_path / "out" / "model.pdparams", hash_in_name=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.name == f"model-{digest[:8]}.pdparams"
    target = tmp_path / "out" / "keep.pdparams"
    save_checkpoint({"w": np.ones(2)}, target)
    before = target.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint({"w": lambda: None}, target)  # cannot be pickled: the old file must survive
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([path.name, "keep.pdparams"])


def test_convert_tool_writes_a_checkpoint_that_loads_identically(tmp_path, source_model, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    src = write_torch(tmp_path / "pytorch_model_19.bin", official_state(source_model, "beta"), legacy=True)
    out = convert_main([str(src), str(tmp_path / "out" / "pytorch_model_19.pdparams"), "--config_file", str(config)])
    printed = capsys.readouterr().out
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert out.name == f"pytorch_model_19-{digest[:8]}.pdparams" and f"sha256 {digest}" in printed
    assert "transposed" in printed and "dropped 8 pretraining heads (cls.*)" in printed
    model = tiny_model(seed=2)
    report = load_pretrained(model, out, log=lambda *_: None)
    # the converted file keeps the checkpoint's other task heads (beta's vil_prediction, vil_logit) for the
    # tasks that use them; the referring-expression model drops them
    assert report.source == "paddle" and set(report.dropped) == {"other tasks' heads"} and report.transposed == []
    assert {key.split(".")[0] for key in report.dropped["other tasks' heads"]} == {"vil_prediction", "vil_logit"}
    assert_same_weights(model, source_model)


def test_training_state_reads_back_without_paddle_load(tmp_path):
    model = nn.Linear(2, 3)
    state = {"model": model.state_dict(), "optimizer": {"epoch": 1, "state": {"w": {"moment1": paddle.ones([2])}}},
             "epoch": 1, "best": {"val_accuracy": 0.5, "epoch": 1}, "options": {"lr_milestones": [12, 16]}}
    save_checkpoint(state, tmp_path / "last.pdparams")
    read = read_training_state(tmp_path / "last.pdparams")
    np.testing.assert_array_equal(read["model"]["weight"], model.weight.numpy())
    np.testing.assert_array_equal(read["optimizer"]["state"]["w"]["moment1"], np.ones(2, np.float32))
    assert read["best"] == {"val_accuracy": 0.5, "epoch": 1} and read["options"] == {"lr_milestones": [12, 16]}
    save_checkpoint(model.state_dict(), tmp_path / "best.pdparams")
    with pytest.raises(CheckpointError, match="best.pdparams: not a resumable checkpoint of train.py"):
        read_training_state(tmp_path / "best.pdparams")


def test_conversion_keeps_the_task_heads_the_checkpoint_holds(tmp_path, capsys):
    """A VQA checkpoint converts with its vil_prediction (family and width as held), a REC one with vision_logit."""
    config_file = Path(__file__).parent / "data" / "vilbert_test.json"
    config = ViLBertConfig.from_json(config_file)
    for kwargs in ({"heads": ("vil_prediction", "vil_logit"), "num_labels": 5, "classifier": "12in1"},
                   {"heads": ("vision_logit",)}):
        paddle.seed(0)
        model = VILBertForVLTasks(config, **kwargs)
        src = save_checkpoint(model.state_dict(), tmp_path / f"{kwargs['heads'][0]}.pdparams")
        out = convert_main([str(src), str(tmp_path / "out" / src.name), "--config_file", str(config_file)])
        converted = read_state_dict(out)
        assert converted.keys() == model.state_dict().keys()
        for name, value in model.state_dict().items():
            np.testing.assert_array_equal(converted[name], value.numpy())
