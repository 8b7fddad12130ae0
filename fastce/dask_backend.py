"""Dask arrays as fastce's third backend: lazy cross-entropy over chunked logits.

``fastce.cross_entropy`` and friends send ``dask.array.Array`` arguments here (recognised by
type in ``fastce.dispatch``; dask is imported only then).  The result is a Dask graph whose
tasks run fastce's CPU or GPU kernels on the chunks (NumPy or CuPy), in four steps:

1. Denominators.  Each target chunk gives (sum of the targets' weights, count); a fixed tree
   sums them: the mean divides by the WHOLE batch's denominators, as in memory.
2. Chunks.  With one chunk along the class axis, a chunk runs the in-memory implementation
   (``fastce.api``) with the global denominators: its float64 sums of the cross-entropy,
   z-loss and token hits, its per-position loss ("none"), its gradient.  With class chunks,
   each chunk gives its mergeable statistics (``fastce.shards``), merged per position block
   in a fixed tree over the class chunks, then finalized; the gradient of each chunk comes
   from the merged statistics (two reads of the logits, as any vocabulary-parallel CE).
3. The sums of all position blocks are added in a fixed tree (SPLIT_EVERY children per node,
   in block order) and divided by the denominators.
4. Results: 0-d Dask arrays (mean/sum, z-loss, token accuracy), target-shaped ones ("none",
   lse), the gradient chunked like the logits.

Every task is deterministic and every reduction has a fixed shape and order, so for a fixed
chunking the results are bitwise identical across runs, schedulers and worker counts.
"""
from __future__ import annotations

import math
import operator
from functools import partial

import numpy as np

from . import api, shards
from .dispatch import is_dask_array

__all__ = ["cross_entropy", "linear_cross_entropy", "SPLIT_EVERY"]

