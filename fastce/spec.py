"""The reference definition of fastce: float64 NumPy, written for reading, not speed.

Every backend (the Numba CPU kernels, the numba.cuda GPU kernels) is tested against these
functions, and these functions are tested against PyTorch.  All arrays here use the canonical
layout the public API reduces every call to::

    x       (N, C, S)  logits: N outer rows, C classes, S inner (spatial) positions
    target  (N, S)     class indices, or (N, C, S) probabilities
    weight  (C,)       class weights (ones when not given)

An *element* i is one (n, s) pair.  With ``s_ic = softcap * tanh(x_ic / softcap)`` (or ``x_ic``
when there is no softcap) and ``lse_i = log sum_c exp(s_ic)``:

Class-index targets y_i (ignored where ``y_i == ignore_index``), smoothing eps, W = sum_c w_c::

    nll_i    = w[y_i] * (lse_i - s_{i,y_i})
    smooth_i = sum_c w_c * (lse_i - s_ic)                 (only evaluated when eps > 0)
    ce_i     = (1 - eps) * nll_i + eps / C * smooth_i     (0 where ignored)
    D        = sum_{i not ignored} w[y_i]                 (the weighted mean's denominator)

``lse_i - s_ic`` is evaluated as torch does, ``(m_i - s_ic) + log sum_c exp(s_ic - m_i)`` with
``m_i = max_c s_ic``: exact for logits near the float64 limit, and ``+inf`` (not nan) for a
``-inf`` (masked) logit.  With eps = 0 the smoothing term is not evaluated at all, so a nan or
inf weight of a class that no target uses leaves the loss finite, as in torch.

Probability targets p_ic::

    q_ic = w_c * ((1 - eps) * p_ic + eps / C)
    ce_i = sum_c q_ic * (lse_i - s_ic)
    D    = N * S                                          (a plain mean over elements)

z-loss (PaLM): ``z_i = z_loss * lse_i**2`` for every element that is not ignored; its mean
divides by the count of such elements, Dz, not by the weights.

Reductions: "none" -> ce_i + z_i with the target's shape; "sum" -> sum_i (ce_i + z_i);
"mean" -> sum_i ce_i / D + sum_i z_i / Dz.  0/0 is nan, as in torch, and so is the mean when
D = 0 (every target ignored or of zero weight) whatever the smoothing term adds: torch's mean
is (1 - eps) sum nll / D + eps / C sum smooth / D, whose first part is then 0/0.

Gradient with respect to the logits (g_i the upstream gradient, D = Dz = 1 for sum/none)::

    dL/ds_ic = g_i * ((a_i / D + 2 z_loss lse_i / Dz) * softmax(s_i)_c - b_ic / D)
    a_i  = sum_c b_ic,   b_ic = q_ic   (one-hot y_i scaled by w[y_i] for index targets:
                                        b_ic = (1 - eps) w[y_i] [c == y_i] + eps w_c / C)
    dL/dx_ic = dL/ds_ic * (1 - (s_ic / softcap)**2)       (with a softcap; else dL/ds_ic)

Ignored elements have zero loss and zero gradient.

Bad targets (neither ignore_index nor in [0, C)) are errors.  With ``check_targets=False`` (no
check, so that a GPU call never waits for one) they are not: a bad element counts in neither D
nor Dz, its ce_i and z_i are nan (so is every reduced loss) and so is its gradient row.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "log_softmax", "softmax", "logsumexp", "neg_log_softmax", "softcap_logits",
    "cross_entropy_index", "cross_entropy_prob", "reduce_loss", "grad_logits",
    "cross_entropy", "cross_entropy_with_grad", "token_accuracy", "bad_targets",
]


def logsumexp(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """``lse = m + log(sum exp(x - m))`` with ``m = max x`` so that no exp overflows."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    # A row whose max is +-inf: shift by 0 so that inf - inf makes no spurious nan.
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis)


def log_softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """``log_softmax(x)_c = x_c - logsumexp(x)``."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return x - np.expand_dims(logsumexp(x, axis), axis)


def softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """``softmax(x)_c = exp(x_c - logsumexp(x))``."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.exp(log_softmax(x, axis))


