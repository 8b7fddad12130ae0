"""fastce's public functions: argument checking, the canonical (N, C, S) view, and dispatch.

Everything here is backend-neutral: it checks shapes, dtypes and options from array metadata,
reshapes the logits to (N, C, S) without copying when the memory allows, and hands the work to
the backend that ``fastce.dispatch`` picked from the arrays.
"""
from __future__ import annotations

import math
import operator
import threading
from typing import NamedTuple

import numpy as np

from .dispatch import backend_for, cpu_backend, is_dask_array
from .options import LossOptions
from .options import ieee_div as _div, mean_div as _mean

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
    are ignored); ``lse`` (``return_lse=True``) is the log-sum-exp of the (softcapped) logits
    of every position (ignored ones too), the target's shape, in the input's dtype.  Fields
    not asked for are None.
    """
    loss: object
    z_loss: object = None
    token_accuracy: object = None
    lse: object = None


# ---------------------------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------------------------
def check_options(reduction, label_smoothing, softcap, z_loss):
    """(label_smoothing, softcap (0.0 for None), z_loss) as floats, after checking them and
    ``reduction``: the option checks of every entry point."""
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


_INT64 = np.iinfo(np.int64)


def check_targets_flag(check_targets):
    """check_targets as given (True or False; anything else is a TypeError)."""
    if check_targets is not True and check_targets is not False:
        raise TypeError(f"fastce: check_targets must be True or False, got {check_targets!r}")
    return check_targets


def check_ignore_index(ignore_index):
    """``ignore_index`` as a Python int (any int64 value)."""
    if isinstance(ignore_index, (bool, np.bool_)):
        raise TypeError(f"fastce: ignore_index must be an int, got {ignore_index!r}")
    try:
        value = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"fastce: ignore_index must be an int, got {ignore_index!r}") from None
    if not _INT64.min <= value <= _INT64.max:
        raise ValueError(f"fastce: ignore_index must fit in int64 (as in torch), got {value}")
    return value


def _check_out(be, out, x):
    """The caller's gradient buffer: an array of the backend, x's shape and dtype,
    C-contiguous.  It may be the input itself (see _cross_entropy for other overlaps)."""
    if not be.is_array(out):
        raise TypeError(f"fastce: out must be {be.array_kind}, got {type(out).__name__}")
    o = be.asarray(out)
    # bfloat16 logits: a bfloat16 or a float32 gradient
    ok = o.dtype == x.dtype or (_is_bf16(x.dtype) and o.dtype == np.float32)
    if tuple(o.shape) != tuple(x.shape) or not ok:
        raise ValueError(f"fastce: out must have the input's shape {tuple(x.shape)} and dtype "
                         f"{x.dtype}, got {tuple(o.shape)} {o.dtype}")
    if x.dtype == np.float16:
        raise ValueError("fastce: out= is not supported for float16 input (computed in float32)")
    if not be.is_writeable_c_contiguous(out):
        raise ValueError("fastce: out must be a writeable C-contiguous array")
    return o


def _is_bf16(dt):
    """ml_dtypes.bfloat16, by name: fastce never imports ml_dtypes.  (kind first: NumPy
    computes ``dtype.name`` in Python, a few microseconds per call.)"""
    return dt.kind == "V" and dt.name == "bfloat16"


def _loss_dtype(dt):
    """The dtype of losses: the logits', float32 for bfloat16."""
    return np.dtype(np.float32) if _is_bf16(dt) else dt


def _compute_dtype(dt):
    """The dtype of the computation (class weights, probability targets): float32 for the
    16-bit dtypes."""
    return np.dtype(np.float32) if (_is_bf16(dt) or dt == np.float16) else dt


def _check_logits(be, input, name="input"):
    x = be.asarray(input)
    if x.dtype.kind == "f" and not x.dtype.isnative:
        x = be.cast(x, x.dtype.newbyteorder("="))   # big-endian logits: one native-order copy
    bf16_ok = _is_bf16(x.dtype) and be.reads_bfloat16
    if x.dtype not in _FLOATS and not bf16_ok:
        raise TypeError(f"fastce: {name} must be float16, float32 or float64 logits (or "
                        f"bfloat16 NumPy ones), got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"fastce: {name} must have at least one dimension (the classes), got a "
                         f"0-d array")
    return x


def _class_axis(x, class_axis):
    """The class axis: torch's (1, or 0 for unbatched 1-D input) when class_axis is None."""
    if class_axis is None:
        return 1 if x.ndim > 1 else 0
    if isinstance(class_axis, (bool, np.bool_)):
        raise TypeError(f"fastce: class_axis must be None or an int, got {class_axis!r}")
    try:
        axis = operator.index(class_axis)
    except TypeError:
        raise TypeError(f"fastce: class_axis must be None or an int, got {class_axis!r}") from None
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"fastce: class_axis {class_axis} is out of range for input of shape "
                         f"{tuple(x.shape)}")
    return axis % x.ndim


def _canonical(be, x, axis, native_float16=False):
    """(N, C, S) view of x (a copy only when x is not C-contiguous, or is float16 and the
    kernels are not to read it as it is: ``native_float16`` and ``be.reads_float16``)."""
    shape = tuple(x.shape)
    N = math.prod(shape[:axis])
    C = shape[axis]
    S = math.prod(shape[axis + 1:])
    # float16 is computed in float32
    if x.dtype == np.float16 and not (native_float16 and be.reads_float16):
        x = be.cast(x, np.float32)
    else:
        x = be.contiguous(x)
    return x.reshape(N, C, S), N, C, S


