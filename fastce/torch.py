"""fastce inside PyTorch training: autograd-aware ``cross_entropy``, ``CrossEntropyLoss`` and
``linear_cross_entropy`` for torch tensors.

``import fastce`` never imports torch; ``import fastce.torch`` does (torch is optional).

Every function is a ``torch.library.custom_op`` (namespace ``fastce``) with a registered fake
(meta) implementation and autograd formula, so it composes with ``torch.compile(fullgraph=True)``
(the op is an opaque call inside the compiled graph: no graph break) and is checked by
``torch.library.opcheck`` and ``torch.autograd.gradcheck`` in the tests.  Eager
``cross_entropy`` calls on plain tensors run the same op bodies, setup and backward in a
``torch.autograd.Function`` instead: the custom-op dispatch cost ~170 us a step.

Data path (no copies for contiguous float32/float64 CPU tensors):

- CPU tensors are handed to fastce's Numba kernels as NumPy views (``tensor.numpy()``); the
  gradient is written by fastce straight into a tensor that torch allocated
  (``fastce.cross_entropy_with_grad(..., out=grad.numpy())``), and results come back with
  ``torch.from_numpy`` (no copy).  Non-contiguous inputs are made contiguous by torch first.
- float16 and bfloat16 tensors are computed in float32 (a float32 copy made by torch; fastce's
  CPU kernels compute float16 in float32 too); loss and gradient come back in the input's dtype.
- CUDA tensors go to fastce's numba.cuda backend through ``__cuda_array_interface__`` (no copy).
  That path needs numba-cuda (and CuPy for ``linear_cross_entropy``) and is NOT TESTED ON
  HARDWARE: fastce's kernels run on torch's current stream (made CuPy's current stream for the
  call); without CuPy, on the default stream, a side stream synchronised before and after.

Saved for backward (``cross_entropy``):

- ``fused=False`` (default): the forward computes the loss only (fastce's forward kernel reads
  the logits once) and saves references to the inputs (no new memory: the logits tensor is kept
  alive, as torch's own cross-entropy keeps its log-softmax); the backward runs
  ``fastce.cross_entropy_backward`` with the upstream gradient folded into the kernel, writing
  into a fresh torch tensor.  One extra read of the logits compared with ``fused=True``.
- ``fused=True``: the forward computes loss and gradient in one pass
  (``fastce.cross_entropy_with_grad``) and saves the gradient (input-sized; the logits
  themselves may then be freed).  The backward returns that gradient as is when the upstream
  gradient is exactly 1 (eager CPU: the usual ``loss.backward()``), else ``grad * grad_output``
  (one pass over it, out of place so that ``retain_graph=True`` stays correct).  Fastest for a
  plain ``loss.backward()``; the gradient is computed even if no backward follows, so use it
  only for training steps (without grad mode, or when the input does not require grad, both
  settings run the forward only).

``linear_cross_entropy`` always computes its three gradients in the forward for "mean"/"sum"
(they are small: hidden, classifier and bias sized; the backward scales them by the upstream
scalar) and recomputes the chunked logits in the backward for "none" (a per-row upstream
gradient cannot be applied afterwards).

No gradient flows to ``target`` or ``weight`` (requiring one raises); no double backward.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

import fastce as _fastce
from fastce import _alloc
from fastce.linear import linear_cross_entropy as _np_linear_ce
from fastce.linear import linear_cross_entropy_with_grad as _np_linear_ce_with_grad

__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy"]

_LOW = (torch.float16, torch.bfloat16)          # computed in float32
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Tensor <-> fastce array conversions
# ---------------------------------------------------------------------------------------------
def _check_cuda():
    try:
        from numba import cuda
    except ImportError:                                     # pragma: no cover
        cuda = None
    if cuda is None or not cuda.is_available():
        raise RuntimeError(
            "fastce.torch: CUDA tensors need fastce's GPU backend: numba-cuda with a working "
            "CUDA driver (and CuPy for linear_cross_entropy): pip install 'fastce[cuda]'")


class _Stream:
    """Run fastce's GPU work on torch's current stream.  fastce runs on CuPy's current stream,
    so a side stream of torch's becomes CuPy's for the call (nothing waits on the host).
    Without CuPy fastce runs on the default stream: a side stream is then synchronised before
    and after the call.  Untested on hardware."""

    def __init__(self, device):
        self.device = device
        self.sync = False
        self.cupy_stream = None

    def __enter__(self):
        if self.device.type == "cuda":
            _check_cuda()
            cur = torch.cuda.current_stream(self.device)
            if cur != torch.cuda.default_stream(self.device):
                try:
                    import cupy
                except ImportError:
                    cupy = None
                if cupy is not None:
                    self.cupy_stream = cupy.cuda.ExternalStream(cur.cuda_stream)
                    self.cupy_stream.__enter__()
                else:
                    self.sync = True
                    cur.synchronize()
        return self

    def __exit__(self, *exc):
        if self.cupy_stream is not None:
            self.cupy_stream.__exit__(*exc)
        if self.sync:
            torch.cuda.default_stream(self.device).synchronize()
        return False


def _arr(t: Optional[Tensor], dtype=None):
    """A fastce-ready view of a tensor: NumPy on the CPU (no copy when contiguous), the tensor
    itself (``__cuda_array_interface__``) on a CUDA device."""
    if t is None:
        return None
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    t = t.contiguous()
    if t.device.type == "cpu":
        return t.numpy()
    if t.device.type == "cuda":
        return t
    raise TypeError(f"fastce.torch: tensors must be on the CPU or a CUDA device, got "
                    f"{t.device}")


def _tensor(a, like: Tensor, dtype=None):
    """A fastce result (NumPy array/scalar, CUDA array) as a tensor on like's device."""
    if isinstance(a, Tensor):
        t = a
    elif isinstance(a, (np.ndarray, np.generic)):
        a = np.asarray(a)
        if not a.flags.writeable:
            a = a.copy()
        t = torch.from_numpy(a)
    elif hasattr(a, "__cuda_array_interface__"):
        t = torch.as_tensor(a, device=like.device)
    else:                                                   # a Python float
        t = torch.tensor(a, device=like.device)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t


