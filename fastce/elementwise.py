"""Per-element cross-entropy math shared by the CPU and GPU kernels.

Plain Python functions with no array access: ``fastce.cpu`` compiles them with ``numba.njit``
and ``fastce.gpu`` with ``numba.cuda.jit(device=True)``, so both backends evaluate the same
formulas (those of ``fastce.spec``).  Naming, for one element i with logits s (softcapped) and
their maximum m:

    r        log sum_c exp(s_c - m)         lse = m + r
    d_t      m - s_t                        (so lse - s_t = d_t + r, exact near float64's limit)
    keep     1 - label_smoothing            smooth_c  label_smoothing / C
    W        sum_c w_c                      sum_wd    sum_c w_c (m - s_c)
    inv_D    1 / (mean's denominator) or 1  z2_inv_Dz 2 * z_loss / (z-loss denominator) or 2*z_loss

Terms whose option is off (smooth_c == 0, z_loss == 0) are not evaluated at all: ``0 * inf``
would poison the result with nan where torch, which skips them too, is finite.
"""
import math


def index_loss(r, d_t, w_t, W, sum_wd, keep, smooth_c):
    """ce_i = (1-eps) w_t (lse - s_t) + eps/C sum_c w_c (lse - s_c)
            = keep w_t (d_t + r) + smooth_c (W r + sum_wd)."""
    ce = keep * w_t * (d_t + r)
    if smooth_c != 0.0:
        ce += smooth_c * (W * r + sum_wd)
    return ce


def index_grad_coefs(g, lse, w_t, W, keep, smooth_c, inv_D, z2_inv_Dz):
    """Coefficients of dL/ds_c = alpha * softmax_c - beta * [c == t] - gamma * w_c.

    From dL/ds_c = g ((a/D + 2 z lse/Dz) p_c - b_c/D) with b_c = (1-eps) w_t [c==t] + eps w_c/C
    and a = sum_c b_c = (1-eps) w_t + eps W / C.
    """
    a = keep * w_t
    if smooth_c != 0.0:
        a += smooth_c * W
    alpha = g * (a * inv_D + (z2_inv_Dz * lse if z2_inv_Dz != 0.0 else 0.0))
    beta = g * keep * w_t * inv_D
    gamma = g * smooth_c * inv_D
    return alpha, beta, gamma


def prob_weight(p_c, w_c, keep, smooth_c):
    """q_c = w_c ((1-eps) p_c + eps/C): the weighted, smoothed target distribution."""
    return w_c * (keep * p_c + smooth_c)


def prob_loss(r, A, sum_qd):
    """ce_i = sum_c q_c (lse - s_c) = A r + sum_c q_c (m - s_c), with A = sum_c q_c."""
    return A * r + sum_qd


def prob_grad_coefs(g, lse, A, inv_D, z2_inv_Dz):
    """dL/ds_c = alpha * softmax_c - beta * q_c."""
    return g * (A * inv_D + (z2_inv_Dz * lse if z2_inv_Dz != 0.0 else 0.0)), g * inv_D


def softcap_grad_factor(s, inv_cap):
    """ds/dx for s = cap tanh(x / cap): 1 - tanh^2 = 1 - (s / cap)^2."""
    t = s * inv_cap
    return 1.0 - t * t


def z_term(lse, z_loss):
    """PaLM's z-loss of one element: z_loss * lse^2 (0 when z_loss is 0, whatever lse), of the
    reported lse (see reported_lse: +inf where the max is +-inf, as the spec's)."""
    return z_loss * lse * lse if z_loss != 0.0 else 0.0


def reported_lse(lse, m):
    """The log-sum-exp reported for an element (``return_lse``): lse = m + r, except where the
    max m is +-inf and the sum of exps is meaningless (inf - inf, or no finite term): then m
    itself (+inf beside a +inf logit, -inf for all -inf), as torch.logsumexp.  A NaN m (a NaN
    logit) stays NaN through lse."""
    return m if (m == math.inf or m == -math.inf) else lse