def check_weight_meta(w, C):
    """Raise unless ``w`` (any array type) is a 1-D real array of length C."""
    if w.ndim != 1 or w.shape[0] != C:
        raise ValueError(f"fastce: weight must be a 1-D array of length C={C} (one weight per "
                         f"class), got shape {tuple(w.shape)}")
    if w.dtype.kind not in "fiu":
        raise TypeError(f"fastce: weight must be a real numeric array, got dtype {w.dtype}")


def _check_weight(be, weight, C, dtype, need_sum=True):
    """(weights in the compute dtype, their sum).  Raises if a finite weight overflows that
    dtype (1e39 in float32 would silently become inf).  Without ``need_sum`` (the sum only
    enters label smoothing's term) the sum is nan unless a narrowing cast needed checking: on
    the GPU that saves a host round trip."""
    if weight is None:
        return be.ones(C, dtype), float(C)
    w = be.asarray(weight)
    check_weight_meta(w, C)
    with np.errstate(over="ignore"):
        wc = be.cast(w, dtype)
    narrowed = w.dtype.kind == "f" and w.dtype.itemsize > np.dtype(dtype).itemsize
    if not (need_sum or narrowed):          # (integers fit any float dtype's range)
        return wc, math.nan
    W = be.total(wc)
    if not math.isfinite(W) and w.dtype != dtype and math.isfinite(be.total(w)):
        host = np.asarray(be.to_host(w), dtype=np.float64)
        with np.errstate(over="ignore"):
            bad = int(np.flatnonzero(np.isinf(host.astype(dtype)))[0])
        raise ValueError(f"fastce: weight {float(host[bad])!r} of class {bad} overflows the logits' "
                         f"compute dtype {np.dtype(dtype)}; pass smaller weights (only their "
                         f"ratios matter to the mean) or float64 logits")
    return wc, W


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
    if t.dtype.kind == "u" and t.dtype.itemsize >= 8:
        # uint64 values above int64's range would wrap (possibly onto ignore_index).
        pos = be.first_above(t, _INT64.max)
        if pos >= 0:
            raise _bad_target_error(be, t, pos, int(x.shape[axis]), None)
    if t.dtype.itemsize > 8 or t.dtype not in _NATIVE_TARGETS:
        t = be.cast(t, np.int64)
    return "index", t


_NATIVE_TARGETS = (np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.uint8))


def _check_real(be, a, name):
    """``a`` as an array of the backend, rejecting what would be silently cast to float."""
    if isinstance(a, (str, bytes, complex, np.complexfloating)):
        raise TypeError(f"fastce: {name} must be a real number or array, got {a!r}")
    arr = be.asarray(a)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"fastce: {name} must be real (float or integer), got dtype {arr.dtype}")
    return arr


def _check_grad_output(be, grad_output, reduction, loss_shape):
    """The upstream gradient as a flat float64 array and its stride (0 = one scalar)."""
    if grad_output is None:
        return be.ones(1, np.float64), 0
    if reduction == "none":
        g = _check_real(be, grad_output, "grad_output")
        if tuple(g.shape) != tuple(loss_shape):
            raise ValueError(f"fastce: with reduction='none', grad_output must have the loss's "
                             f"shape {tuple(loss_shape)}, got {tuple(g.shape)}")
        return be.cast(g, np.float64).reshape(-1), 1
    if np.isscalar(grad_output):
        _check_real(np, grad_output, "grad_output")
        return be.full((1,), float(grad_output), np.float64), 0
    g = _check_real(be, grad_output, "grad_output")
    if g.size != 1 or g.ndim > 1:
        raise ValueError(f"fastce: with reduction={reduction!r}, grad_output must be a scalar, "
                         f"got shape {tuple(g.shape)}")
    return be.cast(g, np.float64).reshape(1), 0


def _bad_target_error(be, t, pos, C, ignore_index):
    value = be.element(t, pos)
    where = np.unravel_index(pos, tuple(t.shape)) if t.ndim else ()
    allowed = f"[0, {C})" + ("" if ignore_index is None else
                             f" or equal ignore_index={ignore_index}")
    return ValueError(f"fastce: target {value} at position {tuple(int(i) for i in where)} is out "
                      f"of bounds: class indices must be in {allowed}")


def check_index_target(target, weight, ignore_index, C, dtype):
    """Validate class-index targets for C classes and the class weights (cast to ``dtype``,
    the compute dtype); return (D, count): the sum of the non-ignored targets' weights and
    their number.  The one target check behind every entry point (fastce.linear's too)."""
    be = backend_for(target=target, weight=weight)
    ignore_index = check_ignore_index(ignore_index)
    t = be.asarray(target)
    if t.dtype.kind not in "iu":
        what = "a bool" if t.dtype.kind == "b" else f"dtype {t.dtype}"
        raise TypeError(f"fastce: target must hold integer class indices, got {what} array")
    if t.dtype.kind == "u" and t.dtype.itemsize >= 8:
        pos = be.first_above(t, _INT64.max)
        if pos >= 0:
            raise _bad_target_error(be, t, pos, C, None)
    if t.dtype not in _NATIVE_TARGETS:
        t = be.cast(t, np.int64)
    w, _ = _check_weight(be, weight, C, np.dtype(dtype))
    if t.size == 0:
        return 0.0, 0
    D, count, bad = be.target_stats(be.contiguous(t).reshape(1, -1), w, ignore_index, C)
    if bad >= 0:
        raise _bad_target_error(be, t, bad, C, ignore_index)
    return D, count


