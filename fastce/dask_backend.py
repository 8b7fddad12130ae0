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

import functools
import math
import operator
import os
import sys
import threading
import uuid
import weakref
from functools import partial

import numpy as np

from . import _alloc, api, cpu, shards
from .dispatch import is_dask_array

__all__ = ["cross_entropy", "linear_cross_entropy", "from_npy", "NpyFile", "SPLIT_EVERY"]

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

    def tree(self, keys, combine, what, leaf=None, leaf_args=()):
        """Reduce ``keys`` (in order) with ``combine(list)`` in a fixed tree; the root key.
        ``leaf(list, *leaf_args)``, when given, makes the first level instead, from the values
        of ``keys`` themselves (so that no task per key is needed to compute or pick out what
        is reduced); it returns what ``combine`` would have."""
        level = list(keys)
        name = self.name(what)
        depth = 0
        while len(level) > 1 or depth == 0:
            nxt = []
            first = leaf is not None and depth == 0
            for i in range(0, len(level), SPLIT_EVERY):
                key = (name, depth, i // SPLIT_EVERY)
                self.dsk[key] = ((leaf, level[i:i + SPLIT_EVERY]) + tuple(leaf_args) if first
                                 else (combine, level[i:i + SPLIT_EVERY]))
                nxt.append(key)
            level = nxt
            depth += 1
        return level[0]

    def array(self, name, chunks, meta, dtype, cls=None):
        import dask.array as da
        from dask.highlevelgraph import HighLevelGraph
        graph = HighLevelGraph.from_collections(name, self.dsk, dependencies=self.deps)
        return (cls or da.Array)(graph, name, chunks=chunks, dtype=dtype, meta=meta)


# ---------------------------------------------------------------------------------------------
# Gradients written into one buffer
# ---------------------------------------------------------------------------------------------
class _Slabs:
    """Gradient chunks are written into their own places in one buffer per computation, its
    "slab" (from fastce's buffer pool; see _slab_plan for the chunkings), so that ``compute()``
    on a shared-memory scheduler returns the slab itself instead of copying the chunks into a
    new array (at W1 in 512-row chunks that copy and its page faults took ~2x the in-memory
    call).  Each chunk index of a slab is handed out once: a task run again (a retry, a second
    computation of the same graph, two at once) gets a new slab, so no chunk is ever written
    twice and no earlier result is overwritten.  The slab is held weakly: it lives as long as a
    chunk of it does, and stays resident as long, so only gradients within the pool's cap
    (1 GiB by default, ``set_pool_bytes``) get one: a larger one streamed chunk by chunk
    (``da.store`` of a gradient larger than memory) keeps a buffer per chunk, freed once
    stored.  Tasks on a ``dask.distributed`` worker take no slab (their chunks are sent back as
    copies; a slab would map the whole gradient on every worker).  A result computed from part
    of the gradient (``grad[:k].compute()``) is a view of its chunk, so it keeps the whole
    slab."""

    def __init__(self):
        self.lock = threading.Lock()
        self.live = {}          # graph key -> (weakref to the slab, chunk indices handed out)

    def claim(self, key, shape, dtype, index, region):
        """slab[region] (a tuple of slices) of the computation's slab for chunk ``index``;
        None for a gradient beyond the pool's cap."""
        if not _alloc.may_hold(math.prod(shape) * np.dtype(dtype).itemsize):
            return None
        with self.lock:
            entry = self.live.get(key)
            slab = entry[0]() if entry is not None else None
            if slab is None or index in entry[1]:
                for k in [k for k, e in self.live.items() if e[0]() is None]:
                    del self.live[k]
                slab = _alloc.empty(shape, dtype)
                entry = self.live[key] = (weakref.ref(slab), set())
            entry[1].add(index)
            return slab[region]


_SLABS = _Slabs()


def _reset_slabs_in_child():
    # A forked child (Dask's processes scheduler) has none of the parent's other threads: the
    # lock may have been held by one of them; its slabs are the parent's to hand out.
    _SLABS.lock = threading.Lock()
    _SLABS.live = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_slabs_in_child)


def _on_cluster_worker():
    """Whether this task runs on a dask.distributed worker (never imports distributed)."""
    dist = sys.modules.get("distributed")
    if dist is None:
        return False
    try:
        dist.get_worker()
    except ValueError:
        return False
    return True


def _whole_slab(blocks, chunks):
    """The array that the ``blocks`` (in Dask's order, chunked by ``chunks``) are the slices
    of, each at its own place, covering it; None when they are not (chunks from different
    slabs, a cluster's copies)."""
    from dask.array.core import slices_from_chunks
    slab = next((getattr(b, "base", None) for b in blocks if b.size), None)
    if (type(slab) is not np.ndarray or not slab.flags.c_contiguous
            or slab.shape != tuple(map(sum, chunks))):
        return None
    indices = slices_from_chunks(chunks)
    if len(indices) != len(blocks):
        return None
    start = slab.__array_interface__["data"][0]
    for index, b in zip(indices, blocks):
        at = start + sum(i.start * st for i, st in zip(index, slab.strides))
        if (type(b) is not np.ndarray or b.dtype != slab.dtype
                or b.shape != tuple(i.stop - i.start for i in index)):
            return None
        if b.size == 0:                 # an empty chunk covers nothing, wherever it lies
            continue
        if (b.base is not slab
                or any(n > 1 and st != sst for n, st, sst in zip(b.shape, b.strides,
                                                                 slab.strides))
                or b.__array_interface__["data"][0] != at):
            return None
    return slab


