"""The softmax family (fastce.logsumexp / softmax / log_softmax), CPU, float32.

- ``AxisForms``: the same 16.4M logits reduced along the last axis of (512, 32000), along the
  trailing pair (1, 2) of (512, 8, 4000) (a view: no copy), as a whole (axis=None: long rows
  split across threads) and along (0, 2) of (512, 8, 4000) (not adjacent: one transposed
  copy).  The issue's goal: tuple and None forms within 1.5x of axis=-1.
- ``VsScipy``: fastce against scipy.special on (1024, 32000), last axis (goals: logsumexp
  <= 0.1x SciPy, softmax and log_softmax <= 0.25x).
- ``Weighted``: logsumexp with ``b`` (signed weights) and return_sign.

Every setup calls the function once (Numba compiles, or loads its cache), so no timed region
includes compilation.
"""
import numpy as np

import fastce  # the suite measures the installed fastce (pip install -e ".[bench]")

FUNCS = ["logsumexp", "softmax", "log_softmax"]
FORMS = {
    "axis=-1": ((512, 32000), -1),
    "axis=(1, 2)": ((512, 8, 4000), (1, 2)),
    "axis=None": ((512, 32000), None),
    "axis=(0, 2)": ((512, 8, 4000), (0, 2)),
}


def _logits(shape, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    x *= 3.0
    return x


class AxisForms:
    params = [FUNCS, list(FORMS)]
    param_names = ["function", "axis"]
    timeout = 120

    def setup(self, function, form):
        shape, self.axis = FORMS[form]
        self.x = _logits(shape)
        self.fn = getattr(fastce, function)
        self.fn(self.x[:2], axis=self.axis)

    def time_call(self, function, form):
        self.fn(self.x, axis=self.axis)


class VsScipy:
    params = [FUNCS, ["fastce", "scipy"]]
    param_names = ["function", "library"]
    timeout = 300
    number = 1
    repeat = (3, 5, 60.0)

    def setup(self, function, library):
        if library == "scipy":
            try:
                import scipy.special as sps
            except ImportError:
                raise NotImplementedError("scipy is not installed")
            self.fn = getattr(sps, function)
        else:
            self.fn = getattr(fastce, function)
        self.x = _logits((1024, 32000))
        self.fn(self.x[:2], axis=-1)

    def time_call(self, function, library):
        self.fn(self.x, axis=-1)


class Weighted:
    params = [["axis=-1", "axis=None"]]
    param_names = ["axis"]
    timeout = 120

    def setup(self, form):
        self.axis = -1 if form == "axis=-1" else None
        self.x = _logits((512, 8000))
        self.b = np.random.default_rng(1).standard_normal((512, 8000))
        fastce.logsumexp(self.x[:2], axis=self.axis, b=self.b[:2], return_sign=True)

    def time_logsumexp_b(self, form):
        fastce.logsumexp(self.x, axis=self.axis, b=self.b, return_sign=True)
