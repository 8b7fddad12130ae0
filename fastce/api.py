"""fastce's public functions: argument checking, the canonical (N, C, S) view, and dispatch.

Everything here is backend-neutral: it checks shapes, dtypes and options from array metadata,
reshapes the logits to (N, C, S) without copying when the memory allows, and hands the work to
the backend that ``fastce.dispatch`` picked from the arrays.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple

import numpy as np

from .dispatch import backend_for

__all__ = [
    "cross_entropy", "cross_entropy_backward", "cross_entropy_with_grad", "CrossEntropyLoss",
    "CrossEntropyOutput", "nll_loss",
]

_REDUCTIONS = ("none", "mean", "sum")
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class CrossEntropyOutput(NamedTuple):
    """What ``cross_entropy(..., return_z_loss=True / return_token_accuracy=True)`` returns.

    ``loss`` is the usual result (z-loss included).  ``z_loss`` is the z-loss component alone,
    reduced like the loss (mean over non-ignored elements); ``token_accuracy`` is the fraction
    of non-ignored elements whose first argmax equals the target (a Python float, nan when all
    are ignored).  Fields not asked for are None.
    """
    loss: object
    z_loss: object = None
    token_accuracy: object = None


# ---------------------------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------------------------
def _check_options(reduction, label_smoothing, softcap, z_loss):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fastce: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    try:
        eps = float(label_smoothing)
    except (TypeError, ValueError):
        raise TypeError(f"fastce: label_smoothing must be a float, got {label_smoothing!r}") from None
    if not 0.0 <= eps <= 1.0:          # also rejects nan
        raise ValueError(f"fastce: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    cap = 0.0
    if softcap is not None:
        try:
            cap = float(softcap)
        except (TypeError, ValueError):
            raise TypeError(f"fastce: softcap must be None or a float, got {softcap!r}") from None
        if not (cap > 0.0 and math.isfinite(cap)):
            raise ValueError(f"fastce: softcap must be a positive finite float, got {softcap!r}")
    try:
        zl = float(z_loss)
    except (TypeError, ValueError):
        raise TypeError(f"fastce: z_loss must be a float, got {z_loss!r}") from None
    if not (zl >= 0.0 and math.isfinite(zl)):
        raise ValueError(f"fastce: z_loss must be a finite float >= 0, got {z_loss!r}")
    return eps, cap, zl


def _check_ignore_index(ignore_index):
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"fastce: ignore_index must be an int, got {ignore_index!r}") from None


def _check_out(be, out, x, input):
    """The caller's gradient buffer: x's shape and dtype, C-contiguous; may be ``input``."""
    o = be.asarray(out)
    if tuple(o.shape) != tuple(x.shape) or o.dtype != x.dtype:
        raise ValueError(f"fastce: out must have the input's shape {tuple(x.shape)} and dtype "
                         f"{x.dtype}, got {tuple(o.shape)} {o.dtype}")
    if x.dtype == np.float16:
        raise ValueError("fastce: out= is not supported for float16 input (computed in float32)")
    if not _is_writeable_c_contiguous(out if be.name != "cpu" else o):
        raise ValueError("fastce: out must be a writeable C-contiguous array")
    return o


def _is_writeable_c_contiguous(a):
    flags = getattr(a, "flags", None)
    if flags is not None and hasattr(flags, "c_contiguous"):       # NumPy, CuPy
        return bool(flags.c_contiguous) and bool(getattr(flags, "writeable", True))
    if hasattr(a, "is_c_contiguous"):                               # Numba device arrays
        return bool(a.is_c_contiguous())
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        strides, shape = cai.get("strides"), cai["shape"]
        if strides is None:
            return True
        itemsize = np.dtype(cai["typestr"]).itemsize
        expected = []
        for n in reversed(shape):
            expected.append(itemsize)
            itemsize *= n
        return tuple(strides) == tuple(reversed(expected)) or math.prod(shape) <= 1
    return False


def _check_logits(be, input, name="input"):
    x = be.asarray(input)
    if x.dtype not in _FLOATS:
        raise TypeError(f"fastce: {name} must be float16, float32 or float64 logits, got dtype "
                        f"{x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"fastce: {name} must have at least one dimension (the classes), got a "
                         f"0-d array")
    return x


def _class_axis(x, class_axis):
    axis = 0 if x.ndim == 1 else class_axis
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"fastce: class_axis must be an int, got {class_axis!r}") from None
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"fastce: class_axis {class_axis} is out of range for input of shape "
                         f"{tuple(x.shape)}")
    return axis % x.ndim


def _canonical(be, x, axis):
    """(N, C, S) view of x (a copy only when x is not C-contiguous or is float16)."""
    shape = tuple(x.shape)
    N = math.prod(shape[:axis])
    C = shape[axis]
    S = math.prod(shape[axis + 1:])
    if x.dtype == np.float16:
        x = x.astype(np.float32)       # float16 is computed in float32
    x = be.contiguous(x)
    return x.reshape(N, C, S), N, C, S


def check_weight_meta(w, C):
    """Raise unless ``w`` (any array type) is a 1-D real array of length C."""
    if w.ndim != 1 or w.shape[0] != C:
        raise ValueError(f"fastce: weight must be a 1-D array of length C={C} (one weight per "
                         f"class), got shape {tuple(w.shape)}")
    if w.dtype.kind not in "fiu":
        raise TypeError(f"fastce: weight must be a real numeric array, got dtype {w.dtype}")


def _check_weight(be, weight, C, dtype):
    if weight is None:
        return be.ones(C, dtype), float(C)
    w = be.asarray(weight)
    check_weight_meta(w, C)
    w = be.contiguous(w.astype(dtype))
    return w, be.total(w)


def _check_target(be, target, x, axis):
    """('index' | 'prob', target array).  Index targets have x's shape minus the class axis."""
    t = be.asarray(target)
    kind = t.dtype.kind
    if kind == "b":
        raise TypeError("fastce: target must hold integer class indices or float probabilities, "
                        "got a bool array")
    if kind == "f":
        if tuple(t.shape) != tuple(x.shape):
            raise ValueError(
                f"fastce: float targets are class probabilities and must have the input's shape "
                f"{tuple(x.shape)}, got {tuple(t.shape)} (class indices need an integer dtype)")
        return "prob", t
    if kind not in "iu":
        raise TypeError(f"fastce: target must be an integer (class index) or float "
                        f"(probability) array, got dtype {t.dtype}")
    expected = tuple(x.shape[:axis]) + tuple(x.shape[axis + 1:])
    if tuple(t.shape) != expected:
        raise ValueError(f"fastce: class-index target must have shape {expected} for input of "
                         f"shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.dtype.itemsize > 8 or t.dtype not in _NATIVE_TARGETS:
        t = t.astype(np.int64)
    return "index", t


_NATIVE_TARGETS = (np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.uint8))


