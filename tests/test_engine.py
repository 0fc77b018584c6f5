"""`train_one_epoch`: against the official training loop step by step, and with fp16 loss scaling.

- `tests/data/trajectory_reference.npz` was written by `tools/make_trajectory_reference.py`: vilbert_beta's own
  model, REC loss, BertAdam, per-epoch LambdaLR and train loop (with and without gradient accumulation) trained on
  our batches of the generated RefCOCO+ data. Here the same batches go through our real `train_one_epoch` and
  `BertAdam`, from the same initial weights, without torch.
- fp16: real steps of the tiny model on generated data, with the GradScaler on its GPU path (`scaler_on_gpu`), the
  protocol right (step, then update, once per optimizer step) and a step with non-finite gradients skipped with
  the scale lowered.
"""

import json

import numpy as np
import paddle
import pytest

from tools.make_trajectory_reference import ACCUMULATIONS, OUT, as_rows, initial_weights, make_data_root, run_options
from training_support import make_tiny_root, run_flags
from vilbert import ViLBertConfig, VILBertForVLTasks
from vilbert.checkpoint import convert_state_dict
from vilbert.engine import train_one_epoch
from vilbert.options import build_parser, parse_options
from vilbert.tasks import get_task, refer
from vilbert.tokenization import BertTokenizer
from vilbert.training import build_dataset, build_grad_scaler, build_model, build_optimizer, train_loader

INIT_SCALE = 2.0 ** 15


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


def setup_run(root, tmp_path, accumulation):
    """(model, loader, optimizer) as fit() builds them: 60 expressions in micro-batches of 8 // accumulation."""
    options, _ = parse_options(build_parser(""), run_flags(root, tmp_path, gradient_accumulation_steps=accumulation))
    paddle.seed(0)
    loader = train_loader(build_dataset(options, options.train_split, BertTokenizer(options.bert_model)), options)
    model = build_model(options, log=lambda *a: None)
    optimizer, _ = build_optimizer(model, options, len(loader) // accumulation)
    return model, loader, optimizer


def poison_backward(model, at_call: int) -> list:
    """Makes the `at_call`-th backward pass (0-based) produce an inf gradient; returns the list of calls seen."""
    calls = []

    def hook(grad):
        calls.append(len(calls))
        return grad * float("inf") if len(calls) - 1 == at_call else grad
    model.vision_logit.weight.register_hook(hook)
    return calls


@pytest.mark.parametrize("accumulation, poisoned_micro_step", [(1, 2), (2, 3)])
def test_fp16_scaler_steps_updates_and_skips_a_non_finite_step(root, tmp_path, scaler_on_gpu, accumulation,
                                                               poisoned_micro_step):
    model, loader, optimizer = setup_run(root, tmp_path, accumulation)
    scaler = build_grad_scaler("fp16")
    assert scaler._enable and np.asarray(scaler.state_dict()["scale"]).item() == INIT_SCALE
    calls = poison_backward(model, poisoned_micro_step)
    optimizer.set_epoch(0)
    loss, _ = train_one_epoch(model, loader, optimizer, task=get_task("refer"), epoch=0, accumulation=accumulation, scaler=scaler,
                              show_progress=False)
    optimizer_steps = len(loader) // accumulation
    assert len(calls) == len(loader) and optimizer_steps >= 3 and np.isfinite(loss)
    # the poisoned optimizer step was skipped: every parameter was updated once per other step
    steps = {state["step"] for state in optimizer._state.values()}
    assert steps == {optimizer_steps - 1}
    assert all(np.isfinite(p.numpy()).all() for p in model.parameters())
    # one update() per optimizer step: halved once for the skipped step, then a count of the good steps after it
    state = scaler.state_dict()
    assert np.asarray(state["scale"]).item() == INIT_SCALE / 2
    assert state["incr_count"] == optimizer_steps - 1 - poisoned_micro_step // accumulation
    assert state["decr_count"] == 0


def test_a_clean_fp16_epoch_trains_as_fp32_does(root, tmp_path, scaler_on_gpu):
    """Scaling by 2^15 and unscaling before the update changes no weight beyond float32 rounding."""
    results = []
    for scaler in (None, build_grad_scaler("fp16")):
        model, loader, optimizer = setup_run(root, tmp_path, 1)
        optimizer.set_epoch(0)
        train_one_epoch(model, loader, optimizer, task=get_task("refer"), epoch=0, scaler=scaler, show_progress=False)
        results.append({name: p.numpy() for name, p in model.named_parameters()})
    plain, scaled = results
    assert max(float(np.abs(plain[name] - scaled[name]).max()) for name in plain) < 1e-5


# ---- the official training loop

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    with np.load(OUT) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("trajectory"))