def softcap_logits(x: np.ndarray, softcap: float | None) -> np.ndarray:
    """``s = softcap * tanh(x / softcap)`` (Gemma 2), or x itself when softcap is None."""
    x = np.asarray(x, dtype=np.float64)
    return x if softcap is None else softcap * np.tanh(x / softcap)


def neg_log_softmax(s: np.ndarray, axis: int = 1) -> np.ndarray:
    """``lse - s_c`` as ``(m - s_c) + log sum exp(s - m)`` (torch's order of operations): a row
    with a ``+inf`` logit is nan throughout (``inf - inf``), as in torch; a row of ``-inf`` is
    shifted by 0 instead, giving ``inf - inf = nan`` there too."""
    s = np.asarray(s, dtype=np.float64)
    m = np.max(s, axis=axis, keepdims=True)
    m = np.where(m == -np.inf, 0.0, m)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (m - s) + np.log(np.sum(np.exp(s - m), axis=axis, keepdims=True))


def _target_distribution_index(target, weight, ignore_index, eps, C):
    """b_ic of the module docstring for class-index targets, and the ignore mask (N, S)."""
    N, S = target.shape
    ignored = target == ignore_index
    safe = np.where(ignored, 0, target).astype(np.int64)
    onehot = np.zeros((N, C, S))
    np.put_along_axis(onehot, safe[:, None, :], 1.0, axis=1)
    w_y = np.where(ignored, 0.0, weight[safe])             # (N, S)
    b = (1.0 - eps) * w_y[:, None, :] * onehot
    if eps:
        b = b + eps / C * weight[None, :, None]
    b = np.where(ignored[:, None, :], 0.0, b)
    return b, ignored, w_y


def bad_targets(target, ignore_index, C):
    """The mask of bad targets: neither ignore_index nor a class in [0, C)."""
    target = np.asarray(target).astype(np.int64)
    return (target != ignore_index) & ((target < 0) | (target >= C))


