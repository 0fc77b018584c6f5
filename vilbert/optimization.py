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
import struct

import paddle
from paddle import _C_ops

from .compat import adamw_


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

    Speed: per tensor one squared-norm kernel, an in-place scale if clipped and one fused ``adamw_`` kernel (the
    kernels ``nn.ClipGradByGlobalNorm`` and ``paddle.optimizer.AdamW`` run). ``adamw_``'s decoupled decay
    ``p -= lr*wd*p`` equals beta's ``lr*(update + wd*p)``, and its bias-correction inputs (``beta1_pow``,
    ``beta2_pow``, never advanced here) are used to cancel the kernel's one difference: it forms ``1 - beta`` in
    float32 (``1 - 0.999f`` is 1.3e-5 off 0.001), so its moments are ``s1*m`` and ``s2*v`` with
    ``s = (1 - float32(beta)) / (1 - beta)``; with ``beta1_pow = 1 - s1`` and ``beta2_pow = 1 - s2`` the kernel's
    step ``lr * sqrt(1-beta2_pow)/(1-beta1_pow) * s1*m / (sqrt(s2*v) + eps*sqrt(1-beta2_pow))`` is exactly beta's
    ``lr * m / (sqrt(v) + eps)``. The kernel runs on Paddle's OpenMP threads, which importing ``vilbert`` sets
    (``vilbert/runtime.py``): 1.2 -> 0.7 s per full-config step on 2 cores.
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
        self._moment_scales = tuple((1.0 - _as_float32(beta)) / (1.0 - beta) for beta in betas)
        self._eps = eps
        self._max_grad_norm = max_grad_norm
        self._state = {}  # name -> {'step', 'moment1', 'moment2'}, created at the parameter's first update
        self._epoch = 0
        self._last_lr = 0.0
        self._logged_name = param_groups[0]['names'][0]  # get_lr reports the lr of this parameter's updates
        self._beta_pows = None

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
        if self._max_grad_norm > 0:
            self._clip_each([grad for _, _, _, grad in live])
        if self._beta_pows is None:  # created here, on the device training runs on
            self._beta_pows = tuple(paddle.full([1], 1.0 - scale, dtype='float32') for scale in self._moment_scales)
        beta1, beta2 = self._betas
        lr_tensors = {}
        for group, name, param, grad in live:
            state = self._state.get(name)
            if state is None:
                state = self._state[name] = {'step': 0, 'moment1': paddle.zeros_like(param),
                                             'moment2': paddle.zeros_like(param)}
            lr = lr_at(state['step'], self._epoch, base_lr=group['lr'], **self._schedule)
            if name == self._logged_name:
                self._last_lr = lr
            if lr not in lr_tensors:
                lr_tensors[lr] = paddle.full([1], lr, dtype='float32')
            decay = group['weight_decay']
            adamw_(param, grad, lr_tensors[lr], state['moment1'], state['moment2'], *self._beta_pows, beta1=beta1,
                   beta2=beta2, epsilon=self._eps, coeff=decay, use_global_beta_pow=True)  # leaves the pows as they are
            state['step'] += 1

    def _clip_each(self, grads):
        """``clip_grad_norm_(p, max_norm)`` per tensor, in place: scale by ``max_norm/(norm+1e-6)`` when below 1.

        The norms are gathered into one vector, so the coefficients cost a few ops and ONE device-to-host copy
        per step; only the gradients that need it are then scaled (by the same float32 coefficient torch uses).
        """
        norms = paddle.sqrt(paddle.concat([_C_ops.squared_l2_norm(grad).reshape([1]) for grad in grads]))
        coefs = (self._max_grad_norm / (norms + 1e-6)).numpy().tolist()
        for grad, coef in zip(grads, coefs):
            if coef < 1.0:
                grad.scale_(coef)

    def state_dict(self):
        """Everything an exact resume needs, keyed by parameter name; tensors are the live ones (save right away).

        ``moment1`` / ``moment2`` are beta's ``next_m`` / ``next_v`` times ``moment_scales`` (see the class
        docstring), stored as the kernel keeps them so that a resumed run is bit-identical.
        """
        return {'epoch': self._epoch, 'last_lr': self._last_lr, 'moment_scales': list(self._moment_scales),
                'state': {name: dict(state) for name, state in self._state.items()}}

    def set_state_dict(self, state_dict):
        if [float(s) for s in state_dict['moment_scales']] != list(self._moment_scales):
            raise ValueError(f"optimizer state was saved with moment scales {state_dict['moment_scales']} (other "
                             f"betas); this optimizer uses {list(self._moment_scales)}: resume with the same betas")
        params = {name: param for group in self._param_groups for name, param in zip(group['names'], group['params'])}
        unexpected = sorted(set(state_dict['state']) - set(params))
        if unexpected:
            raise KeyError(f"optimizer state for parameters this model does not train: {unexpected[:5]} "
                           f"({len(unexpected)} in all); resume with the same model and head/freeze settings")
        state = {}
        for name, saved in state_dict['state'].items():
            entry = {'step': int(saved['step'])}
            for key in ('moment1', 'moment2'):
                value = paddle.to_tensor(saved[key], dtype='float32', place=params[name].place)  # a copy
                if value.shape != params[name].shape:
                    raise ValueError(f"optimizer {key} of {name} has shape {value.shape}, "
                                     f"the parameter has {params[name].shape}")
                entry[key] = value
            state[name] = entry
        self._state = state
        self._epoch = int(state_dict['epoch'])
        self._last_lr = float(state_dict['last_lr'])


def _as_float32(value):
    """``value`` rounded to float32, as the fused kernel sees its float attributes."""
    return struct.unpack('f', struct.pack('f', value))[0]
