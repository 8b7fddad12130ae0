"""The options of one cross-entropy call, by name: what api.py hands a backend's loss kernels.

``LossOptions`` is the one place the per-call options are defined.  Every field is a value,
not a code path (the kernels branch on them at run time, and Numba types the tuple once), so a
new option set compiles nothing new; the two code-path choices that are worth compiled
variants (gradient or not, softcap or not) are read from it by the backend's launcher.

Notation (see ``fastce.spec``): eps = label_smoothing, C classes, w the class weights,
D the mean's denominator (sum of the non-ignored targets' weights), Dz the number of
non-ignored targets (the z-loss mean's denominator).
"""
from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["LossOptions", "ShardOptions", "ieee_div", "mean_div"]


def mean_div(total: float, D: float) -> float:
    """The weighted mean total / D, nan where D == 0 (every target ignored or of zero weight)
    whatever the total: torch's mean with label smoothing is (1 - eps) nll / D + eps smooth / D,
    whose nll part is then 0 / 0, so a positive smoothing sum does not make it +inf."""
    return math.nan if D == 0.0 else ieee_div(total, D)


def ieee_div(a: float, b: float) -> float:
    """IEEE a / b for Python floats (x/0 -> +-inf, 0/0 -> nan), as torch's mean of nothing:
    the means' divisions by D and Dz, and grad_scale = 1/D, on every backend's host side."""
    if b == 0.0:
        return math.nan if (a == 0.0 or a != a) else math.copysign(math.inf, a)
    return a / b


class LossOptions(NamedTuple):
    keep: float = 1.0            # 1 - eps: the target's share of the smoothed distribution
    smooth_c: float = 0.0        # eps / C: every class's share
    weight_sum: float = 0.0      # W = sum_c w_c, the smoothing term's normaliser
    softcap: float = 0.0         # cap of cap * tanh(x / cap); 0 = off
    grad_scale: float = 1.0      # d loss / d loss_i: 1/D for reduction="mean", else 1
    z_grad: float = 0.0          # d z-loss / d lse^2: 2 * z_loss / Dz (mean) or 2 * z_loss
    z_loss: float = 0.0          # PaLM's z-loss coefficient
    in_place: bool = False       # the gradient buffer is the logits themselves
    want_hits: bool = False      # count argmax == target (token accuracy)

    @classmethod
    def make(cls, *, label_smoothing, C, weight_sum, softcap, grad_scale=1.0, z_grad=0.0,
             z_loss=0.0, in_place=False, want_hits=False):
        """From the user's options (already checked by api.check_options)."""
        eps = float(label_smoothing)
        return cls(1.0 - eps, eps / C if C else 0.0, float(weight_sum), float(softcap),
                   float(grad_scale), float(z_grad), float(z_loss), bool(in_place),
                   bool(want_hits))


class ShardOptions(NamedTuple):
    """The options of ``fastce._shard_kernels`` (one class shard's statistics or gradient),
    by name; q_c below is the weight of class c in the smoothing / probability sums."""
    keep: float = 1.0            # 1 - eps, as in LossOptions
    smooth_c: float = 0.0        # eps / C (C: all classes, not the shard's)
    softcap: float = 0.0         # cap of cap * tanh(x / cap); 0 = off
    is_prob: bool = False        # probability targets: q_c = w_c (keep p_c + smooth_c), else w_c
    want_dev: bool = False       # statistics: the dev, qfin and qsum rows
    want_argmax: bool = False    # statistics: the amax and argmax rows
