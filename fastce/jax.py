"""fastce inside JAX (CPU): differentiable ``cross_entropy`` and ``linear_cross_entropy`` for
JAX arrays, usable under ``jit``, ``grad``, ``value_and_grad`` and ``vmap``.

``import fastce`` never imports JAX; ``import fastce.jax`` does (JAX is optional).

Each function is a ``jax.custom_vjp`` whose rules call fastce's Numba CPU kernels from a host
callback.  Where JAX has ``jax.experimental.buffer_callback`` (``ZERO_COPY``), the callback
reads XLA's input buffers and writes XLA's result buffers in place: no copy either way.
Otherwise it is a ``jax.pure_callback``, which copies the inputs to host arrays and the
results back (at W1 that was most of the time: 1.4 s against 0.28 s for the kernels).

- Under differentiation the forward rule computes loss AND gradient in one fused pass
  (``fastce.cross_entropy_with_grad``) straight into XLA's gradient buffer, advised onto
  transparent huge pages first (its first-touch page faults cost more than the kernel), and
  keeps it as the residual.  The backward rule scales that buffer in place by the cotangent
  (aliased input -> output; nothing at all when the cotangent is 1, the usual
  ``value_and_grad`` case), or by the per-position cotangent (``reduction="none"``).  Without differentiation only the loss is computed.  For ``linear_cross_entropy``
  with ``reduction="none"`` the backward recomputes the chunked logits with the per-row
  cotangent instead (it cannot be applied to finished gradients).
- ``vmap_method="sequential"``: under ``vmap`` the callback runs once per batch element (a
  ``lax.map``).  The other methods hand the callback a batched array and ask it to be
  vectorised over the new leading axis; fastce's reductions ("mean" divides by the batch
  element's own weight sum) are per call, so a batched callback would have to loop anyway, and
  each element is already a large, internally parallel fastce call.  Sequential is exact and
  costs one Python callback per element (microseconds).
- float16 is computed in float32 (by fastce), bfloat16 natively (``pure_callback``: in
  float32); losses and gradients come back in the logits' dtype.  Labels get no gradient
  (None cotangent), nor do class weights.  CPU only: JAX arrays on other devices are copied
  to the host by XLA.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import fastce as _fastce
from fastce import _alloc
from fastce import cpu as _cpu
from fastce.linear import linear_cross_entropy as _np_linear_ce
from fastce.linear import linear_cross_entropy_with_grad as _np_linear_ce_with_grad

try:
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:                 # older JAX: pure_callback, which copies
    _buffer_callback = None

__all__ = ["cross_entropy", "linear_cross_entropy", "VMAP_METHOD", "ZERO_COPY"]

VMAP_METHOD = "sequential"
ZERO_COPY = _buffer_callback is not None
_REDUCTIONS = ("none", "mean", "sum")


def _host(a):
    """A callback argument as a NumPy array fastce accepts (bfloat16 -> float32 unless
    zero-copy, where fastce reads bfloat16 itself)."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype.name == "bfloat16" and not ZERO_COPY:
        a = a.astype(np.float32)
    return a


def _host_call(fill, results, *args):
    """``fill(outs, *host_args)`` on the host: ``outs`` are writable NumPy arrays shaped like
    ``results`` (a ShapeDtypeStruct or a tuple of them) that fill must write completely.

    Zero-copy: outs are views of XLA's own result buffers and the args of its inputs.
    Otherwise fresh arrays that XLA copies back, from copied inputs."""
    if ZERO_COPY:
        def cb(ctx, outs, *a):
            fill(jax.tree_util.tree_map(np.asarray, outs), *map(_host, a))
        return _buffer_callback(cb, results, vmap_method=VMAP_METHOD)(*args)

    def cb(*a):
        outs = jax.tree_util.tree_map(lambda s: np.empty(s.shape, s.dtype), results)
        fill(outs, *map(_host, a))
        return outs
    return jax.pure_callback(cb, results, *args, vmap_method=VMAP_METHOD)


def _f32(a):
    """bfloat16 -> float32 for the linear path (its matrix products are NumPy's)."""
    return a if a is None or a.dtype.name != "bfloat16" else a.astype(np.float32)


def _loss_shape(shape, axis, reduction):
    if reduction != "none" or len(shape) <= 1:
        return ()
    axis = axis % len(shape)
    return tuple(shape[:axis]) + tuple(shape[axis + 1:])


def _axis(ndim, class_axis):
    return 0 if ndim <= 1 else class_axis % ndim