def official_weights(reference, final_of=None):
    """The official initial weights, or with ``final_of=k`` those at the end of the run with accumulation k."""
    weights = initial_weights(json.loads(str(reference["shapes_json"])))
    if final_of is not None:
        for name, value in weights.items():
            rows = reference[f"k{final_of}/rows/{name}"]
            as_rows(value)[rows] = reference[f"k{final_of}/final/{name}"]
    return weights


def ours(weights, model):
    """Official-named weights in our model's names and layout."""
    converted, report = convert_state_dict(weights, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                                           "torch")
    assert not report.problems(), report.problems()
    return converted


def train(reference, root, accumulation, monkeypatch):
    """Our loop as ``fit`` runs it -> (model, loss of every micro-batch [epochs, micro-batches])."""
    paddle.seed(0)
    model = VILBertForVLTasks(ViLBertConfig.from_dict(json.loads(str(reference["config_json"]))), dropout_prob=0.0)
    for name, value in ours(official_weights(reference), model).items():
        model.state_dict()[name].set_value(np.ascontiguousarray(value))
    options = run_options(root, accumulation)
    loader = train_loader(build_dataset(options, options.train_split, BertTokenizer(options.bert_model)), options)
    optimizer, _ = build_optimizer(model, options, len(loader) // accumulation)
    losses = []

    def recorded_loss(vision_logit, target):
        loss = real_loss(vision_logit, target)
        losses.append(float(loss))
        return loss

    real_loss = refer.rec_loss
    monkeypatch.setattr(refer, "rec_loss", recorded_loss)
    for epoch in range(options.num_train_epochs):
        loader.batch_sampler.set_epoch(epoch)
        optimizer.set_epoch(epoch)
        train_one_epoch(model, loader, optimizer, task=get_task("refer"), epoch=epoch, accumulation=accumulation, show_progress=False)
    return model, np.array(losses).reshape(options.num_train_epochs, -1)


@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
def test_training_follows_the_official_loop(reference, data_root, accumulation, monkeypatch):
    model, losses = train(reference, data_root, accumulation, monkeypatch)
    official_losses = reference[f"k{accumulation}/loss"]
    assert losses.shape == official_losses.shape and official_losses.shape[0] >= 3
    loss_diff = np.abs(losses / official_losses - 1).max()
    start = ours(official_weights(reference), model)
    end = ours(official_weights(reference, final_of=accumulation), model)
    weights = {name: param.numpy() for name, param in model.state_dict().items()}
    weight_diff = max(np.abs(weights[name] - value).max() for name, value in end.items())
    moved = max(np.abs(value - start[name]).max() for name, value in end.items())
    print(f"accumulation {accumulation}: {losses.size} micro-batches, worst loss difference {loss_diff:.2e} "
          f"(relative), worst final weight difference {weight_diff:.2e} (weights moved up to {moved:.2e})")
    assert loss_diff <= LOSS_RTOL
    assert weight_diff <= WEIGHT_ATOL
    assert moved > 100 * WEIGHT_ATOL  # the run did train
