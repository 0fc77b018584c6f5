"""The optimizer and learning-rate schedule of the run behind the paper's 72.34 (jiasenlu/vilbert_beta).

beta trains RefCOCO+ with its own ``BertAdam`` and a per-epoch ``LambdaLR``; both differ from a textbook AdamW in
ways that change the result, so they are reproduced here exactly (model_spec.md §7.1):

- no bias correction, eps 1e-6, and the weight decay sits *inside* the scheduled update
  ``lr * (m/(sqrt(v)+eps) + wd*p)``;
- each gradient is clipped on its own to norm 1 (scale ``1/(norm+1e-6)``) before it enters the moments;
- the warmup factor uses each parameter's update count *before* the update, so the first update has lr 0;
- the group lr is multiplied by ``gamma ** (#milestones <= epoch)``, set once per epoch;
- weight decay is inverted: only names containing a decay pattern (``bias``, ``LayerNorm.*``) are decayed;
- a parameter without a gradient is skipped (no moments, no decay, its update count does not advance).
"""
import ctypes
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import paddle
from paddle import _C_ops

from . import runtime


def lr_at(step, epoch, *, base_lr, t_total, warmup, milestones, gamma):
    """The lr of one update: ``step`` is the parameter's update count before this update, ``epoch`` is 0-based.

    The product is taken in beta's order (``LambdaLR`` sets ``group lr = base_lr * factor``, then ``BertAdam``'s
    ``warmup_constant`` multiplies by ``progress / warmup``) so the float values match bit for bit.
    """
    if t_total <= 0:
        raise ValueError(f"t_total must be the positive number of optimizer updates, got {t_total}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup is the fraction of t_total spent warming up, in [0, 1); got {warmup}")
    epoch_factor = gamma ** sum(1 for milestone in milestones if milestone <= epoch)
    progress = step / t_total
    warmup_factor = progress / warmup if progress < warmup else 1.0
    return base_lr * epoch_factor * warmup_factor


def build_param_groups(named_parameters, *, base_lr, head_lr, head_patterns=('vil_prediction',), weight_decay=0.01,
                       decay_patterns=('bias', 'LayerNorm.bias', 'LayerNorm.weight')):
    """Group trainable parameters by (lr, weight decay) with beta's substring rules on the state_dict name.

    ``head_lr`` goes to names containing any ``head_patterns`` (beta: ``vil_prediction`` only, so ``vision_logit``
    trains at ``base_lr``). ``weight_decay`` goes ONLY to names containing any ``decay_patterns`` (beta inverted
    BERT's no-decay list): ``LayerNorm1.weight`` and ``biattention.*`` get 0, ``LayerNorm1.bias`` gets decay.
    Returns a list of ``{'lr', 'weight_decay', 'names', 'params'}`` in order of first appearance; frozen
    (``stop_gradient``) parameters are left out and a parameter shared under two names is kept once.
    """
    groups = {}
    seen = set()
    for name, param in named_parameters:
        if param.stop_gradient or id(param) in seen:
            continue
        seen.add(id(param))
        lr = head_lr if any(pattern in name for pattern in head_patterns) else base_lr
        decay = weight_decay if any(pattern in name for pattern in decay_patterns) else 0.0
        group = groups.setdefault((lr, decay), {'lr': lr, 'weight_decay': decay, 'names': [], 'params': []})
        group['names'].append(name)
        group['params'].append(param)
    if not groups:
        raise ValueError("no trainable parameters: every parameter has stop_gradient=True")
    return list(groups.values())


def describe_param_groups(groups):
    """A table of what the optimizer will do, printed at the start of training."""
    rows = [(str(i), str(len(g['params'])), f"{sum(int(p.size) for p in g['params']):,}", f"{g['lr']:.1e}",
             f"{g['weight_decay']:g}") for i, g in enumerate(groups)]
    rows.append(('total', str(sum(len(g['params']) for g in groups)),
                 f"{sum(int(p.size) for g in groups for p in g['params']):,}", '', ''))
    header = ('group', 'tensors', 'params', 'lr', 'weight decay')
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(len(header))]
    return '\n'.join('  '.join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows])


