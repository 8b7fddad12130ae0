"""Fused linear cross-entropy: ``cross_entropy(hidden @ classifier.T + bias, target)`` and its
gradients without ever materialising the (N, V) logits.

The rows are processed in chunks.  Per chunk, the logits ``hidden[s:e] @ classifier.T (+ bias)``
are written by the platform BLAS (NumPy ``@``, or cuBLAS through CuPy for CUDA arrays) into one
preallocated (rows, V) buffer; fastce's own kernels (``fastce.cross_entropy_with_grad`` on the
chunk, ``reduction="sum"``) give the chunk's loss and logit gradient; then

    grad_hidden[s:e]  = grad_logits @ classifier
    grad_classifier  += grad_logits.T @ hidden[s:e]     (first chunk written in place; later
    grad_bias        += grad_logits.sum(0)                ones in V-blocks via a (V/8, H) temp)

The chunk's gradient is written over its (spent) logits: ``cross_entropy_with_grad(...,
out=logits)``, so the buffer is the only chunk-sized allocation.

``reduction="mean"`` divides by GLOBAL denominators (the sum of target weights over all
non-ignored rows for the cross-entropy part, their count for the z-loss part), computed from the
targets before the first chunk by the same checks as ``fastce.cross_entropy``; each chunk runs
the API's own implementation with those denominators in place of its own, so the chunks' losses
and gradients add up to the whole batch's (negative or zero weight sums included).

Memory beyond the outputs: the (rows, V) buffer (automatic: ~1/12 of N x V, 1 to 64 MiB) and
the (V/8, H) temporary: under 0.1 x the logits at N=4096, H=256, V=32000 float32, against
~1.9 x for the unfused path (logits + their gradient).
"""
from __future__ import annotations

import math
import operator
import time

import numpy as np

from . import api
from .api import cross_entropy_with_grad
from .dispatch import backend_for, cpu_backend, is_dask_array

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad", "bench_linear"]

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))

_MIB = 1 << 20
AUTO_FRACTION = 12          # the chunk buffer is ~1/12 of N x V ...
AUTO_MAX_BYTES = 64 * _MIB  # ... but at most this ...
AUTO_MIN_BYTES = 1 * _MIB   # ... and at least this (small problems: one chunk)
V_BLOCKS = 8                # V-blocks of the grad_classifier update (temporary: V/8 x H)


# ---------------------------------------------------------------------------------------------
# Array module (NumPy on the host, CuPy for CUDA arrays) and argument checking
# ---------------------------------------------------------------------------------------------
def _array_module(named):
    """NumPy, or CuPy (cuBLAS for the matmuls) for CUDA arrays; the arguments must all be on
    one device (fastce.dispatch's check, as every entry point)."""
    if backend_for(**named) is cpu_backend():
        return np
    try:
        import cupy
    except ImportError:
        raise TypeError("fastce: linear_cross_entropy got CUDA device arrays but CuPy is not "
                        "installed; the fused linear cross-entropy needs CuPy (cuBLAS) for its "
                        "matmuls on the GPU (pip install cupy-cuda12x)") from None
    return cupy


def _check_float(xp, a, name):
    a = xp.asarray(a)
    if a.dtype not in _FLOATS:
        raise TypeError(f"fastce: {name} must be float16, float32 or float64, got dtype {a.dtype}")
    return a


def chunk_rows(N, V, itemsize, chunk_size=None):
    """Rows per chunk: ``chunk_size`` validated, or the automatic choice (see module doc)."""
    if chunk_size is None:
        budget = N * V * itemsize // AUTO_FRACTION
        budget = min(max(budget, AUTO_MIN_BYTES), AUTO_MAX_BYTES)
        rows = budget // max(1, V * itemsize)
        return int(max(1, min(rows, N)))
    if isinstance(chunk_size, (bool, np.bool_)):
        raise TypeError(f"fastce: chunk_size must be None or a positive int, got {chunk_size!r}")
    try:
        rows = operator.index(chunk_size)
    except TypeError:
        raise TypeError(f"fastce: chunk_size must be None or a positive int, got "
                        f"{chunk_size!r}") from None
    if rows < 1:
        raise ValueError(f"fastce: chunk_size must be >= 1 (rows per chunk), got {chunk_size!r}")
    return int(max(1, min(rows, N)))