def _check_grad_output(be, grad_output, reduction, loss_shape, dtype):
    """The upstream gradient as a flat float64 array and its stride (0 = one scalar)."""
    if grad_output is None:
        return be.ones(1, np.float64), 0
    if reduction == "none":
        g = be.asarray(grad_output)
        if tuple(g.shape) != tuple(loss_shape):
            raise ValueError(f"fastce: with reduction='none', grad_output must have the loss's "
                             f"shape {tuple(loss_shape)}, got {tuple(g.shape)}")
        return be.contiguous(g.astype(np.float64)).reshape(-1), 1
    if np.isscalar(grad_output):
        return be.ones(1, np.float64) * float(grad_output), 0
    g = be.asarray(grad_output)
    if g.size != 1 or g.ndim > 1:
        raise ValueError(f"fastce: with reduction={reduction!r}, grad_output must be a scalar, "
                         f"got shape {tuple(g.shape)}")
    return be.contiguous(g.astype(np.float64)).reshape(1), 0


def _bad_target_error(be, t, pos, C, ignore_index):
    flat = t.reshape(-1)
    value = be.to_host_scalar(flat[pos])
    where = np.unravel_index(pos, tuple(t.shape)) if t.ndim else ()
    return ValueError(f"fastce: target {value} at position {tuple(int(i) for i in where)} is out "
                      f"of bounds: class indices must be in [0, {C}) or equal ignore_index="
                      f"{ignore_index}")