def index_denominators(target, weight, ignore_index, C, dtype):
    """(D, Dz): the denominators of the mean over class-index targets, after
    ``check_index_target``'s checks: the sum of the non-ignored targets' weights (the
    cross-entropy's) and their count (the z-loss's).  For entry points that split a batch
    (fastce.linear's chunks, fastce.shards) and divide by the whole batch's."""
    D, count = check_index_target(target, weight, ignore_index, C, dtype)
    return D, float(count)


# ---------------------------------------------------------------------------------------------
# The one implementation behind every cross-entropy entry point
# ---------------------------------------------------------------------------------------------
class _Unchecked(Exception):
    """A bad target met with check_targets=False where the host reads the target statistics
    (the CPU): _cross_entropy makes the call again with them ignored, then its nan results."""

    def __init__(self, t, C, axis):
        super().__init__()
        self.t, self.C, self.axis = t, C, axis


def _cross_entropy(input, target, weight, grad_output, *, check_targets=True, **kwargs):
    """Every cross-entropy entry point (keywords: _cross_entropy_checked's).
    ``check_targets=False``: a bad target makes its position's results nan instead of raising
    (see fastce.spec); a backend that defers the target statistics (the GPU) then reads nothing
    back from the device, its kernels making those nan results themselves."""
    check_targets_flag(check_targets)
    try:
        return _cross_entropy_checked(input, target, weight, grad_output,
                                      check_targets=check_targets, **kwargs)
    except _Unchecked as e:
        return _bad_targets_nan(e, kwargs["ignore_index"], kwargs["reduction"],
                                (input, weight, grad_output), kwargs)