def _compute_dtype(dtype):
    return torch.float32 if dtype in _LOW else dtype


def _weight(weight, dtype):
    return None if weight is None else _arr(weight, _compute_dtype(dtype) if weight.is_floating_point() else None)


def _target(target, dtype):
    if target.is_floating_point():                          # probabilities
        return _arr(target, _compute_dtype(dtype))
    return _arr(target)


def _loss_shape(input: Tensor, class_axis: int):
    if input.dim() <= 1:
        return ()
    axis = class_axis % input.dim()
    return tuple(input.shape[:axis]) + tuple(input.shape[axis + 1:])


def _opts(ignore_index, reduction, label_smoothing, softcap, z_loss, class_axis,
          check_targets=True):
    return dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                softcap=softcap, z_loss=z_loss, class_axis=class_axis,
                check_targets=check_targets)


# ---------------------------------------------------------------------------------------------
# Custom ops: cross_entropy (forward), cross_entropy_fused (loss + grad), cross_entropy_backward
# ---------------------------------------------------------------------------------------------
def _ce_impl(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
             reduction: str, label_smoothing: float, softcap: Optional[float], z_loss: float,
             class_axis: int, check_targets: bool) -> Tensor:
    cdt = _compute_dtype(input.dtype)
    with _Stream(input.device):
        loss = _fastce.cross_entropy(
            _arr(input, cdt), _target(target, input.dtype), _weight(weight, input.dtype),
            **_opts(ignore_index, reduction, label_smoothing, softcap, z_loss, class_axis,
                    check_targets))
    return _tensor(loss, input, input.dtype)


_ce_op = torch.library.custom_op("fastce::cross_entropy", mutates_args=())(_ce_impl)


@_ce_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, softcap, z_loss,
      class_axis, check_targets):
    shape = _loss_shape(input, class_axis) if reduction == "none" else ()
    return input.new_empty(shape)


_NP = {torch.float32: np.float32, torch.float64: np.float64}


def _host_empty(shape, dtype):
    """An uninitialised CPU tensor; a large one on transparent huge pages (fastce._alloc)."""
    if dtype not in _NP:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(_alloc.empty(shape, _NP[dtype]))


def _grad_buffer(input: Tensor, cdt):
    """Where fastce writes the gradient: a new contiguous tensor (CPU float32 / float64:
    written in place through its NumPy view), or None (fastce allocates)."""
    if input.device.type == "cpu" and cdt != torch.float16:
        return _host_empty(tuple(input.shape), cdt)
    if input.device.type == "cuda":
        return torch.empty(input.shape, dtype=cdt, device=input.device)
    return None