def _div(a: float, b: float) -> float:
    """IEEE a / b for Python floats (x/0 -> +-inf, 0/0 -> nan), as torch's mean of nothing."""
    if b == 0.0:
        return math.nan if (a == 0.0 or a != a) else math.copysign(math.inf, a)
    return a / b


# ---------------------------------------------------------------------------------------------
# The one implementation behind every cross-entropy entry point
# ---------------------------------------------------------------------------------------------
def _cross_entropy(input, target, weight, grad_output, *, ignore_index, reduction,
                   label_smoothing, softcap, z_loss, class_axis, want_loss, want_grad,
                   want_stats=False, out=None):
    be = backend_for(input=input, target=target, weight=weight, grad_output=grad_output)
    eps, cap, zl = _check_options(reduction, label_smoothing, softcap, z_loss)
    x = _check_logits(be, input)
    ignore_index = _check_ignore_index(ignore_index)
    axis = _class_axis(x, class_axis)
    kind, t = _check_target(be, target, x, axis)
    in_dtype = x.dtype
    x3, N, C, S = _canonical(be, x, axis)
    if C == 0:
        raise ValueError("fastce: input has no classes (size 0 along the class axis)")
    w, W = _check_weight(be, weight, C, x3.dtype)
    loss_shape = tuple(x.shape[:axis]) + tuple(x.shape[axis + 1:])
    g, g_stride = (_check_grad_output(be, grad_output, reduction, loss_shape, in_dtype)
                   if want_grad else (be.ones(1, np.float64), 0))

    # The forward may validate its targets inside the loss kernel itself (which never reads
    # with a bad one); the gradient needs the mean's denominator first: a pre-pass.
    fuse_stats = kind == "index" and not want_grad and getattr(be, "fuses_target_stats", False)
    if kind == "index":
        t2 = be.contiguous(t).reshape(N, S)
        D, count = 1.0, 0
        if not fuse_stats:
            D, count, bad = be.target_stats(t2, w, ignore_index, C)
            if bad >= 0:
                raise _bad_target_error(be, t, bad, C, ignore_index)
        Dz = float(count)
    else:
        if ignore_index != -100:
            raise ValueError("fastce: ignore_index is not supported with probability targets "
                             "(as in torch)")
        t2 = be.contiguous(t.astype(x3.dtype)).reshape(N, C, S)
        D = Dz = float(N * S)
        count = N * S

    mean = reduction == "mean"
    # Gradient coefficients (the forward's kernels ignore them; its D may not be known yet).
    inv_D = (_div(1.0, D) if mean else 1.0) if want_grad else 1.0
    z2 = 2.0 * zl * (_div(1.0, Dz) if mean else 1.0) if want_grad else 0.0
    grad = None
    in_place = False
    if want_grad:
        if out is None:
            grad = be.empty((N, C, S), x3.dtype)
        else:
            o = _check_out(be, out, x, input)
            in_place = out is input or (be.name == "cpu" and np.may_share_memory(o, x3))
            if in_place and (cap or be.name != "cpu"):
                # The CPU kernels read all they need before overwriting the logits, except
                # for softcap's third pass; the GPU kernels make no such promise.
                x3 = x3.copy()
                in_place = False
            grad = be.contiguous(o).reshape(N, C, S)
    if kind == "index":
        prm = be.xp.asarray(np.array([1.0 - eps, eps / C, W, cap, inv_D, z2, zl,
                                      float(in_place), float(want_stats)]))
        ce, zls, hit, stats = be.index_loss(x3, t2, w, prm, ignore_index, grad, g, g_stride,
                                            per_position=reduction == "none",
                                            fuse_stats=fuse_stats)
        if fuse_stats:
            D, count, bad = stats
            if bad >= 0:
                raise _bad_target_error(be, t, bad, C, ignore_index)
            Dz = float(count)
    else:
        prm = be.xp.asarray(np.array([1.0 - eps, eps / C, cap, inv_D, z2, zl]))
        ce, zls = be.prob_loss(x3, t2, w, prm, grad, g, g_stride)
        hit = None

    loss = None
    if want_loss:
        if reduction == "none":
            per = ce + zls if zl else ce
            loss = per.reshape(loss_shape).astype(in_dtype)
        else:
            total = be.total(ce)
            value = _div(total, D) if mean else total
            if zl:
                zsum = be.total(zls)
                value = value + (_div(zsum, Dz) if mean else zsum)
            loss = be.scalar(value, in_dtype)
    if grad is not None:
        if out is not None:
            grad = out
        else:
            grad = grad.reshape(x.shape)
            if grad.dtype != in_dtype:
                grad = grad.astype(in_dtype)
    stats = None
    if want_stats:
        with np.errstate(divide="ignore", invalid="ignore"):
            zpart = None
            if reduction == "none":
                zpart = zls.reshape(loss_shape).astype(in_dtype)
            else:
                zs = be.total(zls)
                zpart = be.scalar(zs / Dz if mean else zs, in_dtype)
            acc = (be.total(hit) / count) if (hit is not None and count) else float("nan")
        stats = (be.wrap(zpart, input), acc)
    return be.wrap(loss, input), be.wrap(grad, input), stats


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, softcap=None, z_loss=0.0, class_axis=1,
                  return_z_loss=False, return_token_accuracy=False):
    """Cross-entropy between logits ``input`` and ``target``, as torch's ``F.cross_entropy``.

    input: logits (C,), (N, C) or (N, C, d1, ..., dK); float16/32/64 (float16 computed in
        float32).  ``class_axis`` (default 1, fastce only) names the class axis, so that (B, T, V)
        logits need no transposed copy: ``class_axis=-1``.
    target: class indices of any integer dtype with the input's shape minus the class axis, or
        class probabilities (float, the input's shape).
    weight: (C,) class weights.  With ``reduction="mean"`` the sum of per-element losses is
        divided by the sum of the targets' weights, not by their count (torch's rule).
    ignore_index: targets equal to it contribute nothing (any integer, even a valid class).
    label_smoothing: eps in [0, 1]; softcap: Gemma-2 logit softcapping; z_loss: PaLM's
        ``z_loss * logsumexp**2`` per non-ignored element (its mean divides by their count).
    return_z_loss / return_token_accuracy: return a ``CrossEntropyOutput`` with those extras,
        computed in the same pass.

    Returns a NumPy scalar (CuPy 0-d array on the GPU) of the input's dtype for mean/sum, an
    array of the target's shape for "none".
    """
    want_stats = return_z_loss or return_token_accuracy
    loss, _, stats = _cross_entropy(
        input, target, weight, None, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss, class_axis=class_axis,
        want_loss=True, want_grad=False, want_stats=want_stats)
    if not want_stats:
        return loss
    return CrossEntropyOutput(loss, stats[0] if return_z_loss else None,
                              stats[1] if return_token_accuracy else None)


