"""Every difference between the Paddle versions this project supports (2.6.x, 3.0-3.3), in one place."""
import paddle
from paddle import _C_ops


def _paddle_major():
    """3 for 3.x; a source build reports 0.0.0 and is taken as the newest."""
    major = int(paddle.__version__.split('.')[0])
    return major if major > 0 else 99


def adamw_(param, grad, lr, moment1, moment2, beta1_pow, beta2_pow, *, beta1, beta2, epsilon, coeff):
    """Paddle's fused AdamW kernel, in place on ``param``, ``moment1`` and ``moment2``; the pows are left as they
    are (``use_global_beta_pow``), decay ``coeff`` applied when it is > 0.

    Paddle 3.0 added a ``moment2_max`` input (after ``moment2``) and an ``amsgrad`` attribute (last); 2.6 has neither.
    """
    inputs = (param, grad, lr, moment1, moment2) + ((None,) if _paddle_major() >= 3 else ()) + (beta1_pow, beta2_pow)
    #        master_param, skip_update, beta1, beta2, epsilon, lr_ratio, coeff, with_decay, lazy_mode,
    #        min_row_size_to_use_multithread, multi_precision, use_global_beta_pow[, amsgrad]
    attrs = (None, None, beta1, beta2, epsilon, 1.0, coeff, coeff > 0, False, 1000, False, True)
    _C_ops.adamw_(*inputs, *attrs, *((False,) if _paddle_major() >= 3 else ()))
