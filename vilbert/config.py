"""ViLBERT model configuration.

Loads the official JSON files (`config/bert_base_6layer_6conect.json`, ...) unchanged. The official
`BertConfig` copies every JSON key onto itself without looking, and asserts on its defaults instead of
on the file; here every key is checked against a declared field with a type, and the structure is
validated after loading, so a typo in a config is an error rather than a silently ignored key.
"""

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import List

# Keys present in the official JSON files that the official model never reads (model_spec.md §1):
# accepted so the files load unchanged, and ignored on purpose.
IGNORED_KEYS = {
    "pooling_method": str,  # the key the model reads is `fusion_method`
    "bi_intermediate_size": int,
    "bi_attention_type": int,
    "v_initializer_range": float,  # init always uses `initializer_range`
    "v_target_size": int,  # only read by the pretraining heads, which REC does not build
    "predict_feature": bool,
    "intra_gate": bool,
    "visual_target": int,
    "model": str,
    "visualization": bool,
}

# Official switches for variants this port does not implement; they must keep the official default.
UNSUPPORTED_DEFAULTS = {
    "with_coattention": True,
    "fast_mode": False,
    "in_batch_pairs": False,
    "dynamic_attention": False,
    "fixed_t_layer": 0,
    "fixed_v_layer": 0,
}


class ConfigError(ValueError):
    """A model config that cannot describe a ViLBERT this code can build."""


@dataclass
class ViLBertConfig:
    """Two-stream ViLBERT hyper-parameters; defaults are the official `BertConfig` defaults."""

    # text stream (BERT)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    # vision stream
    v_feature_size: int = 2048
    v_hidden_size: int = 768
    v_num_hidden_layers: int = 3
    v_num_attention_heads: int = 12
    v_intermediate_size: int = 3072
    v_hidden_act: str = "gelu"
    v_hidden_dropout_prob: float = 0.1
    v_attention_probs_dropout_prob: float = 0.1
    # co-attention: after text layer t_biattention_id[k] and image layer v_biattention_id[k]
    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 16
    v_biattention_id: List[int] = field(default_factory=lambda: [0, 1])
    t_biattention_id: List[int] = field(default_factory=lambda: [10, 11])
    fusion_method: str = "mul"
    # 12-in-1: a learned task token inserted after [CLS] (`--task_specific_tokens`)
    task_specific_tokens: bool = False
    num_task_tokens: int = 20

    @classmethod
    def from_dict(cls, values: dict) -> "ViLBertConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs, errors = {}, []
        for key, value in values.items():
            if key in fields:
                expected = fields[key].type
            elif key in IGNORED_KEYS:
                expected = IGNORED_KEYS[key]
            elif key in UNSUPPORTED_DEFAULTS:
                if value != UNSUPPORTED_DEFAULTS[key]:
                    errors.append(f"{key}={value!r} is not supported (only {UNSUPPORTED_DEFAULTS[key]!r})")
                continue
            else:
                errors.append(f"unknown key {key!r}")
                continue
            if not has_type(value, expected):
                errors.append(f"{key}={value!r} should be {type_name(expected)}")
            elif key in fields:
                kwargs[key] = float(value) if expected is float else value
        if errors:
            raise ConfigError("invalid ViLBERT config: " + "; ".join(errors))
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path) -> "ViLBertConfig":
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"model config {path} not found; the official ones are in config/") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"model config {path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        problems = []
        for width, heads in (("hidden_size", "num_attention_heads"), ("v_hidden_size", "v_num_attention_heads"),
                             ("bi_hidden_size", "bi_num_attention_heads")):
            if getattr(self, width) % getattr(self, heads):
                problems.append(f"{width}={getattr(self, width)} is not a multiple of {heads}={getattr(self, heads)}")
        v_ids, t_ids = self.v_biattention_id, self.t_biattention_id
        if len(v_ids) != len(t_ids) or not v_ids:
            problems.append("v_biattention_id and t_biattention_id must be non-empty and of equal length")
        for name, ids, layers in (("v_biattention_id", v_ids, self.v_num_hidden_layers),
                                  ("t_biattention_id", t_ids, self.num_hidden_layers)):
            if sorted(set(ids)) != list(ids) or (ids and not 0 <= ids[0] <= ids[-1] < layers):
                problems.append(f"{name}={ids} must be increasing layer indices below {layers}")
        for act in ("hidden_act", "v_hidden_act"):
            if getattr(self, act) not in ("gelu", "relu"):
                problems.append(f"{act}={getattr(self, act)!r}: only 'gelu' (erf) and 'relu' are supported")
        if self.fusion_method not in ("mul", "sum"):
            problems.append(f"fusion_method={self.fusion_method!r}: only 'mul' and 'sum' are defined")
        if problems:
            raise ConfigError("invalid ViLBERT config: " + "; ".join(problems))


def has_type(value, expected) -> bool:
    """A JSON/YAML value against a field type: int (not bool), float (ints accepted), str, bool, List[...]."""
    if typing.get_origin(expected) is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, list) and all(has_type(v, item) for v in value)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def type_name(expected) -> str:
    if typing.get_origin(expected) is list:
        return f"a list of {type_name(typing.get_args(expected)[0])}s"
    return expected.__name__
