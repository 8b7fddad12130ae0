"""The float64 reference (fastce.spec) against PyTorch: loss and gradient, every option."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from helpers import assert_close, random_case, spec_loss_and_grad  # noqa: E402


def torch_loss_and_grad(x, t, weight=None, *, grad_output=None, softcap=None, z_loss=0.0,
                        **kw):
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    tt = torch.tensor(t)
    logits = xt if softcap is None else softcap * torch.tanh(xt / softcap)
    wt = None if weight is None else torch.tensor(np.asarray(weight, np.float64))
    loss = F.cross_entropy(logits, tt, weight=wt, **kw)
    if z_loss:
        cls_axis = 0 if xt.ndim == 1 else 1
        lse = torch.logsumexp(logits, dim=cls_axis)
        if t.dtype.kind == "f":
            valid = torch.ones_like(lse, dtype=torch.bool)
        else:
            valid = tt != kw.get("ignore_index", -100)
        z = torch.where(valid, z_loss * lse ** 2, torch.zeros_like(lse))
        red = kw.get("reduction", "mean")
        loss = loss + (z if red == "none" else z.sum() if red == "sum" else z.sum() / valid.sum())
    g = torch.ones_like(loss) if grad_output is None else torch.tensor(np.asarray(grad_output, np.float64))
    loss.backward(g)
    return loss.detach().numpy(), xt.grad.numpy()


SHAPES = [(6,), (9, 5), (4, 3, 7), (2, 4, 3, 5)]
OPTIONS = [
    dict(),
    dict(weight=True),
    dict(weight=True, ignore_index=1, ignore_frac=0.3),
    dict(label_smoothing=0.25),
    dict(weight=True, label_smoothing=0.1, ignore_index=-100, ignore_frac=0.25),
    dict(ignore_index=0, ignore_frac=0.2, label_smoothing=0.4),
    dict(prob=True),
    dict(prob=True, weight=True, label_smoothing=0.3),
    dict(softcap=2.5, weight=True),
    dict(z_loss=1e-2, ignore_frac=0.3, weight=True),
    dict(z_loss=1e-3, softcap=5.0, label_smoothing=0.1, prob=True),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,opts", list(itertools.product(SHAPES, OPTIONS)))
def test_spec_matches_torch(shape, opts, reduction):
    rng = np.random.default_rng(hash((shape, str(opts), reduction)) % 2**32)
    opts = dict(opts)
    prob = opts.pop("prob", False)
    frac = opts.pop("ignore_frac", 0.0)
    use_w = opts.pop("weight", False)
    x, t = random_case(rng, shape, prob=prob, ignore_frac=frac,
                       ignore_index=opts.get("ignore_index", -100))
    C = shape[1] if len(shape) > 1 else shape[0]
    w = rng.random(C) + 0.2 if use_w else None
    go = None
    if reduction == "none":
        go = rng.standard_normal(np.shape(t) if not prob else x.shape[:1] + x.shape[2:] if x.ndim > 1 else ())
    elif rng.random() < 0.5:
        go = 1.7
    want_l, want_g = torch_loss_and_grad(x, t, w, grad_output=go, reduction=reduction, **opts)
    got_l, got_g = spec_loss_and_grad(x, t, w, grad_output=go, reduction=reduction, **opts)
    assert_close(got_l, want_l, 1e-12, what="loss")
    assert_close(got_g, want_g, 1e-12, what="grad")


@pytest.mark.parametrize("weight,expected", [([1, 1, 1], 1.4803), ([1, 2, 3], 1.6075)])
def test_spec_seed_examples(weight, expected):
    from fastce import spec
    x = np.array([0, 1, 0, 0, 0, 1.0]).reshape(1, 3, 2)
    assert round(spec.cross_entropy(x, np.array([[0, 1]]), np.array(weight, float)), 4) == expected


def test_spec_special_values_match_torch():
    """A +inf logit on a class other than the target makes the loss and the gradient row nan
    (torch's log_softmax subtracts the max: inf - inf); a -inf target logit gives +inf; all
    target weights zero with label smoothing: nan (the nll part's 0/0)."""
    x = np.array([[np.inf, 1.0, 2.0], [0.5, -np.inf, 1.0], [0.1, 0.5, -0.3]])
    t = np.array([1, 1, 2])
    for kw in (dict(), dict(label_smoothing=0.1), dict(reduction="none")):
        want_l, want_g = torch_loss_and_grad(x, t, **kw)
        got_l, got_g = spec_loss_and_grad(x, t, **kw)
        assert np.array_equal(np.isnan(got_l), np.isnan(want_l)), kw
        assert_close(np.nan_to_num(got_l, nan=0.0), np.nan_to_num(want_l, nan=0.0), 1e-12)
        assert np.array_equal(np.isnan(got_g), np.isnan(want_g)), kw
    w = np.array([1.0, 0.0, 2.0])
    for eps in (0.0, 0.1):
        want_l, _ = torch_loss_and_grad(x[2:], t[1:2], w, label_smoothing=eps)
        got_l, _ = spec_loss_and_grad(x[2:], t[1:2], w, label_smoothing=eps)
        assert np.isnan(want_l) and np.isnan(got_l)


def test_spec_ignored_rows_get_exact_zero_gradient_with_softcap():
    """Ignored elements have zero gradient whatever their logits, softcap included (torch's
    autograd gives nan there for nan logits: a documented difference)."""
    from fastce import spec
    x = np.array([[np.nan] * 3, [0.0, 1.0, 2.0]])[:, :, None]
    t = np.array([[-100], [0]])
    _, g = spec.cross_entropy_with_grad(x, t, softcap=5.0)
    assert np.array_equal(g[0], np.zeros((3, 1))) and np.all(np.isfinite(g[1]))
