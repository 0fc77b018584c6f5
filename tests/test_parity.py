"""Our model against the official PyTorch one, through our converter, without torch.

The reference (`tests/data/official_tiny*`, written by `tools/make_parity_reference.py` from the official code)
is a tiny ViLBERT whose three widths differ, with perturbed biases and LayerNorms, run on padded text and regions.
"""
import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from vilbert import ViLBertConfig, VILBertForVLTasks
from vilbert.checkpoint import convert_state_dict, load_pretrained
from vilbert.selfcheck import official_tiny_outputs, reference_outputs

DATA = Path(__file__).parent / "data"
TOLERANCE = 1e-5
# Padded regions sit at -10000 + logit, where float32 steps by ~1e-3: allow the rounding of that sum only.
PADDED_TOLERANCE = 2 * float(np.spacing(np.float32(1e4)))
COMPARED = ("vision_logit", "pooled_output_t", "pooled_output_v", "sequence_output_t", "sequence_output_v")


@pytest.fixture(scope="module")
def reference():
    with np.load(DATA / "official_tiny.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def config(reference):
    return ViLBertConfig.from_dict(json.loads(str(reference["config_json"])))


def new_model(config):
    model = VILBertForVLTasks(config)
    model.eval()
    return model


def run(model, reference):
    outputs = reference_outputs(model, reference)
    return {name: outputs[name] for name in COMPARED}


def differences(outputs, reference):
    """Max |ours - official| per output; vision_logit split into real and padded regions."""
    real = reference["input/image_attention_mask"].astype(bool)
    diffs = {name: np.abs(outputs[name] - reference[f"output/{name}"]) for name in COMPARED}
    logit = diffs.pop("vision_logit")[..., 0]
    return {"vision_logit": logit[real].max(), "vision_logit (padded)": logit[~real].max(),
            **{name: diff.max() for name, diff in diffs.items()}}


def assert_matches(outputs, reference):
    diffs = differences(outputs, reference)
    limits = {name: PADDED_TOLERANCE if "padded" in name else TOLERANCE for name in diffs}
    assert all(diffs[name] <= limits[name] for name in diffs), f"max |ours - official|: {diffs}"
    assert (outputs["vision_logit"][~reference["input/image_attention_mask"].astype(bool)] < -9000).all()


def quiet(*_):
    pass


def test_beta_legacy_checkpoint_matches_official(config, reference):
    model = new_model(config)
    report = load_pretrained(model, DATA / "official_tiny_beta_legacy.bin", log=quiet)
    assert report.container == "torch legacy" and not report.fresh
    assert_matches(run(model, reference), reference)


def test_12in1_zip_checkpoint_matches_official(config, reference):
    assert reference["check/mt_vision_logit_max_abs_diff"] <= 1e-6  # 12-in-1 and beta agreed when it was made
    model = new_model(config)
    report = load_pretrained(model, DATA / "official_tiny_mt_zip.bin", log=quiet)
    assert report.container == "torch zip" and not report.fresh
    assert_matches(run(model, reference), reference)


def test_converted_reference_weights_match_official(config, reference):
    """The official weights converted in memory (what selfcheck.py runs on the user's device)."""
    model = new_model(config)
    official = {key[len("weight/"):]: value for key, value in reference.items() if key.startswith("weight/")}
    _, report = convert_state_dict(official, {k: tuple(v.shape) for k, v in model.state_dict().items()}, "torch")
    assert report.problems() == []
    assert_matches({name: official_tiny_outputs(reference, "cpu")[name] for name in COMPARED}, reference)


@pytest.mark.parametrize("name", [
    "bert.v_embeddings.image_location_embeddings.bias",  # vision input
    "bert.encoder.c_layer.0.biOutput.LayerNorm2.bias",  # text side of a co-attention, reaches vision later
    "bert.encoder.layer.3.output.LayerNorm.weight",  # the text tail layer: only the text outputs see it
])
def test_a_parameter_left_at_its_init_is_caught(config, reference, name):
    """The reference's biases and LayerNorms are perturbed, so a converter that skipped one would fail above."""
    model = new_model(config)
    load_pretrained(model, DATA / "official_tiny_beta_legacy.bin", log=quiet)
    param = model.state_dict()[name]
    param.set_value(np.full(param.shape, 1.0 if name.endswith("weight") else 0.0, "float32"))
    assert max(differences(run(model, reference), reference).values()) > 100 * TOLERANCE
