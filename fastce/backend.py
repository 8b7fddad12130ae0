"""The backend protocol: everything fastce.api (and fastce.softmax) asks of an array backend.

A backend owns its arrays and all arithmetic on them; the entry points only check metadata
(``shape``, ``ndim``, ``size``, ``dtype``), ``reshape`` C-contiguous arrays and take basic
slices, and call the operations below.  That keeps the GPU backend free of any NumPy
emulation and is the whole contract a new backend (Dask, another device) implements:

- ``fastce.cpu.CPUBackend``: NumPy arrays, Numba ``@njit`` kernels.
- ``fastce.gpu.GPUBackend``: Numba device arrays (CuPy and other ``__cuda_array_interface__``
  arrays are viewed as such), Numba ``@cuda.jit`` kernels.

fastce.dispatch picks the backend from the argument arrays; a protocol (rather than a base
class) because the backends share no code, only this shape.  It lives in its own module so
that dispatch, api and every backend can import it without importing one another.

Conventions: ``N, C, S`` are the canonical view's positions-before, classes, positions-after
(``x3`` is (N, C, S), ``t2`` the (N, S) targets); "per-element" arrays are (N, S) float64;
dtypes are NumPy dtypes; every array returned is C-contiguous.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """The operations the entry points need, grouped as the call path uses them."""

    #: Words for error messages: what ``out=`` must be ("a NumPy array", ...).
    array_kind: str
    #: ``index_loss(..., fuse_stats=True)`` validates the targets and returns their statistics
    #: in the loss pass itself (else the entry point calls ``target_stats`` first).
    fuses_target_stats: bool
    #: With ``check_targets=False`` the target statistics stay where the kernels run (the GPU):
    #: ``target_stats(..., on_device=True)``, ``total_device``, ``grad_den``,
    #: ``index_loss(..., den=)`` and ``reduce_loss(..., dev_den=)`` exist, and the index kernels make a bad target's loss
    #: terms and gradient row nan themselves.  Otherwise the entry points read the statistics
    #: and poison those outputs on the host.
    defers_target_stats: bool
    #: Logits may be ``ml_dtypes.bfloat16`` (losses then float32, the gradient bfloat16).
    reads_bfloat16: bool
    #: The loss kernels read float16 logits as they are and write a float16 gradient (computing
    #: in float32); otherwise the entry points hand them a float32 copy.
    reads_float16: bool
    #: ``cast`` accepts complex arrays, dropping the imaginary part (torch's ``dtype=``).
    casts_complex: bool

    # -- 1. Arguments in: views, copies, host reads ------------------------------------------
    def is_array(self, a) -> bool:
        """``a`` is an array of this backend as passed by a caller (for ``out=``)."""

    def asarray(self, a):
        """The backend's array for an argument (no copy when its memory allows)."""

    def contiguous(self, a):
        """``a`` C-contiguous (a copy only when it is not)."""

    def cast(self, a, dtype):
        """``a`` C-contiguous in ``dtype`` (no copy when it already is)."""

    def copy(self, a):
        """A new C-contiguous copy of ``a``."""

    def element(self, a, pos):
        """The element at flat (C-order) position ``pos``, as a Python scalar."""

    def to_host(self, a):
        """``a`` as a NumPy array."""

    def first_above(self, t, limit) -> int:
        """Flat position of the first element of ``t`` above ``limit``, or -1."""

    def is_writeable_c_contiguous(self, a) -> bool:
        """The caller's array ``a`` (not a copy of it) can take results in place."""

    def same_memory(self, a, b) -> bool:
        """``a`` and ``b`` (C-contiguous) are the same bytes."""

    def may_share_memory(self, a, b) -> bool:
        """``a`` and ``b`` may overlap (then one is read through a copy)."""

    # -- 2. Creation ------------------------------------------------------------------------
    def empty(self, shape, dtype): ...

    def zeros(self, shape, dtype): ...

    def ones(self, shape, dtype):
        """Ones; may be cached and shared, so callers only read them."""

    def full(self, shape, value, dtype): ...

    # -- 3. Targets -------------------------------------------------------------------------
    def target_stats(self, t2, w, ignore_index, C):
        """(D, count, bad): the sum of the non-ignored targets' weights ``w[t]`` (float), their
        number, and the flat position of the first target outside [0, C) that is not
        ``ignore_index`` (-1 when all are valid).  Deferring backends, ``on_device=True``:
        the three numbers as a (3,) float64 array where the kernels run, not read back (no
        bad target: the third is ``t2.size``)."""

    def grad_den(self, stats, mean, w_sum=None):
        """Deferring backends: ``index_loss``'s den, where the kernels run: (1/D, 1/Dz) of
        ``target_stats(..., on_device=True)`` as ``fastce.options.ieee_div`` gives them (ones
        unless ``mean``), then the weights' sum ``w_sum`` (``total_device``'s) if given."""

    def total_device(self, a):
        """Deferring backends: ``total(a)`` as a (1,) float64 array where the kernels run."""

    # -- 4. The loss kernels ----------------------------------------------------------------
    def index_loss(self, x3, t2, w, opts, ignore_index, grad, g, g_stride, per_position=True,
                   fuse_stats=False, lse_out=None, den=None):
        """Class-index targets: (ce, z_loss, hit, stats).  ce and z_loss are per-element
        float64 (or partial sums when not ``per_position``: only their ``total`` is read),
        hit the per-element argmax hits (when ``opts.want_hits``).  Writes d loss / d x3,
        scaled by the upstream gradient ``g`` (``g_stride`` 0: one scalar), into ``grad``
        (N, C, S) when it is given.  ``stats``: ``target_stats``'s triple when ``fuse_stats``,
        else None.  ``opts`` is a ``fastce.options.LossOptions``.  ``lse_out`` (N, S) float64,
        when given, receives each element's log-sum-exp over C (of the softcapped logits
        with softcap) from the same pass.  ``den`` (deferring backends): ``grad_den``'s
        factors of ``opts.grad_scale`` and ``opts.z_grad`` (and the weights' sum, used
        instead of ``opts.weight_sum``)."""

    def prob_loss(self, x3, p3, w, opts, grad, g, g_stride, lse_out=None):
        """Probability targets ``p3`` (N, C, S): (ce, z_loss) as ``index_loss``."""

    def nll_loss(self, x3, t2, w, ignore_index):
        """Per-element ``-w[t] * x3[n, t, s]`` (0 where ignored), float64 (N, S); the targets
        are validated beforehand (deferring backends, check_targets=False: nan where bad)."""

    # -- 5. The softmax family --------------------------------------------------------------
    def softmax_family(self, x3, mode):
        """(out, lse): lse the per-element float64 log-sum-exp over C; out log_softmax
        (mode 1) or softmax (mode 2) of x3 in its dtype (mode 0: out unspecified)."""

    def lse_sign(self, lse):
        """SciPy's sign of an unweighted log-sum-exp: 0 where -inf, NaN where NaN, else 1."""

    def lse_weighted(self, x2, b2, signed):
        """scipy's ``logsumexp(x2, b=b2, axis=1, return_sign=True)`` of (N, C) rows, float64."""

    def transpose_copy(self, x, perm):
        """A C-contiguous copy of ``x`` with its axes permuted."""

    def broadcast_copy(self, x, shape):
        """A C-contiguous copy of ``x`` broadcast to ``shape``."""

    # -- 6. Results -------------------------------------------------------------------------
    def total(self, a) -> float:
        """Deterministic float64 sum (fixed order: the same bits on every call)."""

    def scalar(self, value, dtype):
        """The loss of a mean/sum reduction, a scalar of ``dtype``."""

    def reduce_loss(self, ce, zl, mean, D, Dz, dtype, dev_den=None, ieee=False):
        """The loss of a mean/sum reduction from per-element (or partial) float64 losses, a
        scalar of ``dtype``: ``total(ce)``, divided by ``D`` for the mean
        (``fastce.options.mean_div``), plus ``total(zl)`` (divided by ``Dz``:
        ``ieee_div``) unless ``zl`` is None.  Where the arrays live: on the GPU it stays
        there (no host round trip).  ``dev_den`` (deferring backends): an array where the
        kernels run holding D (and Dz), used instead of the host's numbers.  ``ieee``: the mean
        is ``ieee_div`` (nll_loss's: +-inf where D == 0 but the total is not)."""

    def finish_per_position(self, ce, zl, shape, dtype):
        """The unreduced loss: ``ce + zl`` (``zl`` may be None) as ``shape`` in ``dtype``."""

    def wrap(self, a, like, unwrap_0d=False):
        """A result ``a`` (or None) in the array type of the caller's ``like``; a 0-d result
        becomes a scalar when ``unwrap_0d`` and the backend's arrays have scalars (NumPy)."""