def _gather_grad(results):
    """Dask's finalize for a gradient: the chunks' slab itself when they are its slices (see
    _Slabs); NumPy chunks otherwise copied into a buffer of fastce's pool (reused from call to
    call: a fresh 524 MB array's page faults cost 2-10x the copy on a VM); else Dask's own
    concatenation (CuPy chunks).  As with Dask's single-chunk arrays, results of one
    ``dask.compute`` call may share memory (the gradient twice, or a slice of it beside it)."""
    from dask.array.core import chunks_from_arrays, finalize, slices_from_chunks
    from dask.core import flatten
    blocks = list(flatten(results))
    if len(blocks) < 2 or any(type(b) is not np.ndarray for b in blocks):
        return finalize(results)
    chunks = chunks_from_arrays(results)
    if len(chunks) != blocks[0].ndim:
        return finalize(results)
    whole = _whole_slab(blocks, chunks)
    if whole is not None:
        return whole
    out = _alloc.empty(tuple(map(sum, chunks)), blocks[0].dtype)
    for index, b in zip(slices_from_chunks(chunks), blocks):
        out[index] = b
    return out


def _gathered_into(results, out):
    """Dask's finalize for a gradient computed into the caller's out=: out itself (each chunk
    task wrote its place in it)."""
    return out


def _check_out(out, x, s):
    """The caller's out= for a Dask gradient: a writeable C-contiguous NumPy array (a memmap:
    the gradient streamed to its file) of the logits' shape and dtype, apart from the logits'
    memory, for NumPy chunks; None without one."""
    if out is None:
        return None
    if not s.want_grad:
        raise TypeError("fastce: out= is for the gradient")
    if not isinstance(out, np.ndarray):
        raise TypeError(f"fastce: out= of a Dask gradient must be a NumPy array (or memmap), "
                        f"got {type(out).__name__}")
    if type(x._meta) is not np.ndarray:
        raise TypeError("fastce: out= needs NumPy chunks (the chunk tasks write into it)")
    if _default_is_distributed():
        raise RuntimeError(_LOCAL_ONLY)
    api._check_out(cpu.BACKEND, out, x)
    if s.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"fastce: out= of a Dask gradient needs float32 or float64 logits, got "
                         f"{s.dtype}")
    file = getattr(out, "filename", None)
    if (any(np.may_share_memory(out, a) for a in _graph_arrays(x))
            or (file and any(_same_file(file, f.path) for f in _graph_arrays(x, NpyFile)))):
        raise ValueError("fastce: out= overlaps the logits' memory (the Dask gradient is not "
                         "computed in place)")
    return out


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _graph_arrays(x, kind=np.ndarray):
    """The NumPy arrays (or other ``kind``) held in x's graph: its chunks or the array they
    are read from, as ``da.from_array`` stores them, one call deep in tasks."""
    for layer in x.__dask_graph__().layers.values():
        if not isinstance(layer, dict) and type(layer).__name__ != "MaterializedLayer":
            continue
        for v in layer.values():
            if isinstance(v, kind):
                yield v
            elif isinstance(v, tuple):
                yield from (a for a in v if isinstance(a, kind))


class NpyFile:
    """A ``.npy`` file as the source of a Dask array (see from_npy): pickles as its path, and
    each chunk is a view of a memory map of the file opened by the task that reads it."""

    def __init__(self, path):
        self.path = os.fspath(path)
        a = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype, self.ndim = a.shape, a.dtype, a.ndim

    def __getitem__(self, index):
        return np.asarray(np.load(self.path, mmap_mode="r")[index])


def from_npy(path, chunks="auto"):
    """A Dask array over the ``.npy`` file at ``path`` that reads each chunk only when a task
    needs it, on whichever worker runs the task.  (``da.from_array(np.load(path,
    mmap_mode="r"))`` reads the whole file into memory at once since Dask 2024.12: from_array
    copies its argument, dask/dask#11850.)"""
    import dask.array as da
    return da.from_array(NpyFile(path), chunks=chunks)


@functools.lru_cache(maxsize=None)
def _gradient_type():
    import dask.array as da

    class PooledGradient(da.Array):
        """A NumPy-chunked gradient whose ``compute()`` returns its chunks' slab without a
        copy when it can, else copies them into a pool buffer (see _gather_grad); any other
        use is a plain Dask array's (``persist()`` gives one)."""

        __slots__ = ("_fastce_out",)       # the caller's out= array, or None

        def __dask_postcompute__(self):
            out = getattr(self, "_fastce_out", None)
            return (_gather_grad, ()) if out is None else (_gathered_into, (out,))

    PooledGradient.__qualname__ = "PooledGradient"      # picklable by name, a module global
    globals()["PooledGradient"] = PooledGradient
    return PooledGradient


