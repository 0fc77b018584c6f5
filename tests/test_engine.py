"""`train_one_epoch` with fp16 loss scaling: real steps of the tiny model on generated data, with the GradScaler
on its GPU path (`scaler_on_gpu`), the protocol right (step, then update, once per optimizer step) and a step with
non-finite gradients skipped with the scale lowered."""

import numpy as np
import paddle
import pytest

from training_support import make_tiny_root, run_flags
from vilbert.engine import train_one_epoch
from vilbert.options import build_parser, parse_options
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
    loss, _ = train_one_epoch(model, loader, optimizer, epoch=0, accumulation=accumulation, scaler=scaler,
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
        train_one_epoch(model, loader, optimizer, epoch=0, scaler=scaler, show_progress=False)
        results.append({name: p.numpy() for name, p in model.named_parameters()})
    plain, scaled = results
    assert max(float(np.abs(plain[name] - scaled[name]).max()) for name in plain) < 1e-5