def _prepare(xp, hidden, classifier, target, bias, weight, ignore_index):
    h = _check_float(xp, hidden, "hidden")
    c = _check_float(xp, classifier, "classifier")
    if h.ndim != 2:
        raise ValueError(f"fastce: hidden must be 2-D (N, H), got shape {tuple(h.shape)}")
    if c.ndim != 2:
        raise ValueError(f"fastce: classifier must be 2-D (V, H) like torch.nn.Linear.weight, "
                         f"got shape {tuple(c.shape)}")
    N, H = h.shape
    V = c.shape[0]
    if c.shape[1] != H:
        raise ValueError(f"fastce: classifier must have shape (V, H={H}) for hidden of shape "
                         f"{tuple(h.shape)}, got {tuple(c.shape)}")
    if V == 0:
        raise ValueError("fastce: classifier has no classes (V = 0 rows)")
    if c.dtype != h.dtype:
        raise TypeError(f"fastce: classifier dtype {c.dtype} differs from hidden dtype {h.dtype}")
    b = None
    if bias is not None:
        b = _check_float(xp, bias, "bias")
        if b.ndim != 1 or b.shape[0] != V:
            raise ValueError(f"fastce: bias must have shape (V,) = ({V},), got {tuple(b.shape)}")
        if b.dtype != h.dtype:
            raise TypeError(f"fastce: bias dtype {b.dtype} differs from hidden dtype {h.dtype}")
    t = xp.asarray(target)
    if t.dtype.kind == "f":
        raise TypeError("fastce: target must hold integer class indices, got a float array "
                        "(probability targets are not supported by linear_cross_entropy)")
    if tuple(t.shape) != (N,):
        raise ValueError(f"fastce: target must have shape (N,) = ({N},) for hidden of shape "
                         f"{tuple(h.shape)}, got {tuple(t.shape)}")
    cdt = np.dtype(np.float32) if h.dtype == np.float16 else h.dtype   # float16 -> float32
    # Targets and weights: the checks of every entry point, and the whole batch's denominators
    # (each chunk's own checks then find nothing new).
    D, Dz = api.index_denominators(t, weight, ignore_index, V, cdt)
    ignore_index = api.check_ignore_index(ignore_index)
    # The weights cast once, not per chunk (check_index_target rejected overflowing ones).
    w = None if weight is None else xp.ascontiguousarray(xp.asarray(weight).astype(cdt))
    if cdt != h.dtype:
        h, c = h.astype(cdt), c.astype(cdt)
        b = None if b is None else b.astype(cdt)
    return h, c, b, t, w, ignore_index, D, Dz