def _cross_entropy_checked(input, target, weight, grad_output, *, ignore_index, reduction,
                           label_smoothing, softcap, z_loss, class_axis, want_loss, want_grad,
                           want_stats=False, out=None, denominators=None, want_lse=False,
                           raw=False, check_targets=True, prechecked=None):
    """_cross_entropy's work.  ``denominators`` (fastce.linear's chunks): the mean's (D, Dz) of
    the whole batch, used instead of this call's own.  A bad target raises ValueError, or
    _Unchecked with ``check_targets=False`` on a backend that does not defer its statistics.
    ``prechecked`` (fastce.linear's chunks, whose caller checked the whole batch's targets and
    weights): the weights' sum, and no target statistics (no host copy on the GPU); the mean
    then needs ``denominators``."""
    be = backend_for(input=input, target=target, weight=weight, grad_output=grad_output)
    eps, cap, zl = check_options(reduction, label_smoothing, softcap, z_loss)
    x = _check_logits(be, input)
    ignore_index = check_ignore_index(ignore_index)
    axis = _class_axis(x, class_axis)
    kind, t = _check_target(be, target, x, axis)
    if kind == "prob" and ignore_index >= 0:
        raise ValueError("fastce: ignore_index is not supported with probability targets (as "
                         "in torch, which accepts only a negative one)")
    in_dtype = _loss_dtype(x.dtype)
    loss_shape = tuple(x.shape[:axis]) + tuple(x.shape[axis + 1:])
    g, g_stride = (_check_grad_output(be, grad_output, reduction, loss_shape)
                   if want_grad else (be.ones(1, np.float64), 0))
    o = _check_out(be, out, x) if (want_grad and out is not None) else None
    if x.shape[axis] == 0 or math.prod(loss_shape) == 0:
        loss, grad, stats = _empty_problem(be, x, int(x.shape[axis]), t, kind, weight,
                                           ignore_index, reduction, loss_shape, input,
                                           want_grad, want_stats or want_lse, out, raw,
                                           check_targets)
        if want_lse:        # log of an empty sum (no classes), or no positions
            stats = stats + (be.wrap(be.full(loss_shape, -math.inf, _loss_dtype(x.dtype)), input),)
        return loss, grad, stats
    x3, N, C, S = _canonical(be, x, axis, native_float16=True)
    cdt = _compute_dtype(x3.dtype)
    # Unchecked targets on a deferring backend (the GPU): the target statistics, and the
    # weights' sum that label smoothing needs, stay on the device (see index_loss's den).
    defer = (kind == "index" and not check_targets and be.defers_target_stats
             and denominators is None and not raw)
    w_sum = None
    if prechecked is None:
        w, W = _check_weight(be, weight, C, cdt, need_sum=eps != 0.0 and not defer)
        if defer and eps != 0.0 and W != W:
            w_sum = be.total_device(w)
    else:
        w, W = (be.ones(C, cdt) if weight is None else be.cast(weight, cdt)), prechecked
    # Each position's log-sum-exp, written by the loss kernels in their own pass.
    lse = be.empty((N, S), np.float64) if want_lse else None

    # The forward may validate its targets inside the loss kernel itself (which never reads
    # with a bad one); the gradient needs the mean's denominator first: a pre-pass.
    fuse_stats = kind == "index" and not want_grad and be.fuses_target_stats
    dstats = dev_den = None
    if kind == "index":
        t2 = be.contiguous(t).reshape(N, S)
        D, count = 1.0, 0
        if prechecked is not None and not raw:
            if reduction == "mean" and denominators is None:
                raise ValueError("fastce: prechecked targets take the mean's denominators")
            fuse_stats = False              # (nothing to count: D, count unused)
        elif defer:
            dstats = be.target_stats(t2, w, ignore_index, C, on_device=True)
            dev_den = dstats[0:2]               # (D, Dz), read by the reducing kernel
        elif not fuse_stats:
            D, count, bad = be.target_stats(t2, w, ignore_index, C)
            if bad >= 0:
                if check_targets:
                    raise _bad_target_error(be, t, bad, C, ignore_index)
                raise _Unchecked(t, C, axis)
        Dz = float(count)
    else:
        t2 = be.cast(t, cdt).reshape(N, C, S)
        D = Dz = float(N * S)
        count = N * S
    # (D, Dz): this call's own denominators; (mD, mDz): those the mean divides by.
    mD, mDz = denominators if denominators is not None else (D, Dz)

    mean = reduction == "mean"
    # Gradient coefficients (the forward's kernels ignore them; its D may not be known yet).
    # Deferred, the kernels multiply them by the device's (1/D, 1/Dz) (``den``, which also
    # carries the weights' sum when the device has it).
    den = None
    if defer and ((want_grad and mean) or w_sum is not None):
        den = be.grad_den(dstats, want_grad and mean, w_sum)
    inv_D = (_div(1.0, mD) if mean and not defer else 1.0) if want_grad else 1.0
    z2 = 2.0 * zl * (_div(1.0, mDz) if mean and not defer else 1.0) if want_grad else 0.0
    grad = None
    in_place = False
    if o is not None:
        # Only out that IS the logits (same memory, shape and strides) takes the in-place path;
        # any other overlap with an argument is read through a copy of that argument.
        in_place = be.same_memory(o, x3)
        if in_place and cap:
            in_place = False        # softcap's third pass re-reads the logits: keep a copy
            x3 = be.copy(x3)
        elif not in_place and be.may_share_memory(o, x3):
            x3 = be.copy(x3)
        if be.may_share_memory(o, t2):
            t2 = be.copy(t2)
        if be.may_share_memory(o, w):
            w = be.copy(w)
        if be.may_share_memory(o, g):
            g = be.copy(g)
        grad = be.contiguous(o).reshape(N, C, S)
    elif want_grad:
        grad = be.empty((N, C, S), x3.dtype)
    opts = LossOptions.make(label_smoothing=eps, C=C, weight_sum=W, softcap=cap,
                            grad_scale=inv_D, z_grad=z2, z_loss=zl, in_place=in_place,
                            want_hits=want_stats)
    if kind == "index":
        ce, zls, hit, stats = be.index_loss(x3, t2, w, opts, ignore_index, grad, g, g_stride,
                                            per_position=reduction == "none",
                                            fuse_stats=fuse_stats, lse_out=lse, den=den)
        if fuse_stats:
            D, count, bad = stats
            if bad >= 0:
                if check_targets:
                    raise _bad_target_error(be, t, bad, C, ignore_index)
                raise _Unchecked(t, C, axis)
            Dz = float(count)
            mD, mDz = denominators if denominators is not None else (D, Dz)
    else:
        ce, zls = be.prob_loss(x3, t2, w, opts, grad, g, g_stride, lse_out=lse)
        hit = None

    loss = None
    if want_loss:
        loss = _loss(be, ce, zls if zl else None, hit if want_stats else None, reduction,
                     mD, mDz, loss_shape, in_dtype, raw, dev_den)
        if raw:
            loss = loss + (D, Dz)
    if grad is not None:
        grad = out if out is not None else be.cast(grad.reshape(x.shape), x.dtype)
    stats = None
    if want_stats or want_lse:
        if reduction == "none":
            zpart = be.cast(zls.reshape(loss_shape), in_dtype)
        else:
            # mean_div's nan where Dz == 0 is ieee_div's 0/0 there: every z term is 0.
            zpart = be.reduce_loss(zls, None, mean, mDz, 0.0, in_dtype,
                                   dev_den=None if dev_den is None else dev_den[1:2])
        if hit is not None and defer:       # (token accuracy is a host number: one copy)
            count = int(be.element(dstats, 1))
        acc = _div(be.total(hit), count) if (hit is not None and count) else math.nan
        stats = (be.wrap(zpart, input), acc)
        if want_lse:
            stats = stats + (be.wrap(be.cast(lse.reshape(loss_shape), in_dtype), input),)
    return be.wrap(loss, input), be.wrap(grad, input), stats


_LEAN_LOGITS = (np.dtype(np.float32), np.dtype(np.float64))
_LEAN_TARGETS = (np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.uint8))   # the kernels' bytes
# Per (C, dtype): the unit weights, their float64 copy, the forward's options and their sum
# (all read-only), for the C that the lean path serves most.
_LEAN_CONSTS = {}
_LEAN_CONSTS_MAX = 64
_LEAN_CONSTS_BYTES = 1 << 16
_INT64_MIN, _INT64_MAX = int(_INT64.min), int(_INT64.max)
# Each thread's plans (cpu.LeanPlan, or None for a problem that is not lean), by problem.
_lean_local = threading.local()
_LEAN_PLANS_MAX = 32
_NO_PLAN = object()
# upstream gradients the lean path checks itself (others: the general path's backend checks)
_LEAN_GRAD_OUTPUTS = (float, int, np.ndarray, np.float32, np.float64)