def cross_entropy_backward(input, target, grad_output=None, weight=None, *, ignore_index=-100,
                           reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0,
                           class_axis=1, out=None):
    """d loss / d input, the input's shape and dtype.  ``grad_output`` is the upstream gradient:
    a scalar for mean/sum, an array of the loss's shape for "none"; None means ones.
    ``out``: a C-contiguous array of the input's shape and dtype to write the gradient into; it
    may be ``input`` itself (the logits are overwritten by their gradient, saving memory)."""
    _, grad, _ = _cross_entropy(
        input, target, weight, grad_output, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss, class_axis=class_axis,
        want_loss=False, want_grad=True, out=out)
    return grad


def cross_entropy_with_grad(input, target, weight=None, *, grad_output=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0,
                            class_axis=1, return_z_loss=False, return_token_accuracy=False,
                            out=None):
    """(loss, grad) from one fused pass over the logits; allocates only the gradient (nothing
    with ``out``, which may be ``input`` itself: see cross_entropy_backward).

    With return_z_loss / return_token_accuracy the first item is a ``CrossEntropyOutput``.
    """
    want_stats = return_z_loss or return_token_accuracy
    loss, grad, stats = _cross_entropy(
        input, target, weight, grad_output, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss, class_axis=class_axis,
        want_loss=True, want_grad=True, want_stats=want_stats, out=out)
    if want_stats:
        loss = CrossEntropyOutput(loss, stats[0] if return_z_loss else None,
                                  stats[1] if return_token_accuracy else None)
    return loss, grad


