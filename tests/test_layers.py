"""The CPU paths of vilbert/layers.py against Paddle's own layers (what runs on GPU): outputs and gradients."""

import numpy as np
import paddle
import pytest

from vilbert.layers import Dropout, LayerNorm, Linear, WeightNormLinear


@pytest.mark.parametrize("ours, paddles, shape, out_width", [(Linear, paddle.nn.Linear, [3, 7, 16], 12),
                                                             (LayerNorm, paddle.nn.LayerNorm, [8, 100, 96], 96)],
                         ids=["Linear", "LayerNorm"])  # LayerNorm's own backward from 64k elements on
@pytest.mark.parametrize("input_needs_grad", [True, False])
def test_cpu_layers_compute_what_paddles_own_compute(ours, paddles, shape, out_width, input_needs_grad):
    """The CPU paths (their own backward) against Paddle's layers with the same parameters: outputs, gradients."""
    args = (shape[-1], out_width) if ours is Linear else (shape[-1],)
    layers = ours(*args), paddles(*args)
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal(layers[0].weight.shape) + 1).astype("float32")
    bias = rng.standard_normal(layers[0].bias.shape).astype("float32")
    for layer in layers:
        layer.weight.set_value(weight)
        layer.bias.set_value(bias)
    x_value = (rng.standard_normal(shape) * 3 + 2).astype("float32")
    out_grad = paddle.to_tensor(rng.standard_normal(shape[:-1] + [out_width]).astype("float32"))
    results = []
    for layer in layers:
        x = paddle.to_tensor(x_value, stop_gradient=not input_needs_grad)
        y = layer(x)
        y.backward(out_grad)
        results.append([y, layer.weight.grad, layer.bias.grad] + ([x.grad] if input_needs_grad else []))
    for got, expected in zip(*results):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_dropout_cpu_mask_rate_scale_seed_and_gradient():
    dropout = Dropout(0.1)
    x = paddle.ones([200, 1000])
    x.stop_gradient = False
    paddle.seed(3)
    y = dropout(x)
    values = y.numpy()
    assert set(np.unique(values).tolist()) == {0.0, np.float32(1 / 0.9)}
    dropped = (values == 0).mean()
    assert abs(dropped - 0.1) < 4 * np.sqrt(0.1 * 0.9 / values.size)  # 4 sigma
    y.backward(paddle.full([200, 1000], 2.0))
    np.testing.assert_array_equal(x.grad.numpy(), 2 * values)  # the same mask and scale
    paddle.seed(3)
    np.testing.assert_array_equal(dropout(x).numpy(), values)  # paddle.seed fixes the mask
    assert not np.array_equal(dropout(x).numpy(), values)  # and the next mask is another
    dropout.eval()
    np.testing.assert_array_equal(dropout(x).numpy(), x.numpy())


def test_weight_norm_linear_computes_what_paddles_weight_norm_computes():
    """torch's weight_norm(dim=None) written out, against Paddle's own: outputs and gradients of x, g, v and b."""
    ours = WeightNormLinear(16, 12)
    paddles = paddle.nn.utils.weight_norm(paddle.nn.Linear(16, 12), dim=None)
    rng = np.random.default_rng(0)
    values = {"weight_v": rng.standard_normal([16, 12]), "weight_g": np.array(2.5), "bias": rng.standard_normal(12)}
    for layer in (ours, paddles):
        layer.set_state_dict({name: value.astype("float32") for name, value in values.items()})
    assert {name: list(p.shape) for name, p in ours.state_dict().items()} == {
        name: list(p.shape) for name, p in paddles.state_dict().items()} == {"weight_g": [], "weight_v": [16, 12],
                                                                              "bias": [12]}
    x_value = rng.standard_normal([3, 5, 16]).astype("float32")
    out_grad = paddle.to_tensor(rng.standard_normal([3, 5, 12]).astype("float32"))
    results = []
    for layer in (ours, paddles):
        x = paddle.to_tensor(x_value, stop_gradient=False)
        y = layer(x)
        y.backward(out_grad)
        results.append([y, x.grad, layer.weight_g.grad, layer.weight_v.grad, layer.bias.grad])
    for got, expected in zip(*results):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_weight_norm_linear_starts_as_torchs_linear_init():
    """v ~ U(-1/sqrt(in), 1/sqrt(in)) (torch's nn.Linear default) and g = ||v||, so W = v, as the official head."""
    paddle.seed(0)
    layer = WeightNormLinear(64, 32)
    v = layer.weight_v.numpy()
    assert np.abs(v).max() <= 1 / 8 and np.abs(v).max() > 0.99 / 8
    np.testing.assert_allclose(float(layer.weight_g), np.linalg.norm(v), rtol=1e-6)
    with paddle.LazyGuard():  # shapes only: no v to take the norm of, and no error
        assert WeightNormLinear(64, 32).weight_g.shape == []