def _slab_plan(x, s):
    """Whether the gradient's chunks may be slices of one slab (NumPy float32/float64 chunks):
    - one chunk along the classes (not the first axis), the first axis split, no other: each
      chunk task writes its gradient into its rows of the slab;
    - class chunks along the last axis, no axis split but the first and the classes, class
      indices, no softcap: each statistics task stores its exps into its tile of the slab
      (see shards._keeps_exps), which the chunk's gradient task rescales in place."""
    if not (s.want_grad and x.ndim >= 2 and type(x._meta) is np.ndarray
            and s.dtype in (np.dtype(np.float32), np.dtype(np.float64))):
        return False
    if x.numblocks[s.axis] == 1:
        return (s.axis != 0 and x.numblocks[0] > 1
                and all(n == 1 for n in x.numblocks[1:]))
    return (s.axis == x.ndim - 1 and s.kind == "index" and s.cap == 0.0
            and all(n == 1 for n in x.numblocks[1:-1]))


def _slab_arg(name, x, s, index, region):
    """The ``slab`` argument of a chunk task: (graph key, gradient shape and dtype, chunk
    index, its slices of the slab); with out=, its place there (an _Into)."""
    if s.out is not None:
        return _Into(s.out, region)
    return (name, tuple(x.shape), s.dtype, index, region)


def _claim_slab(x, slab):
    """The chunk's slice of its computation's slab (see _Slabs), or None (no plan, a
    distributed worker, beyond the pool's cap); its place in the caller's ``out=`` (_Into)."""
    if isinstance(slab, _Into):
        return slab.view(x)
    if (slab is None or type(x) is not np.ndarray or x.dtype != slab[2]
            or _on_cluster_worker()):
        return None
    return _SLABS.claim(*slab)


class _Into:
    """A gradient chunk's place ``out[region]`` in the caller's ``out=`` array (in place of a
    slab: any chunking).  Only a task of the process that built the graph can write there: a
    worker process or a ``dask.distributed`` worker would write into a copy, so it raises."""

    __slots__ = ("out", "region", "pid")

    def __init__(self, out, region):
        self.out, self.region, self.pid = out, region, os.getpid()

    def view(self, x):
        if os.getpid() != self.pid or _on_cluster_worker():
            raise RuntimeError(_LOCAL_ONLY)
        return self.out[self.region]


_LOCAL_ONLY = ("fastce: a Dask gradient with out= is computed into the caller's array, so it "
               "runs on a local scheduler only (threads or sync); use dask.array.store to write "
               "a gradient from other workers")


def _default_is_distributed():
    """Whether dask computes on a dask.distributed Client by default here (which would send
    out= to its workers as copies)."""
    from dask.base import get_scheduler
    owner = getattr(get_scheduler(), "__self__", None)
    return owner is not None and type(owner).__module__.startswith("distributed")


def _deliver(grad, dest):
    """The chunk's gradient at its place ``dest`` (None: where it is): copied there unless it
    was computed there."""
    if dest is None or (grad.__array_interface__["data"][0] == dest.__array_interface__["data"][0]
                        and grad.strides == dest.strides):
        return grad
    np.copyto(dest, grad.reshape(dest.shape))
    return dest


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


def _group_denoms(ts, w, **kw):
    """The summed denominators of a few target chunks, in order (a tree's leaf)."""
    return _sum_tuples([_block_denoms(t, w, **kw) for t in ts])


def _group_sums(results):
    """The summed "sums" of a few chunk results, in order (a tree's leaf)."""
    return _sum_tuples([r["sums"] for r in results])


def _grad_value(g):
    return 1.0 if g is None else g


def _block_whole(x, t, w, dn, g, *, opts, reduction, want_loss, want_grad, want_hit, want_z,
                 want_lse, slab=None):
    """One chunk holding every class: the in-memory implementation with global denominators
    (``dn``; None: the forward, which needs none).  Returns {"sums": (ce, z, hits, D, Dz),
    float64 sums and the chunk's own denominators, "per": per-position loss ("none"), "z":
    per-position z-loss ("none"), "lse", "grad"}.  ``slab``: (graph key, gradient shape and
    dtype, chunk index, its region) to write the gradient into (see _Slabs), or its place in
    the caller's out= (_Into)."""
    kw = dict(opts)
    if reduction == "mean" and dn is not None:
        kw["denominators"] = dn
    dest = _claim_slab(x, slab) if want_grad else None
    if dest is not None and dest.flags.c_contiguous:
        kw["out"] = dest                    # computed in its place (else copied there below)
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
    r["grad"] = _deliver(grad, dest) if want_grad else grad
    return r


def _block_stats(x, t, w, *, c0, C, opts, argmax):
    return shards.shard_stats(x, t, c0, C, w, argmax=argmax, **opts)


def _block_finalize(st, t, w, *, C, ignore_index, z_loss, reduction, want_hit, want_z,
                    want_lse, dtype, own_dn):
    """A position block's results from its merged statistics; "sums" as _block_whole's (its
    own denominators only when ``own_dn``, the forward's: loss+grad has its tree's already)."""
    p = shards.finalize_parts(st, t, w, ignore_index=ignore_index, z_loss=z_loss,
                              want_hit=want_hit)
    if not own_dn:
        dn = (0.0, 0.0)
    elif t is None:                     # probability targets: every position counts once
        dn = (float(p.ce.size),) * 2
    else:
        dn = _block_denoms(t, w, C=C, ignore_index=ignore_index, dtype=_compute_dtype(dtype))
    r = {"sums": (float(p.ce.sum()), float(p.z.sum()) if p.z is not None else 0.0,
                  float(p.hit.sum()) if p.hit is not None else 0.0) + tuple(dn)}
    if reduction == "none":
        r["per"] = (p.ce + p.z if p.z is not None else p.ce).astype(dtype)
        if want_z:
            r["z"] = (p.z if p.z is not None else np.zeros_like(p.ce)).astype(dtype)
    if want_lse:
        r["lse"] = p.lse.astype(dtype)
    return r