class BertAdam:
    """beta's ``BertAdam`` (``schedule='warmup_constant'``) with its per-epoch ``LambdaLR`` folded in.

    Usage per epoch: ``set_epoch(epoch)``, then per batch ``loss.backward(); step(); clear_grad()``.
    ``clear_grad`` zeroes gradients in place (Paddle's default, and what beta's torch 1.0 ``zero_grad`` did), so a
    parameter that once had a gradient keeps being updated; only parameters never reached by backward are skipped.

    Each update is formed as beta forms it, one float32 operation after another:
    ``p -= lr * (m / (sqrt(v) + eps) + wd * p)``. Paddle's fused ``adamw_`` cannot serve: it decays by
    ``p * (1 - lr*wd)``, and near 1.0 float32 rounds ``lr*wd`` to a multiple of 6e-8, so LayerNorm weights drifted
    5e-6 from beta's over a run and got no decay at all once ``lr*wd`` fell below 3e-8. Its CPU kernel is
    also generated for AVX-512 only; elsewhere a scalar loop took 1.7 s per full-config step.

    On CPU the update runs on NumPy views of the tensors' memory, in pieces of ``_PIECE`` elements that stay in
    cache through all the operations (``update_pieces``): per step each of parameter, gradient and moments is read
    once and written once, whatever the instruction set, on ``runtime.cpu_threads()`` threads. Every operation is
    elementwise and correctly rounded, so the result depends neither on the thread count nor on the SIMD width.
    On other devices the same operations run as Paddle kernels (``update_tensors``).
    """

    def __init__(self, param_groups, *, t_total, warmup=0.1, milestones=(12, 16), gamma=0.1, betas=(0.9, 0.999),
                 eps=1e-6, max_grad_norm=1.0):
        lr_at(0, 0, base_lr=0.0, t_total=t_total, warmup=warmup, milestones=milestones, gamma=gamma)  # validates
        names = [name for group in param_groups for name in group['names']]
        if len(set(names)) != len(names):
            raise ValueError("a parameter name appears in two groups; build them with build_param_groups")
        for group in param_groups:
            for name, param in zip(group['names'], group['params'], strict=True):
                if param.dtype != paddle.float32:
                    raise ValueError(f"{name} is {param.dtype}; BertAdam updates float32 parameters only "
                                     "(keep fp32 weights and use AMP O1 autocast for half precision)")
        # ``_param_groups`` (dicts with 'params') is the name paddle.amp.GradScaler reads to unscale gradients.
        self._param_groups = param_groups
        self._schedule = dict(t_total=t_total, warmup=warmup, milestones=tuple(milestones), gamma=gamma)
        self._betas = betas
        self._eps = eps
        self._max_grad_norm = max_grad_norm
        self._state = {}  # name -> {'step', 'moment1', 'moment2'}, created at the parameter's first update
        self._epoch = 0
        self._last_lr = 0.0
        self._logged_name = param_groups[0]['names'][0]  # get_lr reports the lr of this parameter's updates
        self._threads = runtime.cpu_threads()
        self._pool = None  # ``_threads`` threads for the CPU update, started at the first step that has one

    def set_epoch(self, epoch):
        """Apply the per-epoch decay for 0-based ``epoch`` (call before the epoch's first step)."""
        self._epoch = epoch

    def get_lr(self):
        """The lr the first group's latest update used (beta's ``show_lr``); 0.0 before any update."""
        return self._last_lr

    def clear_grad(self, set_to_zero=True):
        for group in self._param_groups:
            for param in group['params']:
                param.clear_gradient(set_to_zero)

    @paddle.no_grad()
    def step(self):
        live = [(group, name, param, param.grad) for group in self._param_groups
                for name, param in zip(group['names'], group['params']) if param.grad is not None]
        if not live:
            return
        clips = self._clip_coefficients([grad for _, _, _, grad in live])
        beta1, beta2 = self._betas
        on_host, on_device = [], []
        for (group, name, param, grad), clip in zip(live, clips):
            state = self._state.get(name)
            if state is None:
                state = self._state[name] = {'step': 0, 'moment1': paddle.zeros_like(param),
                                             'moment2': paddle.zeros_like(param)}
            lr = lr_at(state['step'], self._epoch, base_lr=group['lr'], **self._schedule)
            if name == self._logged_name:
                self._last_lr = lr
            update = Update(param, grad, state['moment1'], state['moment2'], clip=clip, lr=lr,
                            weight_decay=group['weight_decay'], beta1=beta1, beta2=beta2, eps=self._eps)
            (on_host if runs_on_host(param) else on_device).append(update)
            state['step'] += 1
        if on_host:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix='BertAdam')
            update_pieces(on_host, self._pool, self._threads)
        for update in on_device:
            update_tensors(update)

    def _clip_coefficients(self, grads):
        """beta's ``clip_grad_norm_(p, max_norm)`` per tensor: the float32 factor ``max_norm/(norm+1e-6)``, or 1.0
        where that is >= 1 (or clipping is off); the factor is applied within the update.

        The norms are gathered into one vector, so the factors cost a few ops and ONE device-to-host copy per step.
        """
        if self._max_grad_norm <= 0:
            return [1.0] * len(grads)
        norms = paddle.sqrt(paddle.concat([_C_ops.squared_l2_norm(grad).reshape([1]) for grad in grads]))
        return [min(coef, 1.0) for coef in (self._max_grad_norm / (norms + 1e-6)).numpy().tolist()]

    def state_dict(self):
        """Everything an exact resume needs, keyed by parameter name; tensors are the live ones (save right away).

        ``moment1`` / ``moment2`` are beta's ``next_m`` / ``next_v``.
        """
        return {'epoch': self._epoch, 'last_lr': self._last_lr,
                'state': {name: dict(state) for name, state in self._state.items()}}

    def set_state_dict(self, state_dict):
        params = {name: param for group in self._param_groups for name, param in zip(group['names'], group['params'])}
        unexpected = sorted(set(state_dict['state']) - set(params))
        if unexpected:
            raise KeyError(f"optimizer state for parameters this model does not train: {unexpected[:5]} "
                           f"({len(unexpected)} in all); resume with the same model and head/freeze settings")
        # saved by the earlier fused-kernel optimizer, the moments were the fused kernel's, beta's times these factors
        scales = [float(scale) for scale in state_dict.get('moment_scales', (1.0, 1.0))]
        state = {}
        for name, saved in state_dict['state'].items():
            entry = {'step': int(saved['step'])}
            for key, scale in zip(('moment1', 'moment2'), scales):
                moment = (np.asarray(saved[key], dtype=np.float64) / scale).astype(np.float32)
                if moment.shape != tuple(params[name].shape):
                    raise ValueError(f"optimizer {key} of {name} has shape {list(moment.shape)}, "
                                     f"the parameter has {params[name].shape}")
                entry[key] = paddle.to_tensor(moment, place=params[name].place)
            state[name] = entry
        self._state = state
        self._epoch = int(state_dict['epoch'])
        self._last_lr = float(state_dict['last_lr'])


