"""Our model against the official PyTorch one, through our converter, without torch.

The reference (`tests/data/official_tiny*`, written by `tools/make_parity_reference.py` from the official code)
is a tiny ViLBERT whose three widths differ, with perturbed biases, LayerNorms and weight-norm scales, run on padded
text and regions: beta's model with its weight-normed `vil_prediction`, and 12-in-1's with its `logit_fc` one.
"""
import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from vilbert import ViLBertConfig, VILBertForVLTasks
from vilbert.checkpoint import convert_state_dict, load_pretrained
from vilbert.model import TASK_HEADS
from vilbert.selfcheck import official_tiny_outputs, reference_outputs

DATA = Path(__file__).parent / "data"
TOLERANCE = 1e-5
# Padded regions sit at -10000 + logit, where float32 steps by ~1e-3: allow the rounding of that sum only.
PADDED_TOLERANCE = 2 * float(np.spacing(np.float32(1e4)))
COMPARED = ("vision_logit", "pooled_output_t", "pooled_output_v", "sequence_output_t", "sequence_output_v")
# each family's file, its --classifier, and its recorded vil_prediction (beta: NUM_LABELS answers, 12-in-1: 3129)
FAMILIES = {"beta": ("official_tiny_beta_legacy.bin", "weight/vil_prediction.main.3.bias", "vil_prediction_beta"),
            "12in1": ("official_tiny_mt_zip.bin", "weight_12in1/vil_prediction.logit_fc.3.bias",
                      "vil_prediction_12in1")}


@pytest.fixture(scope="module")
def reference():
    with np.load(DATA / "official_tiny.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def config(reference):
    return ViLBertConfig.from_dict(json.loads(str(reference["config_json"])))


def new_model(config, **heads):
    model = VILBertForVLTasks(config, **heads)
    model.eval()
    return model


def head_model(config, reference, classifier):
    """Every task head, vil_prediction of `classifier`'s family with the reference's answer count."""
    return new_model(config, heads=TASK_HEADS, num_labels=len(reference[FAMILIES[classifier][1]]),
                     classifier=classifier)


def head_differences(outputs, reference, classifier):
    return {"vil_prediction": np.abs(outputs["vil_prediction"] - reference[f"output/{FAMILIES[classifier][2]}"]).max(),
            "vil_logit": np.abs(outputs["vil_logit"] - reference["output/vil_logit"]).max()}


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
    """The official weights converted in memory (what selfcheck.py runs on the user's device), every head."""
    model = head_model(config, reference, "beta")
    official = {key[len("weight/"):]: value for key, value in reference.items() if key.startswith("weight/")}
    _, report = convert_state_dict(official, {k: tuple(v.shape) for k, v in model.state_dict().items()}, "torch")
    assert report.problems() == []
    outputs = official_tiny_outputs(reference, "cpu")
    assert_matches({name: outputs[name] for name in COMPARED}, reference)
    assert max(head_differences(outputs, reference, "beta").values()) <= TOLERANCE


@pytest.mark.parametrize("classifier", ["beta", "12in1"])
def test_task_heads_loaded_from_each_family_match_official(config, reference, classifier):
    """vil_prediction (beta's weight-normed head from the legacy file, 12-in-1's logit_fc from the zip) and vil_logit,
    beside vision_logit and the trunk, through the converter, against the official models' outputs."""
    assert reference["check/mt_vil_logit_max_abs_diff"] <= 1e-6  # both families' vil_logit agreed when it was made
    model = head_model(config, reference, classifier)
    report = load_pretrained(model, DATA / FAMILIES[classifier][0], log=quiet)
    assert report.fresh == [] and report.problems() == []
    outputs = reference_outputs(model, reference)
    assert_matches({name: outputs[name] for name in COMPARED}, reference)
    diffs = head_differences(outputs, reference, classifier)
    assert max(diffs.values()) <= TOLERANCE, f"max |ours - official|: {diffs}"


@pytest.mark.parametrize("classifier, name", [
    ("beta", "vil_prediction.main.0.weight_g"),  # a weight-norm scale: only vil_prediction sees it
    ("beta", "vil_prediction.main.3.bias"),
    ("12in1", "vil_prediction.logit_fc.2.weight"),  # the LayerNorm inside 12-in-1's head
    ("beta", "vil_logit.bias"),
])
def test_a_head_parameter_left_at_its_init_is_caught(config, reference, classifier, name):
    model = head_model(config, reference, classifier)
    load_pretrained(model, DATA / FAMILIES[classifier][0], log=quiet)
    param = model.state_dict()[name]
    param.set_value(np.full(param.shape, 1.0 if name.endswith(("weight", "weight_g")) else 0.0, "float32"))
    assert max(head_differences(reference_outputs(model, reference), reference, classifier).values()) > 100 * TOLERANCE


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