def _ce_fused_impl(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                   reduction: str, label_smoothing: float, softcap: Optional[float],
                   z_loss: float, class_axis: int,
                   check_targets: bool) -> tuple[Tensor, Tensor]:
    cdt = _compute_dtype(input.dtype)
    buf = _grad_buffer(input, cdt)
    with _Stream(input.device):
        loss, grad = _fastce.cross_entropy_with_grad(
            _arr(input, cdt), _target(target, input.dtype), _weight(weight, input.dtype),
            out=None if buf is None else _arr(buf),
            **_opts(ignore_index, reduction, label_smoothing, softcap, z_loss, class_axis,
                    check_targets))
    grad = buf if buf is not None else _tensor(grad, input)
    return _tensor(loss, input, input.dtype), grad.to(input.dtype)


_ce_fused_op = torch.library.custom_op("fastce::cross_entropy_fused",
                                       mutates_args=())(_ce_fused_impl)


@_ce_fused_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, softcap, z_loss,
      class_axis, check_targets):
    shape = _loss_shape(input, class_axis) if reduction == "none" else ()
    return input.new_empty(shape), torch.empty_like(input, memory_format=torch.contiguous_format)


def _ce_backward_impl(grad_output: Tensor, input: Tensor, target: Tensor,
                      weight: Optional[Tensor], ignore_index: int, reduction: str,
                      label_smoothing: float, softcap: Optional[float], z_loss: float,
                      class_axis: int, check_targets: bool) -> Tensor:
    cdt = _compute_dtype(input.dtype)
    buf = _grad_buffer(input, cdt)
    go = grad_output
    if go.device.type == "cpu" and go.dim() == 0:
        go = float(go)                          # a scalar: no array traffic
    else:
        go = _arr(go, go.dtype if go.dtype in (torch.float32, torch.float64) else torch.float32)
    with _Stream(input.device):
        grad = _fastce.cross_entropy_backward(
            _arr(input, cdt), _target(target, input.dtype), go, _weight(weight, input.dtype),
            out=None if buf is None else _arr(buf),
            **_opts(ignore_index, reduction, label_smoothing, softcap, z_loss, class_axis,
                    check_targets))
    grad = buf if buf is not None else _tensor(grad, input)
    return grad.to(input.dtype)


_ce_backward_op = torch.library.custom_op("fastce::cross_entropy_backward",
                                          mutates_args=())(_ce_backward_impl)


@_ce_backward_op.register_fake
def _(grad_output, input, target, weight, ignore_index, reduction, label_smoothing, softcap,
      z_loss, class_axis, check_targets):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


_OPT_NAMES = ("ignore_index", "reduction", "label_smoothing", "softcap", "z_loss", "class_axis",
              "check_targets")


def _ce_setup(ctx, inputs, output):
    input, target, weight, *opts = inputs
    ctx.opts = opts
    ctx.save_for_backward(input, target, weight)


def _ce_backward(ctx, grad):
    input, target, weight = ctx.saved_tensors
    gi = None
    if ctx.needs_input_grad[0]:
        backward = _ce_backward_impl if _eager(grad, input) else _ce_backward_op
        gi = backward(grad, input, target, weight, *ctx.opts)
    return (gi, None, None) + (None,) * len(_OPT_NAMES)


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup)


def _is_one(g: Tensor) -> bool:
    """True when g is an eager CPU scalar tensor equal to 1 (checking costs no device sync and
    no graph break: under tracing / subclasses / CUDA it answers False)."""
    return (type(g) is Tensor and g.device.type == "cpu" and g.numel() == 1
            and not torch._C._functorch.is_functorch_wrapped_tensor(g) and bool(g == 1))


def _fused_setup(ctx, inputs, output):
    input, target, weight, *opts = inputs
    ctx.opts = opts
    ctx.class_axis = 0 if input.dim() <= 1 else opts[_OPT_NAMES.index("class_axis")] % input.dim()
    ctx.reduction = opts[1]
    # No zeros for the (non-differentiable) gradient output: an input-sized fill per backward.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _fused_backward(ctx, grad, _unused):
    (saved,) = ctx.saved_tensors
    gi = None
    if grad is None:
        return (None,) * (3 + len(_OPT_NAMES))
    if ctx.needs_input_grad[0]:
        if ctx.reduction == "none":
            g = grad.unsqueeze(ctx.class_axis) if saved.dim() > 1 else grad
            gi = saved * g
        elif _is_one(grad):
            gi = saved
        else:
            gi = saved * grad
    return (gi, None, None) + (None,) * len(_OPT_NAMES)