SPLIT_EVERY = 8
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------------------------
# Graph helpers
# ---------------------------------------------------------------------------------------------
class _Graph:
    def __init__(self, token):
        from dask.base import tokenize
        self.token = tokenize(*token)
        self.dsk = {}
        self.deps = []
        self._n = 0

    def name(self, what):
        self._n += 1
        return f"fastce-{what}-{self.token}-{self._n}"

    def data(self, value, what):
        """A literal (weights, a classifier) stored once under its own key."""
        if value is None:
            return None
        if is_dask_array(value):
            value = value.rechunk(value.shape or ())
            self.deps.append(value)
            return (value.name,) + (0,) * value.ndim
        key = (self.name(what),)
        self.dsk[key] = value
        return key

    def grad_output(self, g_scalar, g_none):
        """Register the upstream gradient's dependencies; the key (or literal) of a scalar one
        (None otherwise: a per-position one is addressed by block)."""
        if g_none is not None:
            self.deps.append(g_none)
        if is_dask_array(g_scalar):
            self.deps.append(g_scalar)
            return (g_scalar.name,)
        return g_scalar

    def tree(self, keys, combine, what):
        """Reduce ``keys`` (in order) with ``combine(list)`` in a fixed tree; the root key."""
        level = list(keys)
        name = self.name(what)
        depth = 0
        while len(level) > 1 or depth == 0:
            nxt = []
            for i in range(0, len(level), SPLIT_EVERY):
                key = (name, depth, i // SPLIT_EVERY)
                self.dsk[key] = (combine, level[i:i + SPLIT_EVERY])
                nxt.append(key)
            level = nxt
            depth += 1
        return level[0]

    def array(self, name, chunks, meta, dtype):
        import dask.array as da
        from dask.highlevelgraph import HighLevelGraph
        graph = HighLevelGraph.from_collections(name, self.dsk, dependencies=self.deps)
        return da.Array(graph, name, chunks=chunks, dtype=dtype, meta=meta)


def _sum_tuples(parts):
    out = list(parts[0])
    for p in parts[1:]:
        for i, v in enumerate(p):
            out[i] = out[i] + v
    return tuple(out)


def _sum_arrays(arrays):
    out = arrays[0].copy()
    for a in arrays[1:]:
        out += a
    return out


def _merge(stats):
    return shards.merge_stats(stats)


def _meta(x, ndim, dtype):
    """An empty array of x's chunk type (NumPy or CuPy) with ``ndim`` dimensions."""
    from dask.array.utils import meta_from_array
    return meta_from_array(x._meta, ndim=ndim, dtype=dtype)


def _grid(numblocks):
    return list(np.ndindex(*numblocks)) if numblocks else [()]


# ---------------------------------------------------------------------------------------------
# Argument checks from metadata only (nothing is computed)
# ---------------------------------------------------------------------------------------------
def _check_float(a, name):
    if np.dtype(a.dtype) not in _FLOATS:
        raise TypeError(f"fastce: {name} must be float16, float32 or float64, got dtype "
                        f"{a.dtype}")


def _check_known(a, name):
    if any(math.isnan(c) for cs in a.chunks for c in cs):
        raise ValueError(f"fastce: {name} has unknown chunk sizes; call compute_chunk_sizes() "
                         f"first")


def _small(value, _name):
    """weight / classifier / bias: a NumPy or CuPy array, a Dask array, or None."""
    if value is None or is_dask_array(value):
        return value
    if not hasattr(value, "shape"):
        value = np.asarray(value)
    return value


def _check_mixed(named):
    for name, v in named.items():
        if v is not None and not is_dask_array(v):
            raise TypeError(f"fastce: 'input' is a Dask array but {name!r} is not; pass "
                            f"{name!r} as a Dask array too (only weight, classifier and bias "
                            f"may be in-memory arrays)")


def _scalar_grad(grad_output):
    """grad_output for mean/sum: a Python/NumPy scalar, or a 0-d Dask array (its key)."""
    if grad_output is None:
        return None
    if is_dask_array(grad_output):
        if grad_output.size != 1:
            raise ValueError(f"fastce: grad_output must be a scalar for mean/sum, got shape "
                             f"{grad_output.shape}")
        return grad_output.reshape(()).rechunk(())
    g = np.asarray(grad_output)
    if g.size != 1 or g.ndim > 1:
        raise ValueError(f"fastce: grad_output must be a scalar for mean/sum, got shape "
                         f"{g.shape}")
    return float(g.reshape(()))


# ---------------------------------------------------------------------------------------------
# Chunk tasks (module-level functions: picklable for distributed workers)
# ---------------------------------------------------------------------------------------------
def _block_denoms(t, w, *, C, ignore_index, dtype):
    if t.size == 0:
        return (0.0, 0.0)
    return shards.target_denominators(t, w, num_classes=C, ignore_index=ignore_index,
                                      dtype=dtype)


def _grad_value(g):
    return 1.0 if g is None else g


def _block_whole(x, t, w, dn, g, *, opts, reduction, want_loss, want_grad, want_hit, want_z,
                 want_lse):
    """One chunk holding every class: the in-memory implementation with global denominators.
    Returns {"sums": (ce, z, hits) float64 sums, "per": per-position loss ("none"), "z":
    per-position z-loss ("none"), "lse", "grad"}."""
    kw = dict(opts)
    if reduction == "mean":
        kw["denominators"] = dn
    r = {}
    if reduction == "none":
        loss, grad, stats = api._cross_entropy(
            x, t, w, g if want_grad else None, reduction="none", want_loss=True,
            want_grad=want_grad, want_stats=want_z, want_lse=want_lse, **kw)
        r["per"] = loss
        if want_z:
            r["z"] = stats[0]
        if want_hit:        # the token hits' sum: a forward-only call of its own
            r["sums"], _, _ = api._cross_entropy(x, t, w, None, reduction="sum",
                                                 want_loss=True, want_grad=False,
                                                 want_stats=True, raw=True, **opts)
    else:
        r["sums"], grad, stats = api._cross_entropy(
            x, t, w, _grad_value(g) if want_grad else None, reduction=reduction,
            want_loss=True, want_grad=want_grad, want_stats=want_hit, want_lse=want_lse,
            raw=True, **kw)
    if want_lse:
        r["lse"] = stats[2]
    r["grad"] = grad
    return r


def _block_stats(x, t, w, *, c0, C, opts, argmax):
    return shards.shard_stats(x, t, c0, C, w, argmax=argmax, **opts)


def _block_finalize(st, t, w, *, ignore_index, z_loss, reduction, want_hit, want_z, want_lse,
                    dtype):
    p = shards.finalize_parts(st, t, w, ignore_index=ignore_index, z_loss=z_loss,
                              want_hit=want_hit)
    r = {"sums": (float(p.ce.sum()), float(p.z.sum()) if p.z is not None else 0.0,
                  float(p.hit.sum()) if p.hit is not None else 0.0)}
    if reduction == "none":
        r["per"] = (p.ce + p.z if p.z is not None else p.ce).astype(dtype)
        if want_z:
            r["z"] = (p.z if p.z is not None else p.ce * 0.0).astype(dtype)
    if want_lse:
        r["lse"] = p.lse.astype(dtype)
    return r


def _block_shard_grad(x, t, st, w, dn, g, *, c0, C, opts, reduction):
    kw = dict(opts)
    return shards.shard_grad(x, t, c0, C, st, w, grad_output=g,
                             reduction=reduction, denominators=dn, **kw)


def _final(total, dn, g_unused=None, *, reduction, z_loss, dtype, what):
    ce, zs, hits = total
    D, Dz = dn
    mean = reduction == "mean"
    if what == "acc":
        return np.asarray(api._div(hits, Dz) if Dz else math.nan, dtype=np.float64)
    zv = api._div(zs, Dz) if mean else zs
    if what == "z":
        return np.asarray(zv, dtype=dtype)
    value = api._div(ce, D) if mean else ce
    if z_loss:
        value = value + zv
    return np.asarray(value, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# cross_entropy / cross_entropy_with_grad / cross_entropy_backward
# ---------------------------------------------------------------------------------------------
def cross_entropy(input, target, weight, grad_output, *, ignore_index, reduction,
                  label_smoothing, softcap, z_loss, class_axis, want_loss, want_grad,
                  return_z_loss=False, return_token_accuracy=False, return_lse=False, out=None):
    """The Dask implementation behind fastce's cross-entropy entry points (lazy results)."""
    if out is not None:
        raise TypeError("fastce: out= is not supported for Dask arrays (the gradient is a new "
                        "Dask array chunked like the logits)")
    x, t = input, target
    if not is_dask_array(x):
        raise TypeError(f"fastce: 'target' is a Dask array but 'input' is not "
                        f"({type(x).__name__}); pass both as Dask arrays")
    weight = _small(weight, "weight")
    _check_mixed(dict(target=t, **({"grad_output": grad_output}
                                   if (want_grad and reduction == "none"
                                       and grad_output is not None) else {})))
    eps, cap, zl = api.check_options(reduction, label_smoothing, softcap, z_loss)
    ignore_index = api.check_ignore_index(ignore_index)
    _check_float(x, "input")
    if x.ndim == 0:
        raise ValueError("fastce: input must have at least one dimension (the classes), got a "
                         "0-d array")
    axis = api._class_axis(x, class_axis)
    _check_known(x, "input")
    _check_known(t, "target")
    C = int(x.shape[axis])
    in_dtype = np.dtype(x.dtype)
    cdt = np.dtype(np.float32) if in_dtype == np.float16 else in_dtype
    loss_shape = tuple(x.shape[:axis]) + tuple(x.shape[axis + 1:])
    kind = "prob" if np.dtype(t.dtype).kind == "f" else "index"
    if np.dtype(t.dtype).kind == "b":
        raise TypeError("fastce: target must hold integer class indices or float "
                        "probabilities, got a bool array")
    if kind == "prob":
        if tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"fastce: float targets are class probabilities and must have the "
                             f"input's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if ignore_index >= 0:
            raise ValueError("fastce: ignore_index is not supported with probability targets "
                             "(as in torch, which accepts only a negative one)")
        t = t.rechunk(x.chunks)
    else:
        if np.dtype(t.dtype).kind not in "iu":
            raise TypeError(f"fastce: target must be an integer (class index) or float "
                            f"(probability) array, got dtype {t.dtype}")
        if tuple(t.shape) != loss_shape:
            raise ValueError(f"fastce: class-index target must have shape {loss_shape} for "
                             f"input of shape {tuple(x.shape)}, got {tuple(t.shape)}")
        t = t.rechunk(tuple(c for i, c in enumerate(x.chunks) if i != axis))
    if weight is not None and not is_dask_array(weight):
        api.check_weight_meta(weight, C)
    elif weight is not None and (weight.ndim != 1 or weight.shape[0] != C):
        api.check_weight_meta(weight, C)
    g_none = None
    g_scalar = None
    if want_grad and grad_output is not None:
        if reduction == "none":
            if tuple(grad_output.shape) != loss_shape:
                raise ValueError(f"fastce: with reduction='none', grad_output must have the "
                                 f"loss's shape {loss_shape}, got {tuple(grad_output.shape)}")
            g_none = grad_output.rechunk(tuple(c for i, c in enumerate(x.chunks) if i != axis))
        else:
            g_scalar = _scalar_grad(grad_output)

    G = _Graph(("ce", x.name, t.name, weight if not is_dask_array(weight) else weight.name,
                ignore_index, reduction, eps, cap, zl, axis, want_loss, want_grad,
                return_z_loss, return_token_accuracy, return_lse,
                getattr(g_none, "name", None),
                g_scalar.name if is_dask_array(g_scalar) else g_scalar))
    G.deps += [x, t]
    wkey = G.data(weight, "weight")
    gkey = G.grad_output(g_scalar, g_none)

    # 1. denominators of the whole batch
    tgrid = _grid(t.numblocks)
    if kind == "index":
        fn = partial(_block_denoms, C=C, ignore_index=ignore_index, dtype=cdt)
        name = G.name("denoms")
        keys = []
        for b in tgrid:
            G.dsk[(name,) + b] = (fn, (t.name,) + b, wkey)
            keys.append((name,) + b)
        dn = G.tree(keys, _sum_tuples, "denominators")
    else:
        n = float(math.prod(loss_shape))
        dn = (G.name("denominators"),)
        G.dsk[dn] = (n, n)

    opts = dict(ignore_index=ignore_index, label_smoothing=eps, softcap=softcap, z_loss=zl,
                class_axis=axis)
    nk = x.numblocks[axis]
    want_hit = return_token_accuracy and kind == "index"
    want_z_none = return_z_loss and reduction == "none"
    # positions blocks B: x's block grid without the class axis
    pgrid = _grid(tuple(n for i, n in enumerate(x.numblocks) if i != axis))

    def xkey(b, k):
        return (x.name,) + b[:axis] + (k,) + b[axis:]

    def tkey(b, k):
        return (t.name,) + (b if kind == "index" else b[:axis] + (k,) + b[axis:])

    def gk(b):
        return (g_none.name,) + b if g_none is not None else gkey

    res = G.name("chunk")
    grad_name = G.name("grad") if want_grad else None
    if nk == 1:
        fn = partial(_block_whole, opts=opts, reduction=reduction, want_loss=want_loss,
                     want_grad=want_grad, want_hit=want_hit, want_z=want_z_none,
                     want_lse=return_lse)
        for b in pgrid:
            G.dsk[(res,) + b] = (fn, xkey(b, 0), tkey(b, 0), wkey, dn, gk(b))
            if want_grad:
                G.dsk[(grad_name,) + xkey(b, 0)[1:]] = (operator.getitem, (res,) + b, "grad")
    else:
        ci = np.cumsum((0,) + x.chunks[axis])
        sopts = dict(ignore_index=ignore_index, label_smoothing=eps, softcap=softcap,
                     class_axis=axis)
        sname = G.name("stats")
        fin = partial(_block_finalize, ignore_index=ignore_index, z_loss=zl,
                      reduction=reduction, want_hit=want_hit, want_z=want_z_none,
                      want_lse=return_lse, dtype=in_dtype)
        gfn = {}
        for b in pgrid:
            skeys = []
            for k in range(nk):
                fn = partial(_block_stats, c0=int(ci[k]), C=C, opts=sopts, argmax=want_hit)
                G.dsk[(sname,) + b + (k,)] = (fn, xkey(b, k), tkey(b, k), wkey)
                skeys.append((sname,) + b + (k,))
            merged = G.tree(skeys, _merge, "merge")
            G.dsk[(res,) + b] = (fin, merged, (t.name,) + b if kind == "index" else None,
                                 wkey)
            if want_grad:
                for k in range(nk):
                    if k not in gfn:
                        gfn[k] = partial(_block_shard_grad, c0=int(ci[k]), C=C,
                                         opts=dict(sopts, z_loss=zl), reduction=reduction)
                    G.dsk[(grad_name,) + xkey(b, k)[1:]] = (gfn[k], xkey(b, k), tkey(b, k),
                                                            merged, wkey, dn, gk(b))

    tchunks = tuple(c for i, c in enumerate(x.chunks) if i != axis)
    loss = zpart = acc = lse = None

    def per_block(what, field):
        name = G.name(what)
        for b in pgrid:
            G.dsk[(name,) + b] = (operator.getitem, (res,) + b, field)
        return name

    if want_loss and reduction == "none":
        loss = per_block("loss", "per")
    if return_lse:
        lse = per_block("lse", "lse")
    if want_z_none:
        zpart = per_block("zloss", "z")
    if (want_loss and reduction != "none") or want_hit or (return_z_loss and not want_z_none):
        sums = per_block("sums", "sums")
        total = G.tree([(sums,) + b for b in pgrid], _sum_tuples, "total")
        fin = dict(reduction=reduction, z_loss=zl, dtype=in_dtype)
        if want_loss and reduction != "none":
            loss = G.name("loss")
            G.dsk[(loss,)] = (partial(_final, what="loss", **fin), total, dn)
        if return_z_loss and not want_z_none:
            zpart = G.name("zloss")
            G.dsk[(zpart,)] = (partial(_final, what="z", **fin), total, dn)
        if want_hit:
            acc = G.name("acc")
            G.dsk[(acc,)] = (partial(_final, what="acc", **fin), total, dn)
    if return_token_accuracy and not want_hit:        # probability targets: nan, as in memory
        acc = G.name("acc")
        G.dsk[(acc,)] = (np.asarray, math.nan)

    # Build the arrays from one graph.
    meta_loss = _meta(x, len(loss_shape), in_dtype)
    results = {}
    if want_grad:
        results["grad"] = G.array(grad_name, x.chunks, x._meta.astype(in_dtype), in_dtype)
    if loss is not None:
        if reduction == "none":
            results["loss"] = G.array(loss, tchunks, meta_loss, in_dtype)
        else:
            results["loss"] = G.array(loss, (), _meta(x, 0, in_dtype), in_dtype)
    if zpart is not None:
        results["z"] = G.array(zpart, tchunks if reduction == "none" else (),
                               meta_loss if reduction == "none" else _meta(x, 0, in_dtype),
                               in_dtype)
    if acc is not None:
        results["acc"] = G.array(acc, (), np.empty(()), np.float64)
    if lse is not None:
        results["lse"] = G.array(lse, tchunks, meta_loss, in_dtype)
    if not want_loss:
        return results["grad"]
    lossv = results["loss"]
    if return_z_loss or return_token_accuracy or return_lse:
        lossv = api.CrossEntropyOutput(lossv, results.get("z"), results.get("acc"),
                                       results.get("lse"))
    return (lossv, results["grad"]) if want_grad else lossv


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy[_with_grad]
# ---------------------------------------------------------------------------------------------
def _block_linear(h, t, c, b, w, dn, g, *, opts, reduction, want_grad):
    from .linear import _linear_ce
    kw = dict(opts)
    return _linear_ce(h, c, t, b, w, g if want_grad else None, reduction=reduction,
                      want_grad=want_grad, denominators=dn if reduction == "mean" else None,
                      raw=reduction != "none", **kw)


def _linear_final(total, dn, *, reduction, z_loss, dtype):
    return _final((total[0], total[1], 0.0), dn, reduction=reduction, z_loss=z_loss,
                  dtype=dtype, what="loss")


def _first_or_sum(items, index):
    return _sum_arrays([it[index] for it in items])


def linear_cross_entropy(hidden, classifier, target, bias, weight, grad_output, *,
                         ignore_index, reduction, label_smoothing, softcap, z_loss, chunk_size,
                         want_grad):
    """Dask ``hidden`` (N, H) chunked by rows, the classifier (and bias) in memory: per-chunk
    fused loss and gradients; d_classifier and d_bias summed in a fixed tree."""
    if not is_dask_array(hidden):
        raise TypeError("fastce: 'target' is a Dask array but 'hidden' is not; pass both as "
                        "Dask arrays")
    _check_mixed(dict(target=target, **({"grad_output": grad_output}
                                        if (want_grad and reduction == "none"
                                            and grad_output is not None) else {})))
    eps, cap, zl = api.check_options(reduction, label_smoothing, softcap, z_loss)
    ignore_index = api.check_ignore_index(ignore_index)
    _check_float(hidden, "hidden")
    if hidden.ndim != 2:
        raise ValueError(f"fastce: hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}")
    _check_known(hidden, "hidden")
    classifier = _small(classifier, "classifier")
    bias = _small(bias, "bias")
    weight = _small(weight, "weight")
    N, H = hidden.shape
    if classifier.ndim != 2 or classifier.shape[1] != H:
        raise ValueError(f"fastce: classifier must have shape (V, H={H}) for hidden of shape "
                         f"{tuple(hidden.shape)}, got {tuple(classifier.shape)}")
    V = int(classifier.shape[0])
    if np.dtype(target.dtype).kind not in "iu":
        raise TypeError("fastce: target must hold integer class indices")
    if tuple(target.shape) != (N,):
        raise ValueError(f"fastce: target must have shape (N,) = ({N},) for hidden of shape "
                         f"{tuple(hidden.shape)}, got {tuple(target.shape)}")
    h = hidden.rechunk((hidden.chunks[0], (H,)))
    t = target.rechunk((h.chunks[0],))
    in_dtype = np.dtype(hidden.dtype)
    cdt = np.dtype(np.float32) if in_dtype == np.float16 else in_dtype
    g_none = g_scalar = None
    if want_grad and grad_output is not None:
        if reduction == "none":
            g_none = grad_output.rechunk((h.chunks[0],))
        else:
            g_scalar = _scalar_grad(grad_output)
    G = _Graph(("lin", h.name, t.name, classifier if not is_dask_array(classifier)
                else classifier.name, bias if not is_dask_array(bias) else bias.name,
                weight if not is_dask_array(weight) else weight.name, ignore_index,
                reduction, eps, cap, zl, chunk_size, want_grad, getattr(g_none, "name", None),
                g_scalar.name if is_dask_array(g_scalar) else g_scalar))
    G.deps += [h, t]
    ckey = G.data(classifier, "classifier")
    bkey = G.data(bias, "bias")
    wkey = G.data(weight, "weight")
    gkey = G.grad_output(g_scalar, g_none)
    nb = h.numblocks[0]
    fn = partial(_block_denoms, C=V, ignore_index=ignore_index, dtype=cdt)
    name = G.name("denoms")
    for i in range(nb):
        G.dsk[(name, i)] = (fn, (t.name, i), wkey)
    dn = G.tree([(name, i) for i in range(nb)], _sum_tuples, "denominators")
    opts = dict(ignore_index=ignore_index, label_smoothing=eps, softcap=softcap, z_loss=zl,
                chunk_size=chunk_size)
    res = G.name("chunk")
    fn = partial(_block_linear, opts=opts, reduction=reduction, want_grad=want_grad)
    for i in range(nb):
        gk = (g_none.name, i) if g_none is not None else gkey
        G.dsk[(res, i)] = (fn, (h.name, i, 0), (t.name, i), ckey, bkey, wkey, dn, gk)
    results = {}
    if reduction == "none":
        lname = G.name("loss")
        for i in range(nb):
            G.dsk[(lname, i)] = (_pick, (res, i), want_grad, 0)
        loss_name, loss_chunks, loss_meta = lname, (h.chunks[0],), _meta(h, 1, in_dtype)
    else:
        sums = G.name("sums")
        for i in range(nb):
            G.dsk[(sums, i)] = (_pick, (res, i), want_grad, 0)
        total = G.tree([(sums, i) for i in range(nb)], _sum_tuples, "total")
        loss_name = G.name("loss")
        G.dsk[(loss_name,)] = (partial(_linear_final, reduction=reduction, z_loss=zl,
                                       dtype=in_dtype), total, dn)
        loss_chunks, loss_meta = (), _meta(h, 0, in_dtype)
    if want_grad:
        ghn = G.name("grad-hidden")
        for i in range(nb):
            G.dsk[(ghn, i, 0)] = (operator.getitem, (res, i), 1)
        gcs = G.name("gc")
        for i in range(nb):
            G.dsk[(gcs, i)] = (operator.getitem, (res, i), 2)
        gc_root = G.tree([(gcs, i) for i in range(nb)], _sum_arrays, "grad-classifier")
        gcn = G.name("grad-classifier-out")
        G.dsk[(gcn, 0, 0)] = (_identity, gc_root)
        gbn = None
        if bias is not None:
            gbs = G.name("gb")
            for i in range(nb):
                G.dsk[(gbs, i)] = (operator.getitem, (res, i), 3)
            gb_root = G.tree([(gbs, i) for i in range(nb)], _sum_arrays, "grad-bias")
            gbn = G.name("grad-bias-out")
            G.dsk[(gbn, 0)] = (_identity, gb_root)
    results["loss"] = G.array(loss_name, loss_chunks, loss_meta, in_dtype)
    if not want_grad:
        return results["loss"]
    gh = G.array(ghn, h.chunks, _meta(h, 2, in_dtype), in_dtype)
    gc = G.array(gcn, ((V,), (H,)), _meta(h, 2, in_dtype), in_dtype)
    gb = G.array(gbn, ((V,),), _meta(h, 1, in_dtype), in_dtype) if gbn is not None else None
    return results["loss"], gh, gc, gb


def _pick(r, want_grad, i):
    return r[i] if want_grad else r


def _identity(a):
    return a