def _no_options(label_smoothing, softcap, z_loss):
    """The defaults, given as plain Python numbers (anything else takes the checked path)."""
    return (softcap is None and type(label_smoothing) in (float, int) and label_smoothing == 0
            and type(z_loss) in (float, int) and z_loss == 0)


def _unit_consts(C, dtype):
    """(unit weights, as float64, LossOptions of the unweighted forward, their sum C)."""
    consts = _LEAN_CONSTS.get((C, dtype))
    if consts is None:
        consts = (np.ones(C, dtype), np.ones(C), LossOptions(weight_sum=float(C)), float(C))
        if len(_LEAN_CONSTS) < _LEAN_CONSTS_MAX and C * dtype.itemsize <= _LEAN_CONSTS_BYTES:
            _LEAN_CONSTS[(C, dtype)] = consts
    return consts


def _lean_plan(input, target, axis, xw, tw):
    """The cpu.LeanPlan of a lean call's problem (float32/float64 logits of two or more axes,
    classes along ``axis``, targets of _LEAN_TARGETS of the matching shape, nothing empty),
    else None."""
    shape = input.shape
    if len(shape) < 2 or target.shape != shape[:axis] + shape[axis + 1:]:
        return None
    N, C, S = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    if (input.dtype not in _LEAN_LOGITS or target.dtype not in _LEAN_TARGETS or N == 0
            or C == 0 or S == 0):
        return None
    consts = _unit_consts(C, input.dtype)
    return cpu_backend().lean_plan((N, C, S), input.dtype, target.dtype, xw, tw,
                                   len(shape) == 2 and axis == 1,
                                   consts if (C, input.dtype) in _LEAN_CONSTS else None)


def _lean_call(input, target, weight, reduction, ignore_index, class_axis, label_smoothing,
               softcap, z_loss, want_grad, grad_output=None, out=None, check_targets=True):
    """The common call (C-contiguous float32/float64 logits of two or more axes, int64, int32
    or uint8 targets, class weights of the logits' dtype or none, any class axis, reduction,
    label smoothing, softcap, z-loss and upstream gradient, and ``out`` that shares no memory
    with the arguments; no extra outputs) in a few microseconds of Python: the checks that can
    fail here are the ones _cross_entropy would make, in the same order, in a cheaper form or
    through the same function, and the kernel calls are the general path's, so results and
    errors are bitwise the same.  The problem's plan (cpu.LeanPlan: its kernels' entry points
    and fixed arguments) is made on its first call in each thread.  (loss, gradient or None);
    None: not this case (the caller takes the general path, which raises for bad arguments)."""
    if not (type(input) is np.ndarray and type(target) is np.ndarray and type(ignore_index) is int
            and (check_targets is True or check_targets is False)
            and (weight is None or type(weight) is np.ndarray)
            and (grad_output is None or type(grad_output) in _LEAN_GRAD_OUTPUTS)):
        return None
    if _no_options(label_smoothing, softcap, z_loss):
        if not (reduction == "mean" or reduction == "sum" or reduction == "none"):
            return None
        eps = cap = zl = 0.0
    else:
        eps, cap, zl = check_options(reduction, label_smoothing, softcap, z_loss)
    xf, tf = input.flags, target.flags
    if not (xf.c_contiguous and tf.c_contiguous and _INT64_MIN <= ignore_index <= _INT64_MAX):
        return None
    if class_axis is None:
        axis = 1
    elif type(class_axis) is int and -input.ndim <= class_axis < input.ndim:
        axis = class_axis % input.ndim
    else:
        return None
    key = (input.shape, target.shape, input.dtype, target.dtype, xf.writeable, tf.writeable,
           axis)
    plans = getattr(_lean_local, "plans", None)
    if plans is None:
        plans = _lean_local.plans = {}
    plan = plans.get(key, _NO_PLAN)
    if plan is _NO_PLAN:
        if len(plans) >= _LEAN_PLANS_MAX:
            plans.clear()
        plan = plans[key] = _lean_plan(input, target, axis, xf.writeable, tf.writeable)
    if plan is None:
        return None
    C = plan.shape3[1]
    dtype = input.dtype
    g, g_stride = None, 0
    if want_grad and grad_output is not None:
        g, g_stride = _check_grad_output(cpu_backend(), grad_output, reduction, target.shape)
        if not (g.flags.c_contiguous and g.flags.writeable):
            g = g.copy()                # (the kernels' argument type: see cpu._writeable)
    if out is not None and not (
            want_grad and type(out) is np.ndarray and out.dtype == dtype
            and out.shape == input.shape and out.flags.c_contiguous and out.flags.writeable
            and not np.may_share_memory(out, input) and not np.may_share_memory(out, target)
            and (weight is None or not np.may_share_memory(out, weight))
            and (g is None or not np.may_share_memory(out, g))):
        return None                     # (the general path checks, copies or works in place)
    w, w64, fwd_opts, W = plan.unit or _unit_consts(C, dtype)
    if weight is not None:
        # (the general path's cast is then a no-op; a read-only array would compile the kernels
        # once more, and a non-finite sum takes the general path's checks)
        if not (weight.dtype == dtype and weight.shape == (C,) and weight.flags.c_contiguous
                and weight.flags.writeable):
            return None
        W = cpu_backend().total(weight)
        if not math.isfinite(W):
            return None
        w, w64 = weight, weight.astype(np.float64)
        fwd_opts = LossOptions(weight_sum=W)
    mean = reduction == "mean"
    per = reduction == "none"
    grad = None
    if want_grad:
        ce, zls, D, count, bad, grad = plan.loss_grad(input, target, w, w64, ignore_index,
                                                      (eps, cap, zl, W), mean, per, g,
                                                      g_stride, out)
    else:
        if eps or cap or zl:
            fwd_opts = LossOptions.make(label_smoothing=eps, C=C, weight_sum=W, softcap=cap,
                                        z_loss=zl)
        ce, zls, D, count, bad = plan.forward(input, target, w, w64, fwd_opts, ignore_index,
                                              per)
    if bad >= 0:
        if check_targets is True:
            raise _bad_target_error(cpu_backend(), target, bad, C, ignore_index)
        return None                     # (the general path makes their results nan)
    if per:         # (as the general path's finish_per_position)
        loss = (ce + zls if zl else ce).reshape(target.shape).astype(dtype, copy=False)
    else:           # (as _loss)
        value = _mean(ce, D) if mean else ce
        if zl:
            value = value + (_div(zls, float(count)) if mean else zls)
        loss = plan.scalar(value)
    if not want_grad:
        return loss, None
    return loss, (out if out is not None else grad.reshape(input.shape))


