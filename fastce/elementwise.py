"""Per-element cross-entropy math shared by the CPU and GPU kernels.

Plain Python functions with no array access: ``fastce.cpu`` compiles them with ``numba.njit``
and ``fastce.gpu`` with ``numba.cuda.jit(device=True)``, so both backends evaluate the same
formulas (those of ``fastce.spec``).  Naming, for one element i with logits s (softcapped):

    lse      log sum_c exp(s_c)
    keep     1 - label_smoothing            smooth_c  label_smoothing / C
    W        sum_c w_c                      sum_ws    sum_c w_c s_c
    inv_D    1 / (mean's denominator) or 1  z2_inv_Dz 2 * z_loss / (z-loss denominator) or 2*z_loss
"""


def index_loss(lse, s_t, w_t, W, sum_ws, keep, smooth_c):
    """ce_i = (1-eps) w_t (lse - s_t) + eps/C (W lse - sum_c w_c s_c)."""
    return keep * w_t * (lse - s_t) + smooth_c * (W * lse - sum_ws)


def index_grad_coefs(g, lse, w_t, W, keep, smooth_c, inv_D, z2_inv_Dz):
    """Coefficients of dL/ds_c = alpha * softmax_c - beta * [c == t] - gamma * w_c.

    From dL/ds_c = g ((a/D + 2 z lse/Dz) p_c - b_c/D) with b_c = (1-eps) w_t [c==t] + eps w_c/C
    and a = sum_c b_c = (1-eps) w_t + eps W / C.
    """
    a = keep * w_t + smooth_c * W
    alpha = g * (a * inv_D + z2_inv_Dz * lse)
    beta = g * keep * w_t * inv_D
    gamma = g * smooth_c * inv_D
    return alpha, beta, gamma


def prob_weight(p_c, w_c, keep, smooth_c):
    """q_c = w_c ((1-eps) p_c + eps/C): the weighted, smoothed target distribution."""
    return w_c * (keep * p_c + smooth_c)


def prob_loss(lse, A, sum_qs):
    """ce_i = sum_c q_c (lse - s_c) = A lse - sum_c q_c s_c with A = sum_c q_c."""
    return A * lse - sum_qs


def prob_grad_coefs(g, lse, A, inv_D, z2_inv_Dz):
    """dL/ds_c = alpha * softmax_c - beta * q_c."""
    return g * (A * inv_D + z2_inv_Dz * lse), g * inv_D


def softcap_grad_factor(s, inv_cap):
    """ds/dx for s = cap tanh(x / cap): 1 - tanh^2 = 1 - (s / cap)^2."""
    t = s * inv_cap
    return 1.0 - t * t


def z_term(lse, z_loss):
    """PaLM's z-loss of one element: z_loss * lse^2."""
    return z_loss * lse * lse