def _z_terms(lse, z_loss, ignored):
    if not z_loss:
        return np.zeros(lse.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(ignored, 0.0, z_loss * lse ** 2)


def cross_entropy_index(x, target, weight=None, *, ignore_index=-100, label_smoothing=0.0,
                        softcap=None, z_loss=0.0, check_targets=True):
    """Per-element loss pieces for class-index targets.

    Returns ``(ce, z, lse, ignored, D, Dz, b)``: ce_i and z_i (N, S), lse_i, the ignore mask,
    the mean's denominators and the scaled target distribution b_ic (N, C, S) used by the
    gradient.  A bad target raises ValueError; with ``check_targets=False`` its element is
    ignored but for its ce_i and z_i, nan (its gradient row: see cross_entropy_with_grad).
    """
    x = np.asarray(x, dtype=np.float64)
    N, C, S = x.shape
    target = np.asarray(target).astype(np.int64)
    bad = bad_targets(target, ignore_index, C)
    if bad.any():
        if check_targets:
            raise ValueError(f"target {int(target[bad][0])} is out of bounds for {C} classes")
        target = np.where(bad, ignore_index, target)
    weight = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    eps = label_smoothing
    s = softcap_logits(x, softcap)
    lse = logsumexp(s, axis=1)                                          # (N, S)
    nls = neg_log_softmax(s, axis=1)                                    # lse_i - s_ic
    b, ignored, w_y = _target_distribution_index(target, weight, ignore_index, eps, C)
    safe = np.where(ignored, 0, target)
    with np.errstate(invalid="ignore", over="ignore"):
        nll = w_y * np.take_along_axis(nls, safe[:, None, :], axis=1)[:, 0, :]
        ce = (1.0 - eps) * nll
        if eps:
            ce = ce + eps / C * np.sum(weight[None, :, None] * nls, axis=1)
    ce = np.where(bad, np.nan, np.where(ignored, 0.0, ce))
    D = float(np.sum(w_y))
    Dz = float(np.sum(~ignored))
    z = np.where(bad, np.nan, _z_terms(lse, z_loss, ignored))
    return ce, z, lse, ignored, D, Dz, b


def cross_entropy_prob(x, target, weight=None, *, label_smoothing=0.0, softcap=None, z_loss=0.0):
    """Per-element loss pieces for probability targets (same return as cross_entropy_index)."""
    x = np.asarray(x, dtype=np.float64)
    N, C, S = x.shape
    p = np.asarray(target, dtype=np.float64)
    weight = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    s = softcap_logits(x, softcap)
    lse = logsumexp(s, axis=1)
    q = weight[None, :, None] * ((1.0 - label_smoothing) * p + label_smoothing / C)
    with np.errstate(invalid="ignore", over="ignore"):
        ce = np.sum(q * neg_log_softmax(s, axis=1), axis=1)
    ignored = np.zeros((N, S), dtype=bool)
    return ce, _z_terms(lse, z_loss, ignored), lse, ignored, float(N * S), float(N * S), q


def reduce_loss(ce, z, D, Dz, reduction, z_loss=0.0):
    """Apply the reduction of the module docstring (0/0 -> nan as in torch)."""
    if reduction == "none":
        return ce + z
    if reduction == "sum":
        return float(np.sum(ce) + np.sum(z))
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.float64(np.sum(ce)) / np.float64(D) if D != 0 else np.nan
        if z_loss:
            total = total + np.float64(np.sum(z)) / np.float64(Dz)
    return float(total)


def grad_logits(x, lse, b, ignored, D, Dz, reduction, grad_output=1.0, *, softcap=None, z_loss=0.0):
    """dL/dx (N, C, S) from the pieces above: see the module docstring."""
    x = np.asarray(x, dtype=np.float64)
    s = softcap_logits(x, softcap)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        p = np.exp(-neg_log_softmax(s, axis=1))           # softmax, exact near float64's limit
        a = np.sum(b, axis=1, keepdims=True)
        if reduction == "mean":
            d, dz = np.float64(D), np.float64(Dz)
        else:
            d = dz = 1.0
        g = np.asarray(grad_output, dtype=np.float64)
        g = g[:, None, :] if g.ndim == 2 else g
        zterm = 2.0 * z_loss * lse[:, None, :] / dz if z_loss else 0.0
        grad = g * ((a / d + zterm) * p - b / d)
        if softcap is not None:
            grad = grad * (1.0 - (s / softcap) ** 2)
        grad = np.where(ignored[:, None, :], 0.0, grad)      # exactly 0, whatever the logits
    return grad


def cross_entropy(x, target, weight=None, *, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, softcap=None, z_loss=0.0, check_targets=True):
    """Loss of the canonical (N, C, S) problem; index targets when ``target`` is (N, S)."""
    x = np.asarray(x, dtype=np.float64)
    if np.ndim(target) == 3:
        ce, z, *_ , D, Dz, _ = cross_entropy_prob(x, target, weight, label_smoothing=label_smoothing,
                                                  softcap=softcap, z_loss=z_loss)
    else:
        ce, z, *_, D, Dz, _ = cross_entropy_index(x, target, weight, ignore_index=ignore_index,
                                                  label_smoothing=label_smoothing,
                                                  softcap=softcap, z_loss=z_loss,
                                                  check_targets=check_targets)
    return reduce_loss(ce, z, D, Dz, reduction, z_loss)


def cross_entropy_with_grad(x, target, weight=None, *, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, softcap=None, z_loss=0.0, grad_output=1.0,
                            check_targets=True):
    """(loss, dL/dx) of the canonical problem (with ``check_targets=False``, a bad target's
    gradient row is nan)."""
    x = np.asarray(x, dtype=np.float64)
    if np.ndim(target) == 3:
        ce, z, lse, ignored, D, Dz, b = cross_entropy_prob(
            x, target, weight, label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss)
    else:
        ce, z, lse, ignored, D, Dz, b = cross_entropy_index(
            x, target, weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
            softcap=softcap, z_loss=z_loss, check_targets=check_targets)
    loss = reduce_loss(ce, z, D, Dz, reduction, z_loss)
    grad = grad_logits(x, lse, b, ignored, D, Dz, reduction, grad_output,
                       softcap=softcap, z_loss=z_loss)
    if np.ndim(target) != 3:
        grad[np.broadcast_to(bad_targets(target, ignore_index, x.shape[1])[:, None, :],
                             grad.shape)] = np.nan
    return loss, grad


def token_accuracy(x, target, ignore_index=-100):
    """Fraction of non-ignored elements whose argmax (first maximum) equals the target."""
    x = np.asarray(x, dtype=np.float64)
    target = np.asarray(target).astype(np.int64)
    valid = target != ignore_index
    hit = (np.argmax(x, axis=1) == target) & valid
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.sum(hit) / np.sum(valid))