# ---------------------------------------------------------------------------------------------
# grad_classifier += grad_logits.T @ hidden_chunk
# ---------------------------------------------------------------------------------------------
class _ClassifierGrad:
    """The first chunk's product is written straight into the output; later ones are added in
    V-blocks through a (V / 8, H) temporary: each gemm still has a large shape (V/8, H, rows).
    (SciPy's in-place gemm, beta=1, was tried: its separate OpenBLAS thread pool made every BLAS
    call ~2x slower on a 2-core machine.)"""

    def __init__(self, xp, V, H, dtype):
        self.xp = xp
        self.out = xp.zeros((V, H), dtype)
        self.first = True
        self.vb = max(1, -(-V // V_BLOCKS))
        self.tmp = None

    def add(self, g, hc):
        xp, out = self.xp, self.out
        if self.first:
            xp.matmul(g.T, hc, out=out)
            self.first = False
            return
        if self.tmp is None:
            self.tmp = xp.empty((self.vb, out.shape[1]), out.dtype)
        V = out.shape[0]
        for v in range(0, V, self.vb):
            u = min(v + self.vb, V)
            tmp = self.tmp[: u - v]
            xp.matmul(g[:, v:u].T, hc, out=tmp)
            out[v:u] += tmp


# ---------------------------------------------------------------------------------------------
# The implementation behind both public functions
# ---------------------------------------------------------------------------------------------
def _linear_ce(hidden, classifier, target, bias, weight, grad_output, *, ignore_index,
               reduction, label_smoothing, softcap, z_loss, chunk_size, want_grad,
               denominators=None, raw=False):
    """denominators / raw (fastce.dask_backend's row chunks): the whole batch's (D, Dz) for the
    mean, and the loss of mean/sum as the chunk's float64 sum (no division, no cast)."""
    if is_dask_array(hidden) or is_dask_array(target):
        from . import dask_backend
        return dask_backend.linear_cross_entropy(
            hidden, classifier, target, bias, weight, grad_output, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
            z_loss=z_loss, chunk_size=chunk_size, want_grad=want_grad)
    eps, cap, zl = api.check_options(reduction, label_smoothing, softcap, z_loss)
    xp = _array_module(dict(hidden=hidden, classifier=classifier, target=target, bias=bias,
                            weight=weight, grad_output=grad_output if want_grad else None))
    in_dtype = xp.asarray(hidden).dtype
    h, c, b, t, w, ignore_index, D, Dz = _prepare(xp, hidden, classifier, target, bias,
                                                     weight, ignore_index)
    cdt = h.dtype
    N, H = h.shape
    V = c.shape[0]
    rows = chunk_rows(N, V, cdt.itemsize, chunk_size)

    # Per-chunk options: a mean divides by the whole batch's denominators, so the chunks add up;
    # the targets and weights were checked above (_prepare), so the chunks count nothing again
    # (on the GPU: no host copy per chunk), given the weights' sum where smoothing needs it.
    W = api._check_weight(backend_for(weight=w), w, V, cdt, need_sum=eps != 0.0)[1]
    opts = dict(ignore_index=ignore_index, label_smoothing=eps, softcap=softcap, z_loss=zl,
                class_axis=1, reduction=reduction, prechecked=W)
    g_rows = None
    g = None
    if reduction == "none":
        if want_grad and grad_output is not None:
            g_rows = xp.asarray(grad_output)
            if tuple(g_rows.shape) != (N,):
                raise ValueError(f"fastce: with reduction='none', grad_output must have the "
                                 f"loss's shape ({N},), got {tuple(g_rows.shape)}")
    else:
        if want_grad and grad_output is not None:
            if isinstance(grad_output, (str, bytes)):
                raise TypeError(f"fastce: grad_output must be a real number or array, got "
                                f"{grad_output!r}")
            if not np.isscalar(grad_output):
                ga = xp.asarray(grad_output)
                if ga.size != 1 or ga.ndim > 1:
                    raise ValueError(f"fastce: with reduction={reduction!r}, grad_output must be "
                                     f"a scalar, got shape {tuple(ga.shape)}")
                grad_output = ga.reshape(())
            g = float(grad_output)
        if reduction == "mean":
            opts.update(denominators=(D, Dz) if denominators is None
                        else tuple(map(float, denominators)))

    buf = xp.empty((rows, V), cdt) if N else None
    per_row = xp.empty(N, cdt) if reduction == "none" else None
    total = math.nan if (N == 0 and reduction == "mean") else 0.0     # torch's empty mean
    raw_sums = [0.0, 0.0]         # raw: the float64 sums of the cross-entropy and z-loss terms
    gh = gc = gb = None
    if want_grad:
        gh = xp.empty((N, H), cdt)
        gc = _ClassifierGrad(xp, V, H, cdt)
        gb = xp.zeros(V, cdt) if b is not None else None
    ct = c.T
    for s in range(0, N, rows):
        e = min(s + rows, N)
        logits = buf[: e - s]
        hc = h[s:e]
        xp.matmul(hc, ct, out=logits)
        if b is not None:
            logits += b
        go = g_rows[s:e] if g_rows is not None else g
        # with a gradient, it replaces the spent logits, in place
        loss, _, _ = api._cross_entropy(logits, t[s:e], w, go if want_grad else None,
                                        want_loss=True, want_grad=want_grad,
                                        out=logits if want_grad else None,
                                        raw=raw and per_row is None, **opts)
        if per_row is not None:
            per_row[s:e] = loss
        elif raw:
            raw_sums[0] += loss[0]
            raw_sums[1] += loss[1]
        else:
            total = total + xp.asarray(loss, dtype=np.float64)
        if want_grad:                          # logits now holds d loss / d logits
            xp.matmul(logits, c, out=gh[s:e])
            gc.add(logits, hc)
            if gb is not None:
                gb += logits.sum(axis=0)

    # Results in the input's dtype.
    if per_row is not None:
        out_loss = per_row.astype(in_dtype, copy=False)
    elif raw:
        out_loss = tuple(raw_sums)
    else:
        out_loss = xp.asarray(total, dtype=np.float64).astype(in_dtype)
        if xp is np:
            out_loss = out_loss[()]
    if not want_grad:
        return out_loss
    grads = [gh, gc.out, gb]
    grads = [None if a is None else a.astype(in_dtype, copy=False) for a in grads]
    return (out_loss, *grads)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def linear_cross_entropy(hidden, classifier, target, bias=None, *, weight=None, ignore_index=-100,
                         reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0,
                         chunk_size=None):
    """``cross_entropy(hidden @ classifier.T + bias, target, weight, ...)`` without the (N, V)
    logits.

    hidden: (N, H) float16/32/64 (float16 computed in float32); classifier: (V, H), as
    ``torch.nn.Linear.weight``; bias: (V,) or None; target: (N,) integer class indices;
    weight: (V,) class weights.  ignore_index, reduction, label_smoothing, softcap and z_loss
    are those of ``fastce.cross_entropy`` (the mean divides by the sum of the non-ignored
    targets' weights; the z-loss mean by their count).  chunk_size: rows per chunk, or None for
    a buffer of ~1/12 of N x V (1 to 64 MiB).  NumPy arrays run on the CPU (BLAS + fastce
    kernels), CuPy arrays on the GPU (cuBLAS + fastce's GPU kernels).

    Returns the loss in hidden's dtype: a scalar for mean/sum, an (N,) array for "none".
    """
    return _linear_ce(hidden, classifier, target, bias, weight, None, ignore_index=ignore_index,
                      reduction=reduction, label_smoothing=label_smoothing, softcap=softcap,
                      z_loss=z_loss, chunk_size=chunk_size, want_grad=False)


def linear_cross_entropy_with_grad(hidden, classifier, target, bias=None, *, weight=None,
                                   grad_output=None, ignore_index=-100, reduction="mean",
                                   label_smoothing=0.0, softcap=None, z_loss=0.0,
                                   chunk_size=None):
    """(loss, grad_hidden, grad_classifier, grad_bias or None) of ``linear_cross_entropy``.

    grad_output is the upstream gradient of the loss: a scalar for mean/sum, an (N,) array for
    "none"; None means ones.  Gradients have their argument's shape and hidden's dtype.
    """
    return _linear_ce(hidden, classifier, target, bias, weight, grad_output,
                      ignore_index=ignore_index, reduction=reduction,
                      label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
                      chunk_size=chunk_size, want_grad=True)


# ---------------------------------------------------------------------------------------------
# Benchmark helpers (asv_bench/benchmarks/bench_linear.py and ``python -m fastce bench``)
# ---------------------------------------------------------------------------------------------
def make_problem(N=4096, H=256, V=32000, dtype=np.float32, seed=0):
    """Random (hidden, classifier, target) of a language-model head's sizes."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((N, H), dtype=np.float32).astype(dtype)
    classifier = (rng.standard_normal((V, H), dtype=np.float32) / np.sqrt(H)).astype(dtype)
    target = rng.integers(0, V, N).astype(np.int64)
    return hidden, classifier, target


def unfused_with_grad(hidden, classifier, target, bias=None, **kw):
    """The reference path: full (N, V) logits, fastce.cross_entropy_with_grad, two matmuls."""
    logits = hidden @ classifier.T
    if bias is not None:
        logits += bias
    loss, gl = cross_entropy_with_grad(logits, target, **kw)
    del logits
    gh = gl @ classifier
    gc = gl.T @ hidden
    gb = gl.sum(axis=0) if bias is not None else None
    return loss, gh, gc, gb


def bench_linear(quick=False, N=None, H=256, V=32000, repeat=None):
    """Fused vs unfused linear cross-entropy with gradients (float32, CPU).

    Returns rows ``(name, median_ms, peak_extra_MB)``: the median wall time of ``repeat`` runs
    (after a warm-up) and tracemalloc's peak of NumPy allocations beyond the outputs (those
    of the warm-up call: the same for both paths).  quick:
    N=1024 and 3 runs instead of N=4096 and 7.
    """
    N = N if N is not None else (1024 if quick else 4096)
    repeat = repeat if repeat is not None else (3 if quick else 7)
    hidden, classifier, target = make_problem(N, H, V)
    from .bench import peak_extra_memory
    fns = [("linear_ce fused", linear_cross_entropy_with_grad),
           ("linear_ce unfused", unfused_with_grad)]
    for _, fn in fns:                       # warm-up: JIT compilation, BLAS threads
        out = fn(hidden, classifier, target)
    out_bytes = sum(getattr(a, "nbytes", 0) for a in out if a is not None)
    times = {name: [] for name, _ in fns}
    for _ in range(repeat):                 # interleaved, so noise hits both alike
        for name, fn in fns:
            t0 = time.perf_counter()
            fn(hidden, classifier, target)
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, fn in fns:
        peak, _ = peak_extra_memory(lambda: fn(hidden, classifier, target), 1)
        rows.append((name, float(np.median(times[name])) * 1e3, (peak - out_bytes) / 1e6))
    return rows