class Update:
    """One tensor's update in a step: the tensors it touches and its float32 constants, as beta's torch sees them
    (a Python float meeting a float32 tensor is rounded to float32)."""

    def __init__(self, param, grad, moment1, moment2, *, clip, lr, weight_decay, beta1, beta2, eps):
        if grad.dtype != paddle.float32:
            raise ValueError(f"a gradient is {grad.dtype}; BertAdam needs float32 gradients (AMP O1 keeps them so)")
        self.tensors = (param, grad, moment1, moment2)
        self.clip, self.lr, self.weight_decay = np.float32(clip), np.float32(lr), np.float32(weight_decay)
        self.beta1, self.one_minus_beta1 = np.float32(beta1), np.float32(1.0 - beta1)
        self.beta2, self.one_minus_beta2 = np.float32(beta2), np.float32(1.0 - beta2)
        self.eps = np.float32(eps)


def update_piece(u, param, grad, moment1, moment2, scratch, scratch2):
    """beta's update of one piece, in place; each line is the torch line beside it, operation for operation.

    ``param`` .. ``moment2`` are views of the same slice of each tensor, ``scratch*`` NumPy buffers of its length.
    """
    if u.clip != 1:
        grad *= u.clip                                   # clip_grad_norm_: grad.mul_(clip_coef)
    moment1 *= u.beta1                                   # next_m.mul_(beta1)
    np.multiply(grad, u.one_minus_beta1, out=scratch)    #       .add_(1 - beta1, grad)
    moment1 += scratch
    np.multiply(grad, u.one_minus_beta2, out=scratch)    # next_v.mul_(beta2).addcmul_(1 - beta2, grad, grad)
    scratch *= grad
    moment2 *= u.beta2
    moment2 += scratch
    np.sqrt(moment2, out=scratch)                        # update = next_m / (next_v.sqrt() + e)
    scratch += u.eps
    np.divide(moment1, scratch, out=scratch)
    if u.weight_decay:
        np.multiply(param, u.weight_decay, out=scratch2)  # update += weight_decay * p.data
        scratch += scratch2
    scratch *= u.lr                                      # update_with_lr = lr_scheduled * update
    param -= scratch                                     # p.data.add_(-update_with_lr)