def _loss(be, ce, zls, hit, reduction, D, Dz, loss_shape, dtype, raw, dev_den=None):
    """The loss from the kernels' per-element (or partial) sums; ``zls`` None without z-loss,
    ``hit`` None unless token hits were asked for."""
    if raw:
        # fastce.dask_backend: a chunk's float64 sums (ce, z-loss, token hits), reduced over
        # the chunks by the caller, which divides by the whole batch's denominators (the
        # caller appends the chunk's own (D, Dz), which add up to them).
        return (be.total(ce), 0.0 if zls is None else be.total(zls),
                0.0 if hit is None else be.total(hit))
    if reduction == "none":
        return be.finish_per_position(ce, zls, loss_shape, dtype)
    return be.reduce_loss(ce, zls, reduction == "mean", D, Dz, dtype, dev_den=dev_den)


def _bad_mask(t, C, ignore_index):
    """The mask of bad targets (neither ignore_index nor in [0, C)) of host targets ``t``."""
    t = np.asarray(t).astype(np.int64)
    return (t != ignore_index) & ((t < 0) | (t >= C))


def _bad_targets_nan(found, ignore_index, reduction, args, kwargs):
    """check_targets=False where the host read the target statistics (the CPU) and ``found``
    (an _Unchecked) a bad target: the call again with the bad targets ignored, then their
    positions' loss terms and gradient rows, and every reduced loss, made nan (fastce.spec's
    definition; the GPU's kernels do the same themselves)."""
    bad = _bad_mask(found.t, found.C, ignore_index)
    fixed = np.where(bad, np.int64(ignore_index), np.asarray(found.t).astype(np.int64))
    loss, grad, stats = _cross_entropy_checked(args[0], fixed, *args[1:], **kwargs)
    if grad is not None:
        np.moveaxis(grad, found.axis, -1)[bad] = np.nan
    if stats is not None:
        stats = (_nan_where(stats[0], bad, reduction),) + tuple(stats[1:])
    return _nan_where(loss, bad, reduction), grad, stats


def _nan_where(loss, bad, reduction):
    """A NumPy loss (array or scalar) with nan at the positions ``bad`` (reduced: nan)."""
    if loss is None:
        return None
    a = np.array(loss)
    a[bad if reduction == "none" else ()] = np.nan
    return a if isinstance(loss, np.ndarray) else a[()]


