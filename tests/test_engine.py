"""Our training loop against the official one, step by step, without torch.

`tests/data/trajectory_reference.npz` was written by `tools/make_trajectory_reference.py`: vilbert_beta's own model,
REC loss, BertAdam, per-epoch LambdaLR and train loop (with and without gradient accumulation) trained on our
batches of the generated RefCOCO+ data. Here the same batches go through our real `train_one_epoch` and
`BertAdam`, from the same initial weights.
"""
import json

import numpy as np
import paddle
import pytest

from tools.make_trajectory_reference import ACCUMULATIONS, OUT, as_rows, initial_weights, make_data_root, run_options
from vilbert import ViLBertConfig, VILBertForVLTasks, engine
from vilbert.checkpoint import convert_state_dict
from vilbert.tokenization import BertTokenizer
from vilbert.training import build_dataset, build_optimizer, train_loader

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

    real_loss = engine.rec_loss
    monkeypatch.setattr(engine, "rec_loss", recorded_loss)
    for epoch in range(options.num_train_epochs):
        loader.batch_sampler.set_epoch(epoch)
        optimizer.set_epoch(epoch)
        engine.train_one_epoch(model, loader, optimizer, epoch=epoch, accumulation=accumulation, show_progress=False)
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