class CrossEntropyLoss:
    """A callable like ``torch.nn.CrossEntropyLoss``: ``loss_fn(input, target)``,
    ``loss_fn.backward(input, target, grad_output=None)`` and ``loss_fn.with_grad(...)``."""

    def __init__(self, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 softcap=None, z_loss=0.0, class_axis=1):
        _check_options(reduction, label_smoothing, softcap, z_loss)
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.softcap = softcap
        self.z_loss = z_loss
        self.class_axis = class_axis

    def _options(self):
        return dict(ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing, softcap=self.softcap,
                    z_loss=self.z_loss, class_axis=self.class_axis)

    def __call__(self, input, target):
        return cross_entropy(input, target, self.weight, **self._options())

    def backward(self, input, target, grad_output=None):
        return cross_entropy_backward(input, target, grad_output, self.weight, **self._options())

    def with_grad(self, input, target, grad_output=None):
        return cross_entropy_with_grad(input, target, self.weight, grad_output=grad_output,
                                       **self._options())

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"CrossEntropyLoss(weight={'None' if self.weight is None else '...'}, {opts})"


def nll_loss(log_probs, target, weight=None, *, ignore_index=-100, reduction="mean",
             class_axis=1):
    """Negative log-likelihood of ``target`` under ``log_probs`` (torch's ``F.nll_loss``):
    ``l_i = -w[y_i] * log_probs[i, y_i]``, the mean dividing by the sum of the targets' weights."""
    be = backend_for(input=log_probs, target=target, weight=weight)
    _check_options(reduction, 0.0, None, 0.0)
    x = _check_logits(be, log_probs, "log_probs")
    ignore_index = _check_ignore_index(ignore_index)
    axis = _class_axis(x, class_axis)
    kind, t = _check_target(be, target, x, axis)
    if kind != "index":
        raise TypeError("fastce: nll_loss takes class-index (integer) targets")
    x3, N, C, S = _canonical(be, x, axis)
    w, _ = _check_weight(be, weight, C, np.float64)
    t2 = be.contiguous(t).reshape(N, S)
    D, _, bad = be.target_stats(t2, w, ignore_index, C)
    if bad >= 0:
        raise _bad_target_error(be, t, bad, C, ignore_index)
    xp = be.xp
    ignored = t2 == ignore_index
    safe = xp.where(ignored, 0, t2).astype(np.int64)
    picked = xp.take_along_axis(x3, safe[:, None, :], axis=1)[:, 0, :].astype(np.float64)
    per = xp.where(ignored, 0.0, -w[safe] * picked)
    loss_shape = tuple(x.shape[:axis]) + tuple(x.shape[axis + 1:])
    if reduction == "none":
        return be.wrap(per.reshape(loss_shape).astype(x.dtype), log_probs)
    total = be.total(per)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.float64(total) / np.float64(D) if reduction == "mean" else np.float64(total)
    return be.wrap(be.scalar(value, x.dtype), log_probs)