def _empty_problem(be, x, C, t, kind, weight, ignore_index, reduction, loss_shape, input,
                   want_grad, want_stats, out, raw=False, check_targets=True):
    """No positions, or no classes (then every target must be ignored): torch's answers (mean
    nan, sum 0, empty or zero arrays), with no kernel launched and nothing of size C made.
    ``raw``: the sums and denominators of _cross_entropy's raw result instead (no target
    counts: each is ignored; probability targets count every position).  With no classes and
    ``check_targets=False``, targets that are not ignored make their positions' losses and
    the sum nan."""
    if weight is not None:
        check_weight_meta(be.asarray(weight), C)
    n = math.prod(loss_shape)
    bad = None
    if kind == "index" and n:
        t2 = be.contiguous(t).reshape(1, n)
        _, count, first = be.target_stats(t2, be.ones(1, np.float64), ignore_index, C)
        if first >= 0:
            if check_targets:
                raise _bad_target_error(be, t, first, C, ignore_index)
            bad = _bad_mask(be.to_host(t), C, ignore_index)
    # Probability targets over no classes: each element's loss is an empty sum, 0.
    value = 0.0 if (reduction == "sum" or (kind == "prob" and n)) else math.nan
    if raw and reduction != "none":
        loss = (0.0, 0.0, 0.0) + ((float(n),) * 2 if kind == "prob" else (0.0, 0.0))
    elif reduction == "none":
        loss = be.zeros(loss_shape, _loss_dtype(x.dtype))
    else:
        loss = be.scalar(value, _loss_dtype(x.dtype))
    grad = None
    if want_grad:
        grad = out if out is not None else be.zeros(tuple(x.shape), x.dtype)
    stats = None
    if want_stats:
        zpart = be.zeros(loss_shape, _loss_dtype(x.dtype)) if reduction == "none" else be.scalar(
            0.0 if reduction == "sum" else math.nan, _loss_dtype(x.dtype))
        stats = (be.wrap(zpart, input), math.nan)
    if bad is not None and not raw:     # (no classes, unchecked targets that are not ignored)
        nan = be.scalar(math.nan, _loss_dtype(x.dtype))
        if reduction == "none":
            nan = be.asarray(np.where(bad.reshape(loss_shape), np.nan, 0.0).astype(
                _loss_dtype(x.dtype)))
        loss = nan
        if stats is not None:
            stats = (be.wrap(nan, input), math.nan)
    return be.wrap(loss, input), be.wrap(grad, input), stats


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, softcap=None, z_loss=0.0, class_axis=None,
                  return_z_loss=False, return_token_accuracy=False, return_lse=False,
                  check_targets=True):
    """Cross-entropy between logits ``input`` and ``target``, as torch's ``F.cross_entropy``.

    input: logits (C,), (N, C) or (N, C, d1, ..., dK); float16/32/64 (float16 computed in
        float32).  ``class_axis`` (fastce only; default None: torch's axis 1, or 0 for 1-D input)
        names the class axis, so that (B, T, V) logits need no transposed copy:
        ``class_axis=-1``.
    target: class indices of any integer dtype with the input's shape minus the class axis, or
        class probabilities (float, the input's shape).
    weight: (C,) class weights.  With ``reduction="mean"`` the sum of per-element losses is
        divided by the sum of the targets' weights, not by their count (torch's rule).
    ignore_index: targets equal to it contribute nothing (any integer, even a valid class).
    label_smoothing: eps in [0, 1]; softcap: Gemma-2 logit softcapping; z_loss: PaLM's
        ``z_loss * logsumexp**2`` per non-ignored element (its mean divides by their count).
    return_z_loss / return_token_accuracy: return a ``CrossEntropyOutput`` with those extras,
        computed in the same pass.  return_lse: its ``lse`` field holds the per-position
        log-sum-exp (of the softcapped logits with softcap), from the same pass too.
    check_targets: a target that is neither ignore_index nor in [0, C) raises ValueError.
        False: no error; such a position's loss (and gradient row) is nan, so is a reduced
        loss, and on the GPU the call reads nothing back from the device (no wait for the
        check; see the README's "GPU").  Never an out-of-bounds read either way.

    Returns a NumPy scalar (CuPy 0-d array on the GPU) of the input's dtype for mean/sum, an
    array of the target's shape for "none".
    """
    if not (return_z_loss or return_token_accuracy or return_lse):
        lean = _lean_call(input, target, weight, reduction, ignore_index, class_axis,
                          label_smoothing, softcap, z_loss, False, check_targets=check_targets)
        if lean is not None:
            return lean[0]
    if is_dask_array(input) or is_dask_array(target):
        _dask_checks(check_targets)
        from . import dask_backend
        return dask_backend.cross_entropy(
            input, target, weight, None, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
            class_axis=class_axis, want_loss=True, want_grad=False, return_z_loss=return_z_loss,
            return_token_accuracy=return_token_accuracy, return_lse=return_lse)
    want_stats = return_z_loss or return_token_accuracy
    loss, _, stats = _cross_entropy(
        input, target, weight, None, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss, class_axis=class_axis,
        want_loss=True, want_grad=False, want_stats=want_stats, want_lse=return_lse,
        check_targets=check_targets)
    if not (want_stats or return_lse):
        return loss
    return _output(loss, stats, return_z_loss, return_token_accuracy, return_lse)


def cross_entropy_backward(input, target, grad_output=None, weight=None, *, ignore_index=-100,
                           reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0,
                           class_axis=None, out=None, check_targets=True):
    """d loss / d input, the input's shape and dtype.  ``grad_output`` is the upstream gradient:
    a scalar for mean/sum, an array of the loss's shape for "none"; None means ones.
    ``out``: a C-contiguous array of the input's shape and dtype to write the gradient into; it
    may be ``input`` itself (the logits are overwritten by their gradient, saving memory).  For
    Dask logits (lazy results, see fastce.dask_backend) ``out`` is a NumPy array or memmap
    that the chunk tasks write into (local schedulers only; not the logits' own memory)."""
    lean = _lean_call(input, target, weight, reduction, ignore_index, class_axis,
                      label_smoothing, softcap, z_loss, True, grad_output, out, check_targets)
    if lean is not None:
        return lean[1]
    if is_dask_array(input) or is_dask_array(target):
        _dask_checks(check_targets)
        from . import dask_backend
        return dask_backend.cross_entropy(
            input, target, weight, grad_output, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
            class_axis=class_axis, want_loss=False, want_grad=True, out=out)
    _, grad, _ = _cross_entropy(
        input, target, weight, grad_output, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss, class_axis=class_axis,
        want_loss=False, want_grad=True, out=out, check_targets=check_targets)
    return grad