_PIECE = 1 << 16  # elements: 256 KB per tensor, so the six arrays a piece touches stay in L2/L3 cache


def update_pieces(updates, pool, threads):
    """``update_piece`` over every ``_PIECE``-element slice of the CPU tensors of ``updates``, on ``threads`` of ``pool``.

    The tensors are viewed in place as NumPy arrays (through ``data_ptr``; parameters, gradients and moments are
    dense float32). Each thread takes the next piece from one shared list, so a thread slowed by another process
    takes fewer; which thread updates a piece does not change its result.
    """
    pieces = []
    for u in updates:
        arrays = [_host_array(tensor) for tensor in u.tensors]
        pieces += [(u, [array[start:start + _PIECE] for array in arrays]) for start in range(0, len(arrays[0]),
                                                                                             _PIECE)]
    queue = iter(pieces)  # a list iterator: taking the next item is atomic under the GIL

    def work():
        scratch = np.empty(_PIECE, np.float32), np.empty(_PIECE, np.float32)
        for u, views in queue:
            update_piece(u, *views, *(buffer[:len(views[0])] for buffer in scratch))

    for future in [pool.submit(work) for _ in range(threads)]:
        future.result()


def runs_on_host(tensor):
    """Whether ``tensor``'s update runs in NumPy (``update_pieces``) rather than in Paddle kernels."""
    return tensor.place.is_cpu_place()


def update_tensors(u):
    """``update_piece`` in Paddle kernels, for tensors off the CPU (NumPy cannot reach their memory)."""
    param, grad, moment1, moment2 = u.tensors
    if u.clip != 1:
        grad.scale_(float(u.clip))
    moment1.scale_(float(u.beta1)).add_(grad.scale(float(u.one_minus_beta1)))
    moment2.scale_(float(u.beta2)).add_(grad.scale(float(u.one_minus_beta2)) * grad)
    update = moment1 / (moment2.sqrt() + float(u.eps))
    if u.weight_decay:
        update = update + param.scale(float(u.weight_decay))
    param.subtract_(update.scale_(float(u.lr)))


def _host_array(tensor):
    """A writable NumPy view of a dense float32 CPU tensor's memory (valid while the tensor lives)."""
    size = int(tensor.size)
    return np.frombuffer((ctypes.c_float * size).from_address(tensor.data_ptr()), np.float32, size)