def _block_stats_exps(x, t, w, *, c0, C, opts, argmax, slab=None):
    """(statistics, exps) of a class chunk (see shards._shard_stats_exps); the exps are
    stored into the chunk's tile of its slab when it has one (see _slab_plan)."""
    tile = _claim_slab(x, slab)
    if tile is not None:
        tile = tile.reshape(math.prod(tile.shape[:-1]), tile.shape[-1])   # a view: _slab_plan
    return shards._shard_stats_exps(x, t, c0, C, w, argmax=argmax, out=tile, **opts)


def _block_grad_exps(own, x, t, st, w, dn, g, *, c0, C, opts, reduction, slab=None):
    """The chunk's gradient from its own (statistics, exps) and the merged statistics; copied
    into its place in the caller's out= (``slab``, an _Into) when its exps were not there."""
    local, exps = own
    grad = shards._shard_grad_exps(exps, local, x, t, c0, C, st, w, grad_output=g,
                                   reduction=reduction, denominators=dn, **opts)
    return _deliver(grad, _claim_slab(x, slab))


def _final(total, dn, g_unused=None, *, reduction, z_loss, dtype, what):
    """A 0-d result from the chunks' summed (ce, z, hits, D, Dz) and the denominators ``dn``
    (None: the summed ones, the same numbers in the same tree)."""
    ce, zs, hits = total[:3]
    D, Dz = dn if dn is not None else total[3:5]
    mean = reduction == "mean"
    if what == "acc":
        return np.asarray(api._div(hits, Dz) if Dz else math.nan, dtype=np.float64)
    zv = api._div(zs, Dz) if mean else zs
    if what == "z":
        return np.asarray(zv, dtype=dtype)
    value = api._mean(ce, D) if mean else ce
    if z_loss:
        value = value + zv
    return np.asarray(value, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Shared by cross_entropy and linear_cross_entropy
# ---------------------------------------------------------------------------------------------
def _check_common(main, main_name, target, grad_output, *, reduction, label_smoothing, softcap,
                  z_loss, ignore_index, want_grad):
    """The checks both entry points make first; (eps, cap, z_loss, ignore_index) checked."""
    per_position_grad = want_grad and reduction == "none" and grad_output is not None
    _check_mixed(dict(target=target, **({"grad_output": grad_output}
                                        if per_position_grad else {})))
    eps, cap, zl = api.check_options(reduction, label_smoothing, softcap, z_loss)
    ignore_index = api.check_ignore_index(ignore_index)
    _check_float(main, main_name)
    return eps, cap, zl, ignore_index


def _compute_dtype(in_dtype):
    # float16 chunks accumulate in float32, as the in-memory kernels do
    return np.dtype(np.float32) if in_dtype == np.float16 else in_dtype


def _split_grad(grad_output, *, reduction, want_grad, position_chunks, loss_shape=None):
    """(per-position upstream gradient rechunked like the positions, scalar one); either None.
    ``loss_shape``: checked against a per-position one when given."""
    if not want_grad or grad_output is None:
        return None, None
    if reduction != "none":
        return None, _scalar_grad(grad_output)
    if loss_shape is not None and tuple(grad_output.shape) != loss_shape:
        raise ValueError(f"fastce: with reduction='none', grad_output must have the "
                         f"loss's shape {loss_shape}, got {tuple(grad_output.shape)}")
    return grad_output.rechunk(position_chunks), None


def _token_of(value):
    """What identifies an argument in the graph token: a Dask array by its name."""
    return value.name if is_dask_array(value) else value


def _denominators(G, t, grid, wkey, *, C, ignore_index, dtype):
    """Key of the whole batch's (weight sum, count): per target chunk, summed in a fixed tree
    whose leaves compute their chunks' own (a task per SPLIT_EVERY chunks, not one each: on
    Dask's threaded scheduler a task costs ~0.2 ms, ten times a chunk's denominators)."""
    leaf = partial(_group_denoms, C=C, ignore_index=ignore_index, dtype=dtype)
    return G.tree([(t.name,) + b for b in grid], _sum_tuples, "denominators", leaf=leaf,
                  leaf_args=(wkey,))


def _project(G, what, res, grid, getter, *args, suffix=()):
    """A new key per block: ``getter(result of block b, *args)``; the new name."""
    name = G.name(what)
    for b in grid:
        G.dsk[(name,) + b + suffix] = (getter, (res,) + b) + args
    return name


def _tree_of(G, name, grid, combine, what):
    return G.tree([(name,) + b for b in grid], combine, what)


# ---------------------------------------------------------------------------------------------
# cross_entropy / cross_entropy_with_grad / cross_entropy_backward
# ---------------------------------------------------------------------------------------------
class _Spec:
    """What one cross_entropy call computes, checked; shared by the graph-building steps."""

    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.opts = dict(ignore_index=self.ignore_index, label_smoothing=self.eps,
                         softcap=self.softcap, z_loss=self.zl, class_axis=self.axis)
        # token accuracy is counted for class-index targets only (nan for probabilities)
        self.want_hit = self.return_token_accuracy and self.kind == "index"
        self.want_z_none = self.return_z_loss and self.reduction == "none"


class _Blocks:
    """The keys of position block ``b`` (x's block grid without the class axis) and of its
    class chunk ``k``."""

    def __init__(self, x, t, s, g_none, gkey):
        self.x_name, self.t_name, self.axis, self.kind = x.name, t.name, s.axis, s.kind
        self.g_none, self.gkey = g_none, gkey
        self.grid = _grid(tuple(n for i, n in enumerate(x.numblocks) if i != s.axis))
        # each axis's chunk boundaries, once (hashing x.chunks per chunk was quadratic)
        self.bounds = tuple(np.cumsum((0,) + c) for c in x.chunks)

    def x(self, b, k):
        return (self.x_name,) + b[:self.axis] + (k,) + b[self.axis:]

    def region(self, b, k):
        """The slices of the logits' chunk (b, k) (position block b, class chunk k)."""
        return tuple(slice(int(e[i]), int(e[i + 1]))
                     for e, i in zip(self.bounds, self.x(b, k)[1:]))

    def t(self, b, k):
        if self.kind == "index":
            return (self.t_name,) + b
        return (self.t_name,) + b[:self.axis] + (k,) + b[self.axis:]

    def g(self, b):
        return (self.g_none.name,) + b if self.g_none is not None else self.gkey


def _positions(chunks, axis):
    return tuple(c for i, c in enumerate(chunks) if i != axis)


def _check_target(x, t, axis, loss_shape, ignore_index):
    """(target kind "index" or "prob", the target rechunked to match x's chunks)."""
    if np.dtype(t.dtype).kind == "b":
        raise TypeError("fastce: target must hold integer class indices or float "
                        "probabilities, got a bool array")
    if np.dtype(t.dtype).kind == "f":
        if tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"fastce: float targets are class probabilities and must have the "
                             f"input's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if ignore_index >= 0:
            raise ValueError("fastce: ignore_index is not supported with probability targets "
                             "(as in torch, which accepts only a negative one)")
        return "prob", t.rechunk(x.chunks)
    if np.dtype(t.dtype).kind not in "iu":
        raise TypeError(f"fastce: target must be an integer (class index) or float "
                        f"(probability) array, got dtype {t.dtype}")
    if tuple(t.shape) != loss_shape:
        raise ValueError(f"fastce: class-index target must have shape {loss_shape} for "
                         f"input of shape {tuple(x.shape)}, got {tuple(t.shape)}")
    return "index", t.rechunk(_positions(x.chunks, axis))


def _ce_spec(x, target, weight, grad_output, *, ignore_index, reduction, label_smoothing,
             softcap, z_loss, class_axis, want_grad, **wants):
    """Check the arguments (metadata only); (spec, target rechunked, g_none, g_scalar)."""
    eps, cap, zl, ignore_index = _check_common(
        x, "input", target, grad_output, reduction=reduction, label_smoothing=label_smoothing,
        softcap=softcap, z_loss=z_loss, ignore_index=ignore_index, want_grad=want_grad)
    if x.ndim == 0:
        raise ValueError("fastce: input must have at least one dimension (the classes), got a "
                         "0-d array")
    axis = api._class_axis(x, class_axis)
    _check_known(x, "input")
    _check_known(target, "target")
    C = int(x.shape[axis])
    loss_shape = tuple(x.shape[:axis]) + tuple(x.shape[axis + 1:])
    kind, t = _check_target(x, target, axis, loss_shape, ignore_index)
    # a Dask weight's dtype is checked with its values; an in-memory one's here
    if weight is not None and not (is_dask_array(weight) and weight.ndim == 1
                                   and weight.shape[0] == C):
        api.check_weight_meta(weight, C)
    g_none, g_scalar = _split_grad(grad_output, reduction=reduction, want_grad=want_grad,
                                   position_chunks=_positions(x.chunks, axis),
                                   loss_shape=loss_shape)
    s = _Spec(ignore_index=ignore_index, reduction=reduction, eps=eps, cap=cap,
              softcap=softcap, zl=zl, axis=axis, C=C, kind=kind, loss_shape=loss_shape,
              dtype=np.dtype(x.dtype), want_grad=want_grad, **wants)
    return s, t, g_none, g_scalar


def _ce_denominators(G, s, t, wkey):
    if s.kind == "index":
        return _denominators(G, t, _grid(t.numblocks), wkey, C=s.C,
                             ignore_index=s.ignore_index, dtype=_compute_dtype(s.dtype))
    # probability targets: every position counts once
    n = float(math.prod(s.loss_shape))
    dn = (G.name("denominators"),)
    G.dsk[dn] = (n, n)
    return dn


def _on_one_thread(fn):
    """fn with fastce's kernels unsplit (cpu.serial): Dask runs the chunks in parallel."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with cpu.serial():
            return fn(*args, **kwargs)
    return run


def _per_chunk(fn, n_chunks):
    """A chunk task's function: on one thread when the graph has a chunk task per thread or
    more (Dask's threads, or its workers, are then the parallelism: splitting each task again
    put two threads on a core, 1.26x -> 1.11x the in-memory loss+grad at W1 in rows); split
    like an in-memory call when there are fewer chunks than threads."""
    return _on_one_thread(fn) if n_chunks >= cpu.num_threads() else fn


def _whole_class_tasks(G, s, x, blocks, wkey, dn, res, grad_name):
    """One chunk along the classes: each block runs the in-memory implementation."""
    fn = _per_chunk(partial(_block_whole, opts=s.opts, reduction=s.reduction,
                            want_loss=s.want_loss, want_grad=s.want_grad, want_hit=s.want_hit,
                            want_z=s.want_z_none, want_lse=s.return_lse),
                    len(blocks.grid))
    for b in blocks.grid:
        task = (fn, blocks.x(b, 0), blocks.t(b, 0), wkey, dn, blocks.g(b))
        if s.slab or s.out is not None:
            slab = _slab_arg(grad_name, x, s, b[0], blocks.region(b, 0))
            task = (partial(fn, slab=slab),) + task[1:]
        G.dsk[(res,) + b] = task
        if s.want_grad:
            G.dsk[(grad_name,) + blocks.x(b, 0)[1:]] = (operator.getitem, (res,) + b, "grad")


def _class_chunk_tasks(G, s, x, blocks, wkey, dn, res, grad_name):
    """Class chunks: mergeable statistics per chunk, merged per position block, finalized;
    each chunk's gradient reads the merged statistics.  With the gradient, each statistics
    task also keeps its chunk's exps, which the chunk's gradient task rescales in place (one
    exp per logit, as in memory, instead of two)."""
    nk = x.numblocks[s.axis]
    ci = np.cumsum((0,) + x.chunks[s.axis])
    sopts = {k: v for k, v in s.opts.items() if k != "z_loss"}
    n = len(blocks.grid) * nk
    stats = [_per_chunk(partial(_block_stats_exps if s.want_grad else _block_stats,
                                c0=int(ci[k]), C=s.C, opts=sopts, argmax=s.want_hit), n)
             for k in range(nk)]
    grads = [_per_chunk(partial(_block_grad_exps, c0=int(ci[k]), C=s.C, opts=s.opts,
                                reduction=s.reduction), n) for k in range(nk)]
    fin = partial(_block_finalize, C=s.C, ignore_index=s.ignore_index, z_loss=s.zl,
                  reduction=s.reduction, want_hit=s.want_hit, want_z=s.want_z_none,
                  want_lse=s.return_lse, dtype=s.dtype, own_dn=dn is None)
    sname = G.name("stats")
    for b in blocks.grid:
        skeys = [(sname,) + b + (k,) for k in range(nk)]
        for k in range(nk):
            fn = stats[k]
            if s.slab:              # the exps, then the gradient, in the chunk's tile
                fn = partial(fn, slab=_slab_arg(grad_name, x, s, b + (k,),
                                                blocks.region(b, k)))
            G.dsk[skeys[k]] = (fn, blocks.x(b, k), blocks.t(b, k), wkey)
        own = skeys
        if s.want_grad:                 # (statistics, exps) pairs: merge the statistics
            skeys = [(sname + "-only",) + b + (k,) for k in range(nk)]
            for k in range(nk):
                G.dsk[skeys[k]] = (operator.getitem, own[k], 0)
        merged = G.tree(skeys, _merge, "merge")
        G.dsk[(res,) + b] = (fin, merged, blocks.t(b, 0) if s.kind == "index" else None,
                             wkey)
        if s.want_grad:
            for k in range(nk):
                fn = grads[k]
                if s.out is not None and not s.slab:    # computed apart, copied into out
                    fn = partial(fn, slab=_Into(s.out, blocks.region(b, k)))
                G.dsk[(grad_name,) + blocks.x(b, k)[1:]] = (
                    fn, own[k], blocks.x(b, k), blocks.t(b, k), merged, wkey, dn, blocks.g(b))


def _ce_reduced(G, s, res, grid, dn):
    """Keys of the 0-d results: the blocks' sums in a fixed tree, divided by the
    denominators; {"loss", "z", "acc"} as wanted."""
    out = {}
    wants = {"loss": s.want_loss and s.reduction != "none",
             "z": s.return_z_loss and not s.want_z_none, "acc": s.want_hit}
    if any(wants.values()):
        keys = [(res,) + b for b in grid]
        if s.small_results:         # the tree reads the chunk results themselves
            total = G.tree(keys, _sum_tuples, "total", leaf=_group_sums)
        else:
            # A task per chunk picks its sums where the chunk ran (on a cluster the tree's
            # leaf would fetch whole chunk results, gradients included, from other workers).
            sums = _project(G, "sums", res, grid, operator.getitem, "sums")
            total = _tree_of(G, sums, grid, _sum_tuples, "total")
        fin = dict(reduction=s.reduction, z_loss=s.zl, dtype=s.dtype)
        for what, name in (("loss", "loss"), ("z", "zloss"), ("acc", "acc")):
            if wants[what]:
                out[what] = G.name(name)
                G.dsk[(out[what],)] = (partial(_final, what=what, **fin), total, dn)
    if s.return_token_accuracy and not s.want_hit:    # probability targets: nan, as in memory
        out["acc"] = G.name("acc")
        G.dsk[(out["acc"],)] = (np.asarray, math.nan)
    return out


def _ce_outputs(G, s, res, grid, dn):
    """Names of the result arrays' keys: per position block, or 0-d."""
    out = {}
    if s.want_loss and s.reduction == "none":
        out["loss"] = _project(G, "loss", res, grid, operator.getitem, "per")
    if s.return_lse:
        out["lse"] = _project(G, "lse", res, grid, operator.getitem, "lse")
    if s.want_z_none:
        out["z"] = _project(G, "zloss", res, grid, operator.getitem, "z")
    out.update(_ce_reduced(G, s, res, grid, dn))
    return out


def _ce_arrays(G, s, x, names, grad_name):
    """The lazy results, all from the one graph."""
    per_position = (_positions(x.chunks, s.axis), _meta(x, len(s.loss_shape), s.dtype))
    scalar = ((), _meta(x, 0, s.dtype))
    results = {}
    if s.want_grad:
        numpy = type(x._meta) is np.ndarray
        results["grad"] = G.array(grad_name, x.chunks, x._meta.astype(s.dtype), s.dtype,
                                  cls=_gradient_type() if numpy else None)
        if s.out is not None:
            results["grad"]._fastce_out = s.out
    for what in ("loss", "z"):
        if what in names:
            chunks, meta = per_position if s.reduction == "none" else scalar
            results[what] = G.array(names[what], chunks, meta, s.dtype)
    if "acc" in names:
        results["acc"] = G.array(names["acc"], (), np.empty(()), np.float64)
    if "lse" in names:
        results["lse"] = G.array(names["lse"], *per_position, s.dtype)
    return results


def _ce_return(s, results):
    if not s.want_loss:
        return results["grad"]
    loss = results["loss"]
    if s.return_z_loss or s.return_token_accuracy or s.return_lse:
        loss = api.CrossEntropyOutput(loss, results.get("z"), results.get("acc"),
                                      results.get("lse"))
    return (loss, results["grad"]) if s.want_grad else loss


def cross_entropy(input, target, weight, grad_output, *, ignore_index, reduction,
                  label_smoothing, softcap, z_loss, class_axis, want_loss, want_grad,
                  return_z_loss=False, return_token_accuracy=False, return_lse=False, out=None):
    """The Dask implementation behind fastce's cross-entropy entry points (lazy results)."""
    x = input
    if not is_dask_array(x):
        raise TypeError(f"fastce: 'target' is a Dask array but 'input' is not "
                        f"({type(x).__name__}); pass both as Dask arrays")
    weight = _small(weight, "weight")
    s, t, g_none, g_scalar = _ce_spec(
        x, target, weight, grad_output, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
        class_axis=class_axis, want_loss=want_loss, want_grad=want_grad,
        return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
        return_lse=return_lse)
    s.out = _check_out(out, x, s)
    G = _Graph(("ce", x.name, t.name, _token_of(weight), s.ignore_index, reduction, s.eps,
                s.cap, s.zl, s.axis, want_loss, want_grad, return_z_loss,
                return_token_accuracy, return_lse, _token_of(g_none), _token_of(g_scalar),
                None if out is None else uuid.uuid4().hex))     # (each out= call its own)
    G.deps += [x, t]
    wkey = G.data(weight, "weight")
    gkey = G.grad_output(g_scalar, g_none)
    # The gradient needs the denominators first; the forward sums its chunks' own.
    dn = _ce_denominators(G, s, t, wkey) if want_grad else None
    blocks = _Blocks(x, t, s, g_none, gkey)
    res = G.name("chunk")
    grad_name = G.name("grad") if want_grad else None
    s.slab = _slab_plan(x, s)
    if x.numblocks[s.axis] == 1:
        _whole_class_tasks(G, s, x, blocks, wkey, dn, res, grad_name)
    else:
        _class_chunk_tasks(G, s, x, blocks, wkey, dn, res, grad_name)
    # chunk results holding only their sums (no gradient, per-position loss or lse)
    s.small_results = (s.reduction != "none" and not s.return_lse
                       and not (want_grad and x.numblocks[s.axis] == 1))
    names = _ce_outputs(G, s, res, blocks.grid, dn)
    return _ce_return(s, _ce_arrays(G, s, x, names, grad_name))


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


def _check_linear_shapes(hidden, classifier, target):
    if hidden.ndim != 2:
        raise ValueError(f"fastce: hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}")
    _check_known(hidden, "hidden")
    N, H = hidden.shape
    if classifier.ndim != 2 or classifier.shape[1] != H:
        raise ValueError(f"fastce: classifier must have shape (V, H={H}) for hidden of shape "
                         f"{tuple(hidden.shape)}, got {tuple(classifier.shape)}")
    if np.dtype(target.dtype).kind not in "iu":
        raise TypeError("fastce: target must hold integer class indices")
    if tuple(target.shape) != (N,):
        raise ValueError(f"fastce: target must have shape (N,) = ({N},) for hidden of shape "
                         f"{tuple(hidden.shape)}, got {tuple(target.shape)}")


def _linear_loss(G, h, res, grid, dn, *, reduction, zl, want_grad):
    """(name, chunks, meta) of the loss: per row chunk ("none"), or the row chunks' sums in a
    fixed tree, divided by the denominators."""
    dtype = np.dtype(h.dtype)
    if reduction == "none":
        name = _project(G, "loss", res, grid, _pick, want_grad, 0)
        return name, (h.chunks[0],), _meta(h, 1, dtype)
    sums = _project(G, "sums", res, grid, _pick, want_grad, 0)
    total = _tree_of(G, sums, grid, _sum_tuples, "total")
    name = G.name("loss")
    G.dsk[(name,)] = (partial(_linear_final, reduction=reduction, z_loss=zl, dtype=dtype),
                      total, dn)
    return name, (), _meta(h, 0, dtype)


def _summed_grad(G, res, grid, index, part, what, suffix):
    """Name of one in-memory gradient (classifier, bias): the row chunks' parts summed in a
    fixed tree, under a key of ``suffix``'s single block."""
    parts = _project(G, part, res, grid, operator.getitem, index)
    root = _tree_of(G, parts, grid, _sum_arrays, what)
    name = G.name(what + "-out")
    G.dsk[(name,) + suffix] = (_identity, root)
    return name


def _linear_grad_tasks(G, res, grid, has_bias):
    """Names of the gradients' keys: hidden per row chunk; classifier and bias summed."""
    ghn = _project(G, "grad-hidden", res, grid, operator.getitem, 1, suffix=(0,))
    gcn = _summed_grad(G, res, grid, 2, "gc", "grad-classifier", (0, 0))
    gbn = _summed_grad(G, res, grid, 3, "gb", "grad-bias", (0,)) if has_bias else None
    return ghn, gcn, gbn


def _linear_grad_arrays(G, h, V, names):
    """The lazy gradients (hidden, classifier, bias or None)."""
    ghn, gcn, gbn = names
    H, dtype = h.shape[1], np.dtype(h.dtype)
    pooled = _gradient_type() if type(h._meta) is np.ndarray else None
    return (G.array(ghn, h.chunks, _meta(h, 2, dtype), dtype, cls=pooled),
            G.array(gcn, ((V,), (H,)), _meta(h, 2, dtype), dtype),
            G.array(gbn, ((V,),), _meta(h, 1, dtype), dtype) if gbn is not None else None)


def linear_cross_entropy(hidden, classifier, target, bias, weight, grad_output, *,
                         ignore_index, reduction, label_smoothing, softcap, z_loss, chunk_size,
                         want_grad):
    """Dask ``hidden`` (N, H) chunked by rows, the classifier (and bias) in memory: per-chunk
    fused loss and gradients; d_classifier and d_bias summed in a fixed tree."""
    if not is_dask_array(hidden):
        raise TypeError("fastce: 'target' is a Dask array but 'hidden' is not; pass both as "
                        "Dask arrays")
    eps, cap, zl, ignore_index = _check_common(
        hidden, "hidden", target, grad_output, reduction=reduction,
        label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss,
        ignore_index=ignore_index, want_grad=want_grad)
    classifier, bias, weight = (_small(v, n) for v, n in ((classifier, "classifier"),
                                                          (bias, "bias"), (weight, "weight")))
    _check_linear_shapes(hidden, classifier, target)
    V, H = int(classifier.shape[0]), hidden.shape[1]
    h = hidden.rechunk((hidden.chunks[0], (H,)))
    t = target.rechunk((h.chunks[0],))
    g_none, g_scalar = _split_grad(grad_output, reduction=reduction, want_grad=want_grad,
                                   position_chunks=(h.chunks[0],))
    G = _Graph(("lin", h.name, t.name, _token_of(classifier), _token_of(bias),
                _token_of(weight), ignore_index, reduction, eps, cap, zl, chunk_size,
                want_grad, _token_of(g_none), _token_of(g_scalar)))
    G.deps += [h, t]
    ckey, bkey, wkey = (G.data(v, n) for v, n in ((classifier, "classifier"), (bias, "bias"),
                                                  (weight, "weight")))
    gkey = G.grad_output(g_scalar, g_none)
    grid = _grid(h.numblocks[:1])
    dn = _denominators(G, t, grid, wkey, C=V, ignore_index=ignore_index,
                       dtype=_compute_dtype(np.dtype(h.dtype)))
    res = G.name("chunk")
    fn = partial(_block_linear, opts=dict(ignore_index=ignore_index, label_smoothing=eps,
                                          softcap=softcap, z_loss=zl, chunk_size=chunk_size),
                 reduction=reduction, want_grad=want_grad)
    for b in grid:
        gk = (g_none.name,) + b if g_none is not None else gkey
        G.dsk[(res,) + b] = (fn, (h.name,) + b + (0,), (t.name,) + b, ckey, bkey, wkey, dn, gk)
    loss = _linear_loss(G, h, res, grid, dn, reduction=reduction, zl=zl, want_grad=want_grad)
    grads = _linear_grad_tasks(G, res, grid, bias is not None) if want_grad else None
    # the arrays are made once every task is in the graph
    loss = G.array(*loss, np.dtype(h.dtype))
    return (loss,) + _linear_grad_arrays(G, h, V, grads) if want_grad else loss


def _pick(r, want_grad, i):
    return r[i] if want_grad else r


def _identity(a):
    return a