_ce_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


# Eager calls skip torch's custom-op dispatch (schema defaults, fake-tensor and alias checks,
# redispatch through autograd: ~170 of the ~410 us of a (256, 10) forward + backward on the
# EPYC, against torch's own 85 us): the same bodies, setup and backward in a
# torch.autograd.Function.
# torch.compile, tracing and functorch transforms see the custom ops.
def _eager(*tensors):
    """Whether a call on ``tensors`` may run the ops' bodies directly: plain tensors, no
    torch.compile / tracing / functorch transform in progress."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(t is None or (type(t) is Tensor and not wrapped(t)) for t in tensors)


class _EagerCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        loss = _ce_impl(*inputs)
        _ce_setup(ctx, inputs, loss)
        return loss

    backward = staticmethod(_ce_backward)


class _EagerCrossEntropyFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        output = _ce_fused_impl(*inputs)
        _fused_setup(ctx, inputs, output)
        return output

    backward = staticmethod(_fused_backward)


# ---------------------------------------------------------------------------------------------
# Public: cross_entropy, CrossEntropyLoss
# ---------------------------------------------------------------------------------------------
def _check_input(input, name="input"):
    if not isinstance(input, Tensor):
        raise TypeError(f"fastce.torch: {name} must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOATS:
        raise TypeError(f"fastce.torch: {name} must be a float16, bfloat16, float32 or float64 "
                        f"tensor, got {input.dtype}")


def _no_grad_to(name, t):
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"fastce.torch: no gradient flows to {name!r} (it requires grad); detach it "
            f"({name}.detach()) or use torch.nn.functional.cross_entropy")


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, *,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, softcap: Optional[float] = None,
                  z_loss: float = 0.0, class_axis: Optional[int] = None,
                  fused: bool = False, check_targets: bool = True) -> Tensor:
    """``torch.nn.functional.cross_entropy`` on fastce's kernels, differentiable in ``input``.

    input: logits (C,), (N, C) or (N, C, d1, ...), or any layout with ``class_axis`` naming
    the class axis (default None: torch's 1, or 0 for 1-D input; ``class_axis=-1`` for
    (B, T, V) logits: no transposed copy); float16,
    bfloat16 (both computed in float32), float32 or float64.  target: integer class indices
    (input's shape minus the class axis) or float probabilities (input's shape).  weight: (C,)
    class weights.  ignore_index, reduction, label_smoothing: as in torch.  softcap: Gemma-2
    logit soft-capping ``softcap * tanh(x / softcap)``; z_loss: PaLM's ``z_loss * lse**2``.
    fused: compute the gradient in the forward (see the module docstring).
    check_targets: False gives nan results at bad targets instead of an error, and on CUDA no
    wait for the check (see ``fastce.cross_entropy``).

    No gradient flows to target or weight.
    """
    _check_input(input)
    _no_grad_to("target", target)
    _no_grad_to("weight", weight)
    args = (input, target, weight, int(ignore_index), str(reduction), float(label_smoothing),
            None if softcap is None else float(softcap), float(z_loss),
            (1 if input.dim() > 1 else 0) if class_axis is None else int(class_axis),
            _fastce.api.check_targets_flag(check_targets))
    eager = _eager(input, target, weight)
    if fused and input.requires_grad and torch.is_grad_enabled():
        loss, _ = (_EagerCrossEntropyFused.apply if eager else _ce_fused_op)(*args)
        return loss
    return (_EagerCrossEntropy.apply if eager else _ce_op)(*args)


class CrossEntropyLoss(torch.nn.Module):
    """``torch.nn.CrossEntropyLoss`` on fastce: ``CrossEntropyLoss(weight, ...)(input, target)``.

    ``weight`` is a buffer (it follows ``.to(device)``); options are those of
    ``fastce.torch.cross_entropy``."""

    def __init__(self, weight: Optional[Tensor] = None, *, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0,
                 softcap: Optional[float] = None, z_loss: float = 0.0,
                 class_axis: Optional[int] = None,
                 fused: bool = False, check_targets: bool = True):
        super().__init__()
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"fastce: reduction must be one of ('none', 'mean', 'sum'), got "
                             f"{reduction!r}")
        self.register_buffer("weight", weight)
        values = (ignore_index, reduction, label_smoothing, softcap, z_loss, class_axis, fused,
                  check_targets)
        for name, value in zip(self._OPTIONS, values):
            setattr(self, name, value)

    _OPTIONS = ("ignore_index", "reduction", "label_smoothing", "softcap", "z_loss",
                "class_axis", "fused", "check_targets")

    def _options(self):
        return {name: getattr(self, name) for name in self._OPTIONS}

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, self.weight, **self._options())

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items())


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy: custom ops and autograd
# ---------------------------------------------------------------------------------------------
def _linear_module(hidden: Tensor):
    """(array converter, result converter) for fastce.linear: NumPy views on the CPU, CuPy
    views (zero-copy through __cuda_array_interface__) on CUDA devices (untested on hardware)."""
    if hidden.device.type == "cpu":
        return _arr
    _check_cuda()
    try:
        import cupy
    except ImportError:
        raise RuntimeError("fastce.torch: linear_cross_entropy on CUDA tensors needs CuPy "
                           "(cuBLAS): pip install 'fastce[cuda]'") from None

    def conv(t, dtype=None):
        a = _arr(t, dtype)
        return None if a is None else cupy.asarray(a)
    return conv


def _lin_args(hidden, classifier, target, bias, weight):
    cdt = _compute_dtype(hidden.dtype)
    conv = _linear_module(hidden)
    return (conv(hidden, cdt), conv(classifier, cdt), conv(target),
            conv(bias, cdt), None if weight is None else conv(weight, cdt))


def _lin_opts(ignore_index, reduction, label_smoothing, softcap, z_loss, chunk_size):
    return dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                softcap=softcap, z_loss=z_loss, chunk_size=chunk_size)


@torch.library.custom_op("fastce::linear_cross_entropy", mutates_args=())
def _lin_op(hidden: Tensor, classifier: Tensor, target: Tensor, bias: Optional[Tensor],
            weight: Optional[Tensor], ignore_index: int, reduction: str,
            label_smoothing: float, softcap: Optional[float], z_loss: float,
            chunk_size: Optional[int]) -> Tensor:
    h, c, t, b, w = _lin_args(hidden, classifier, target, bias, weight)
    with _Stream(hidden.device):
        loss = _np_linear_ce(h, c, t, b, weight=w, **_lin_opts(
            ignore_index, reduction, label_smoothing, softcap, z_loss, chunk_size))
    return _tensor(loss, hidden, hidden.dtype)


@_lin_op.register_fake
def _(hidden, classifier, target, bias, weight, ignore_index, reduction, label_smoothing,
      softcap, z_loss, chunk_size):
    return hidden.new_empty((hidden.shape[0],) if reduction == "none" else ())


def _lin_grads(grad_output, hidden, classifier, target, bias, weight, opts):
    h, c, t, b, w = _lin_args(hidden, classifier, target, bias, weight)
    if grad_output is not None:
        grad_output = _arr(grad_output, torch.float64) if grad_output.dim() else float(grad_output)
        if hidden.device.type == "cuda" and not isinstance(grad_output, float):
            import cupy
            grad_output = cupy.asarray(grad_output)
    with _Stream(hidden.device):
        loss, gh, gc, gb = _np_linear_ce_with_grad(h, c, t, b, weight=w,
                                                   grad_output=grad_output, **opts)
    dt = hidden.dtype
    gb = _tensor(gb, hidden, dt) if gb is not None else hidden.new_empty((0,))
    return (_tensor(loss, hidden, dt), _tensor(gh, hidden, dt), _tensor(gc, hidden, dt), gb)


@torch.library.custom_op("fastce::linear_cross_entropy_fused", mutates_args=())
def _lin_fused_op(hidden: Tensor, classifier: Tensor, target: Tensor, bias: Optional[Tensor],
                  weight: Optional[Tensor], ignore_index: int, reduction: str,
                  label_smoothing: float, softcap: Optional[float], z_loss: float,
                  chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_classifier, grad_bias or an empty tensor); mean/sum only."""
    return _lin_grads(None, hidden, classifier, target, bias, weight, _lin_opts(
        ignore_index, reduction, label_smoothing, softcap, z_loss, chunk_size))