def cross_entropy_with_grad(input, target, weight=None, *, grad_output=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0,
                            class_axis=None, return_z_loss=False, return_token_accuracy=False,
                            out=None, return_lse=False, check_targets=True):
    """(loss, grad) from one fused pass over the logits; allocates only the gradient (nothing
    with ``out``, which may be ``input`` itself: see cross_entropy_backward).

    With return_z_loss / return_token_accuracy / return_lse the first item is a
    ``CrossEntropyOutput``.
    """
    if not (return_z_loss or return_token_accuracy or return_lse):
        lean = _lean_call(input, target, weight, reduction, ignore_index, class_axis,
                          label_smoothing, softcap, z_loss, True, grad_output, out,
                          check_targets)
        if lean is not None:
            return lean
    if is_dask_array(input) or is_dask_array(target):
        _dask_checks(check_targets)
        from . import dask_backend
        return dask_backend.cross_entropy(
            input, target, weight, grad_output, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
            class_axis=class_axis, want_loss=True, want_grad=True, out=out,
            return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
            return_lse=return_lse)
    want_stats = return_z_loss or return_token_accuracy
    loss, grad, stats = _cross_entropy(
        input, target, weight, grad_output, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss, class_axis=class_axis,
        want_loss=True, want_grad=True, want_stats=want_stats, out=out, want_lse=return_lse,
        check_targets=check_targets)
    if want_stats or return_lse:
        loss = _output(loss, stats, return_z_loss, return_token_accuracy, return_lse)
    return loss, grad


def _dask_checks(check_targets):
    if check_targets is not True:
        raise NotImplementedError("fastce: check_targets=False is for in-memory (NumPy, CUDA) "
                                  "arrays; a Dask graph checks its targets")


def _output(loss, stats, return_z_loss, return_token_accuracy, return_lse):
    return CrossEntropyOutput(loss, stats[0] if return_z_loss else None,
                              stats[1] if return_token_accuracy else None,
                              stats[2] if return_lse else None)


class CrossEntropyLoss:
    """A callable like ``torch.nn.CrossEntropyLoss``: ``loss_fn(input, target)``,
    ``loss_fn.backward(input, target, grad_output=None)`` and ``loss_fn.with_grad(...)``."""

    def __init__(self, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 softcap=None, z_loss=0.0, class_axis=None, check_targets=True):
        check_options(reduction, label_smoothing, softcap, z_loss)
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.softcap = softcap
        self.z_loss = z_loss
        self.class_axis = class_axis
        self.check_targets = check_targets

    def _options(self):
        return dict(ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing, softcap=self.softcap,
                    z_loss=self.z_loss, class_axis=self.class_axis,
                    check_targets=self.check_targets)

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
             class_axis=None, check_targets=True):
    """Negative log-likelihood of ``target`` under ``log_probs`` (torch's ``F.nll_loss``):
    ``l_i = -w[y_i] * log_probs[i, y_i]``, the mean dividing by the sum of the targets' weights.
    ``check_targets=False``: a bad target's loss is nan instead of an error (as in
    cross_entropy; on the GPU nothing is read back)."""
    check_targets_flag(check_targets)
    be = backend_for(input=log_probs, target=target, weight=weight)
    check_options(reduction, 0.0, None, 0.0)
    x = _check_logits(be, log_probs, "log_probs")
    ignore_index = check_ignore_index(ignore_index)
    axis = _class_axis(x, class_axis)
    kind, t = _check_target(be, target, x, axis)
    if kind != "index":
        raise TypeError("fastce: nll_loss takes class-index (integer) targets")
    x3, N, C, S = _canonical(be, x, axis)
    w, _ = _check_weight(be, weight, C, np.float64, need_sum=False)
    t2 = be.contiguous(t).reshape(N, S)
    # Unchecked on a deferring backend (the GPU): D stays there, the kernel makes bad targets'
    # losses nan.  Elsewhere the host finds them: computed as ignored, then made nan.
    defer = not check_targets and be.defers_target_stats and C > 0 and N * S > 0
    bad_mask = dstats = None
    D = 0.0
    if defer:
        dstats = be.target_stats(t2, w, ignore_index, C, on_device=True)
    else:
        D, _, bad = be.target_stats(t2, w, ignore_index, C)
        if bad >= 0:
            if check_targets:
                raise _bad_target_error(be, t, bad, C, ignore_index)
            bad_mask = _bad_mask(be.to_host(t), C, ignore_index).reshape(N, S)
            t2 = be.asarray(np.where(bad_mask, np.int64(ignore_index),
                                     np.asarray(be.to_host(t2)).astype(np.int64)))
    if C == 0 or N * S == 0:        # every target ignored (checked above): torch's nan mean
        per = be.zeros((N, S), np.float64)
    else:
        per = be.nll_loss(x3, t2, w, ignore_index)
    if bad_mask is not None:
        per = be.asarray(np.where(bad_mask, np.nan, np.asarray(be.to_host(per))))
    loss_shape = tuple(x.shape[:axis]) + tuple(x.shape[axis + 1:])
    if reduction == "none":
        return be.wrap(be.finish_per_position(per, None, loss_shape, _loss_dtype(x.dtype)), log_probs)
    mean = reduction == "mean"
    if defer:                       # (the device's D, divided as _div below)
        value = be.reduce_loss(per, None, mean, 0.0, 0.0, _loss_dtype(x.dtype),
                               dev_den=dstats[0:1], ieee=True)
    elif mean and D == 0.0:         # torch's total / 0: nan, or +-inf where weights cancel
        value = be.scalar(_div(be.total(per), D), _loss_dtype(x.dtype))
    else:
        value = be.reduce_loss(per, None, mean, D, 0.0, _loss_dtype(x.dtype))
    return be.wrap(value, log_probs)