# ---------------------------------------------------------------------------------------------
# cross_entropy
# ---------------------------------------------------------------------------------------------
def _ce_kwargs(opts):
    ignore_index, reduction, label_smoothing, softcap, z_loss, class_axis, check_targets = opts
    return dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                softcap=softcap, z_loss=z_loss, class_axis=class_axis,
                check_targets=check_targets)


def _ce_loss_fill(opts):
    def fill(loss_out, x, t, w):
        loss_out[...] = _fastce.cross_entropy(x, t, w, **_ce_kwargs(opts))
    return fill


def _ce_grad_fill(opts):
    def fill(outs, x, t, w):
        loss_out, grad_out = outs
        direct = grad_out.dtype == x.dtype and x.dtype != np.float16   # fastce writes it
        if direct:
            _alloc.advise_huge(grad_out)
        loss, grad = _fastce.cross_entropy_with_grad(x, t, w, out=grad_out if direct else None,
                                                     **_ce_kwargs(opts))
        loss_out[...] = loss
        if not direct:
            grad_out[...] = grad
    return fill


def _scale_in_place(out, g, axis=None):
    """out *= g on fastce's threads (NumPy's multiply releases the GIL): g a scalar (nothing to
    do when it is 1), or per position (``reduction="none"``) broadcast along the class axis."""
    if axis is None:
        g = float(g)
        if g == 1.0:
            return
        gv = np.asarray(g, out.dtype)
    else:
        gv = np.expand_dims(np.asarray(g, out.dtype), axis)
    n = _cpu.n_parts(out.size) if out.shape[0] > 1 else 1
    _cpu.in_parts(_scale_part, n, out, gv)


def _scale_part(out, gv, part, nparts):
    a, b = _cpu.task_range(out.shape[0], part, nparts)
    np.multiply(out[a:b], gv[a:b] if gv.ndim and gv.shape[0] > 1 else gv, out=out[a:b])


def _loss_struct(logits, opts):
    shape = _loss_shape(logits.shape, opts[5], opts[1])
    return jax.ShapeDtypeStruct(shape, logits.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ce(logits, labels, weight, opts):
    return _host_call(_ce_loss_fill(opts), _loss_struct(logits, opts), logits, labels, weight)


def _ce_fwd(logits, labels, weight, opts):
    loss, grad = _host_call(
        _ce_grad_fill(opts),
        (_loss_struct(logits, opts), jax.ShapeDtypeStruct(logits.shape, logits.dtype)),
        logits, labels, weight)
    return loss, grad


def _ce_bwd(opts, grad, g):
    reduction, class_axis = opts[1], opts[5]
    axis = _axis(grad.ndim, class_axis) if reduction == "none" and grad.ndim > 1 else None
    if ZERO_COPY:
        scaled = _buffer_callback(
            lambda ctx, out, grad, g: _scale_in_place(np.asarray(out), np.asarray(g), axis),
            jax.ShapeDtypeStruct(grad.shape, grad.dtype), vmap_method=VMAP_METHOD,
            input_output_aliases={0: 0})(grad, g)
        return (scaled, None, None)
    if axis is not None:
        g = jnp.expand_dims(g, axis)
    return (grad * g.astype(grad.dtype), None, None)


_ce.defvjp(_ce_fwd, _ce_bwd)


def _check(reduction, logits):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fastce: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    dt = jnp.dtype(logits.dtype)
    if dt not in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64):
        raise TypeError(f"fastce.jax: logits must be float16, bfloat16, float32 or float64, got "
                        f"{dt}")