@_lin_fused_op.register_fake
def _(hidden, classifier, target, bias, weight, ignore_index, reduction, label_smoothing,
      softcap, z_loss, chunk_size):
    V = classifier.shape[0]
    return (hidden.new_empty(()), torch.empty_like(hidden), torch.empty_like(classifier),
            hidden.new_empty((V,) if bias is not None else (0,)))


@torch.library.custom_op("fastce::linear_cross_entropy_backward", mutates_args=())
def _lin_backward_op(grad_output: Tensor, hidden: Tensor, classifier: Tensor, target: Tensor,
                     bias: Optional[Tensor], weight: Optional[Tensor], ignore_index: int,
                     reduction: str, label_smoothing: float, softcap: Optional[float],
                     z_loss: float, chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_classifier, grad_bias or an empty tensor) for a given upstream
    gradient: recomputes the chunked logits (used for reduction='none')."""
    _, gh, gc, gb = _lin_grads(grad_output, hidden, classifier, target, bias, weight, _lin_opts(
        ignore_index, reduction, label_smoothing, softcap, z_loss, chunk_size))
    return gh, gc, gb


@_lin_backward_op.register_fake
def _(grad_output, hidden, classifier, target, bias, weight, ignore_index, reduction,
      label_smoothing, softcap, z_loss, chunk_size):
    V = classifier.shape[0]
    return (torch.empty_like(hidden), torch.empty_like(classifier),
            hidden.new_empty((V,) if bias is not None else (0,)))


def _lin_setup(ctx, inputs, output):
    hidden, classifier, target, bias, weight, *opts = inputs
    ctx.opts = opts
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, classifier, target, bias, weight)


def _lin_backward(ctx, grad):
    hidden, classifier, target, bias, weight = ctx.saved_tensors
    gh, gc, gb = _lin_backward_op(grad, hidden, classifier, target, bias, weight, *ctx.opts)
    n = ctx.needs_input_grad
    return (gh if n[0] else None, gc if n[1] else None, None,
            gb if (ctx.has_bias and n[3]) else None, None) + (None,) * 6


_lin_op.register_autograd(_lin_backward, setup_context=_lin_setup)


def _lin_fused_setup(ctx, inputs, output):
    ctx.has_bias = inputs[3] is not None
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])


def _scaled(saved, g):
    return saved if _is_one(g) else saved * g


def _lin_fused_backward(ctx, grad, *_unused):
    gh, gc, gb = ctx.saved_tensors
    n = ctx.needs_input_grad
    if grad is None:
        return (None,) * 11
    return (_scaled(gh, grad) if n[0] else None, _scaled(gc, grad) if n[1] else None, None,
            _scaled(gb, grad) if (ctx.has_bias and n[3]) else None, None) + (None,) * 6


_lin_fused_op.register_autograd(_lin_fused_backward, setup_context=_lin_fused_setup)


def linear_cross_entropy(hidden: Tensor, classifier: Tensor, target: Tensor,
                         bias: Optional[Tensor] = None, *, weight: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, softcap: Optional[float] = None,
                         z_loss: float = 0.0, chunk_size: Optional[int] = None) -> Tensor:
    """``cross_entropy(hidden @ classifier.T + bias, target, weight, ...)`` without the (N, V)
    logits, differentiable in hidden, classifier and bias.

    hidden: (..., H), classifier: (V, H) (``nn.Linear.weight``), bias: (V,) or None, target:
    hidden's leading shape, integer class indices.  Options as in ``cross_entropy`` (no
    probability targets, class axis last).  chunk_size: rows per chunk (None: automatic).
    For "mean"/"sum" the gradients are computed in the forward when any input requires grad
    (three small tensors are saved); for "none" the backward recomputes the chunked logits.
    """
    _check_input(hidden, "hidden")
    _check_input(classifier, "classifier")
    if bias is not None:
        _check_input(bias, "bias")
    _no_grad_to("weight", weight)
    lead = tuple(hidden.shape[:-1])
    if hidden.dim() != 2:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        target = target.reshape(-1)
    args = (hidden, classifier, target, bias, weight, int(ignore_index), str(reduction),
            float(label_smoothing), None if softcap is None else float(softcap), float(z_loss),
            None if chunk_size is None else int(chunk_size))
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, classifier, bias))
    if wants_grad and reduction != "none":
        loss = _lin_fused_op(*args)[0]
    else:
        loss = _lin_op(*args)
    if reduction == "none" and len(lead) != 1:
        loss = loss.reshape(lead)
    return loss
