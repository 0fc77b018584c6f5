"""Linear, LayerNorm and Dropout: Paddle's own layers on GPU, faster paths of the same function on CPU; and
WeightNormLinear, torch's `weight_norm(nn.Linear)` written out.

The model file says what is computed; this module says how it is made fast on one device, behind one dispatch
(`_on_cpu`), so the architecture reads the same everywhere. Each class has its `nn` parent's parameters, names and
outputs: on GPU and under autocast (which only acts on GPU) the parent's `forward` runs. On CPU, measured on the
full config at batch 8 on a 2-core machine: a GEMM-only Linear backward, a NumPy LayerNorm backward and NumPy
dropout masks (the last two only for inputs of `NUMPY_MIN_SIZE` elements or more, below which the round trip
costs more than it saves). `tests/test_layers.py` checks outputs and gradients against Paddle's own layers.
"""

import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from .compat import is_autocast_enabled

NUMPY_MIN_SIZE = 2 ** 16  # below this many elements, a NumPy round trip costs more than it saves (demo model)


def _on_cpu(x: paddle.Tensor, min_size: int = 0) -> bool:
    """Whether a layer below takes its CPU path (for `x` of at least `min_size` elements); on GPU, and under
    autocast (which only acts on GPU), Paddle's own kernels run."""
    return x.place.is_cpu_place() and not is_autocast_enabled() and math.prod(x.shape) >= min_size


class _LinearFunction(PyLayer):
    """y = x @ W + b as one GEMM, with a backward made of GEMMs only.

    Paddle's CPU Linear sums the bias gradient over rows on one thread (3.4 ms for [800, 1024]); `ones @ dy`
    takes 0.1 ms. Measured: backward 3.2 -> 2.6 s per full-config step at batch 8; outputs and gradients
    equal nn.Linear's to float32 rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape([-1, x.shape[-1]])  # [B*L, in]
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        ctx.needs_grad = (not x.stop_gradient, not weight.stop_gradient, not bias.stop_gradient)
        return paddle.addmm(bias.unsqueeze(0), x2, weight).reshape(x.shape[:-1] + [weight.shape[1]])

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensor()
        need_x, need_w, need_b = ctx.needs_grad
        grad = grad.reshape([-1, grad.shape[-1]])  # [B*L, out]
        dx = paddle.matmul(grad, weight, transpose_y=True).reshape(ctx.x_shape) if need_x else None
        dw = paddle.matmul(x2, grad, transpose_x=True) if need_w else None
        db = paddle.matmul(paddle.ones([1, grad.shape[0]], grad.dtype), grad).reshape([-1]) if need_b else None
        return dx, dw, db


class Linear(nn.Linear):
    """nn.Linear (same parameters) with `_LinearFunction` on CPU."""

    def forward(self, x):
        if self.bias is None or not _on_cpu(x):
            return super().forward(x)
        return _LinearFunction.apply(x, self.weight, self.bias)


class _LayerNormFunction(PyLayer):
    """Paddle's layer_norm forward, with a NumPy backward that recomputes the statistics from the saved input.

    Paddle's CPU layer_norm_grad takes 10.5 ms for [800, 1024]; this, copies included, about 7 ms. Measured:
    backward 2.60 -> 2.48 s per full-config step at batch 8; gradients equal Paddle's to float32 rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon):
        ctx.save_for_backward(x, weight)
        ctx.epsilon = epsilon
        ctx.needs_grad = (not x.stop_gradient, not weight.stop_gradient, not bias.stop_gradient)
        return F.layer_norm(x, x.shape[-1], weight, bias, epsilon)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        need_x, need_w, need_b = ctx.needs_grad
        width = x.shape[-1]
        dy = grad.numpy().reshape(-1, width)
        normed = x.numpy().reshape(-1, width)
        normed = normed - normed.mean(1, keepdims=True)
        rstd = 1.0 / np.sqrt(np.einsum('ij,ij->i', normed, normed)[:, None] / width + ctx.epsilon)
        normed *= rstd  # x_hat
        dw = paddle.to_tensor((dy * normed).sum(0)) if need_w else None
        db = paddle.to_tensor(dy.sum(0)) if need_b else None
        if not need_x:
            return None, dw, db
        # dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * weight, computed in place
        g = dy * weight.numpy()
        normed *= np.einsum('ij,ij->i', g, normed)[:, None] / width
        g -= g.mean(1, keepdims=True)
        g -= normed
        g *= rstd
        return paddle.to_tensor(g.reshape(x.shape)), dw, db


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters) with `_LayerNormFunction` on CPU for large inputs."""

    def forward(self, x):
        if self.weight is None or self.bias is None or not _on_cpu(x, NUMPY_MIN_SIZE):
            return super().forward(x)
        return _LayerNormFunction.apply(x, self.weight, self.bias, self._epsilon)


class Dropout(nn.Dropout):
    """nn.Dropout (same rate, kept values scaled by 1/(1-p)) with the CPU mask of large inputs drawn by NumPy.

    Paddle's CPU kernel draws every element from a Bernoulli distribution: 8.7 ms for [8, 100, 1024] against
    1.4 ms for NumPy's raw 32-bit draws and one compare. Each mask's NumPy generator is seeded from Paddle's,
    so `paddle.seed` (and the RNG state a resumed run restores) still fixes every mask. Elsewhere, Paddle's own.
    """

    def forward(self, x):
        if not self.training or self.p == 0 or not _on_cpu(x, NUMPY_MIN_SIZE):
            return super().forward(x)
        seed = paddle.randint(0, 2 ** 31 - 1, [2]).numpy().tolist()
        count = math.prod(x.shape)
        bits = np.random.PCG64DXSM(seed).random_raw((count + 1) // 2).view(np.uint32)[:count]
        keep = np.multiply(bits >= round(self.p * 2 ** 32), np.float32(1 / (1 - self.p)), dtype=np.float32)
        # a DLPack capsule (all 2.6 accepts); from 3.0 on Paddle shares the array's memory
        return x * paddle.utils.dlpack.from_dlpack(keep.reshape(x.shape).__dlpack__())


class WeightNormLinear(nn.Layer):
    """torch's `weight_norm(nn.Linear(in, out), dim=None)`: y = x @ W + b with W = g * v / ||v||_F, one scalar g.

    Parameters as torch's state_dict names them: `weight_g` 0-d, `weight_v` in Paddle's [in, out] layout, `bias`.
    Written out instead of `paddle.nn.utils.weight_norm` (which gives the same names and shapes on 2.6 and 3.3) so
    the head has no forward hook and its init is this class's: torch's, where v keeps nn.Linear's default
    U(-1/sqrt(in), 1/sqrt(in)) and g = ||v||, so W = v (the official BERT init only reaches the derived weight,
    which the next forward recomputes). The bias is zeroed by the model's init, as the official one does.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight_g = self.create_parameter([], default_initializer=nn.initializer.Constant(1.0))
        self.weight_v = self.create_parameter([in_features, out_features],
                                              default_initializer=nn.initializer.Uniform(-bound, bound))
        self.bias = self.create_parameter([out_features], is_bias=True)
        if self.weight_v._is_initialized():  # under paddle.LazyGuard (shapes only) there is no v to measure yet
            with paddle.no_grad():
                self.weight_g.set_value(self._norm_of_v())

    def _norm_of_v(self) -> paddle.Tensor:
        return paddle.sqrt((self.weight_v * self.weight_v).sum())

    def forward(self, x):
        return F.linear(x, self.weight_v * (self.weight_g / self._norm_of_v()), self.bias)