def cross_entropy(logits, labels, weight=None, *, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, softcap=None, z_loss=0.0, class_axis=-1,
                  check_targets=True):
    """PyTorch-semantics cross-entropy of JAX ``logits``, differentiable in ``logits``.

    logits: (..., C) by default (``class_axis=-1``, optax's layout; ``class_axis=1`` gives
    torch's (N, C, d1, ...) layout).  labels: integer class indices with the logits' shape
    minus the class axis (``optax.softmax_cross_entropy_with_integer_labels``), or float
    probabilities with the logits' shape (``optax.softmax_cross_entropy``).  weight: (C,)
    class weights; the weighted mean divides by the targets' weight sum (torch's rule).
    ignore_index, reduction ("mean", "sum", "none"), label_smoothing, softcap, z_loss: as in
    ``fastce.cross_entropy``.  Note optax returns per-example losses: use reduction="none".
    check_targets: False gives nan at bad labels (neither ignore_index nor in [0, C)) instead
    of an error raised from the host callback (which inside ``jit`` ends the computation).
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    _check(reduction, logits)
    w = None if weight is None else jnp.asarray(weight)
    opts = (int(ignore_index), str(reduction), float(label_smoothing),
            None if softcap is None else float(softcap), float(z_loss), int(class_axis),
            _fastce.api.check_targets_flag(check_targets))
    return _ce(logits, labels, w, opts)



# ---------------------------------------------------------------------------------------------
# linear_cross_entropy
# ---------------------------------------------------------------------------------------------
def _lin_kwargs(opts):
    ignore_index, reduction, label_smoothing, softcap, z_loss, chunk_size = opts
    return dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                softcap=softcap, z_loss=z_loss, chunk_size=chunk_size)


def _lin_structs(hidden, classifier, bias):
    s = [jax.ShapeDtypeStruct(hidden.shape, hidden.dtype),
         jax.ShapeDtypeStruct(classifier.shape, hidden.dtype)]
    if bias is not None:
        s.append(jax.ShapeDtypeStruct(bias.shape, hidden.dtype))
    return tuple(s)


def _lin_loss_struct(hidden, opts):
    return jax.ShapeDtypeStruct((hidden.shape[0],) if opts[1] == "none" else (), hidden.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lin(hidden, classifier, bias, labels, weight, opts):
    def fill(loss_out, h, c, b, t, w):
        loss_out[...] = _np_linear_ce(_f32(h), _f32(c), t, _f32(b), weight=w,
                                       **_lin_kwargs(opts))
    return _host_call(fill, _lin_loss_struct(hidden, opts), hidden, classifier, bias, labels,
                      weight)


def _lin_grads_call(hidden, classifier, bias, labels, weight, g, opts):
    def fill(outs, h, c, b, t, w, go):
        loss_out, grad_outs = outs
        loss, *grads = _np_linear_ce_with_grad(
            _f32(h), _f32(c), t, _f32(b), weight=w,
            grad_output=None if go is None else np.asarray(go, np.float64), **_lin_kwargs(opts))
        loss_out[...] = loss
        for out, grad in zip(grad_outs, grads):
            out[...] = grad
    return _host_call(
        fill, (_lin_loss_struct(hidden, opts), _lin_structs(hidden, classifier, bias)),
        hidden, classifier, bias, labels, weight, g)


def _lin_fwd(hidden, classifier, bias, labels, weight, opts):
    if opts[1] == "none":              # the backward recomputes with the per-row cotangent
        loss = _lin(hidden, classifier, bias, labels, weight, opts)
        return loss, (hidden, classifier, bias, labels, weight)
    loss, grads = _lin_grads_call(hidden, classifier, bias, labels, weight, None, opts)
    return loss, grads


def _lin_bwd(opts, res, g):
    if opts[1] == "none":
        hidden, classifier, bias, labels, weight = res
        _, grads = _lin_grads_call(hidden, classifier, bias, labels, weight, g, opts)
    else:
        grads = tuple(a * g.astype(a.dtype) for a in res)
    gb = grads[2] if len(grads) > 2 else None
    return (grads[0], grads[1], gb, None, None)


_lin.defvjp(_lin_fwd, _lin_bwd)


def linear_cross_entropy(hidden, classifier, labels, bias=None, *, weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None,
                         z_loss=0.0, chunk_size=None):
    """``cross_entropy(hidden @ classifier.T + bias, labels, ...)`` without the (N, V) logits,
    differentiable in hidden, classifier and bias.

    hidden: (N, H) or (..., H); classifier: (V, H); bias: (V,) or None; labels: hidden's
    leading shape, integer class indices.  Options as in ``fastce.linear_cross_entropy``.
    """
    hidden = jnp.asarray(hidden)
    classifier = jnp.asarray(classifier)
    labels = jnp.asarray(labels)
    _check(reduction, hidden)
    lead = hidden.shape[:-1]
    if hidden.ndim != 2:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.reshape(-1)
    b = None if bias is None else jnp.asarray(bias)
    w = None if weight is None else jnp.asarray(weight)
    opts = (int(ignore_index), str(reduction), float(label_smoothing),
            None if softcap is None else float(softcap), float(z_loss),
            None if chunk_size is None else int(chunk_size))
    loss = _lin(hidden, classifier, b, labels, w, opts)
    if reduction == "none" and len(lead) != 1:
        loss = loss.reshape(lead)
    return loss
