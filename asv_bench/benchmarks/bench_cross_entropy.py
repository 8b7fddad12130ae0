"""CPU benchmarks of fastce.cross_entropy (forward) and cross_entropy_with_grad (loss+grad).

- ``Shapes``: time_ and track_ (GB/s of logits) on (4096, 32000), (8, 21, 512, 512), (256, 10)
  float32 logits with plain targets.
- ``Throughput``: GB/s over a grid of N x C (size capped so that one call stays well under a
  second even on a slow machine).
- ``Workloads``: time_ of the realistic problems W1-W3 of ``python -m fastce bench`` (ignored
  targets, uint8 targets and class weights for W2).
- ``Roofline``: track_ of W1's forward and loss+grad times as multiples of the ``read`` row (a
  parallel sum over the same logits) and the ``exp roof`` row (row max + exp-sum with fastce's
  exp), timed round-robin with them as in ``python -m fastce bench``.
- ``ProbabilityTargets``: time_ of probability (soft) targets on rows and strided logits, and
  track_ of their time as a multiple of class-index targets on the same logits (round-robin):
  they read twice the bytes, so about 2x is the aim.
- ``PerCall``: time_ of (256, 10) calls with each argument set the lean path serves (options,
  reduction="none", class_axis, grad_output, out=), and track_ of each as a multiple of the
  plain call: a call that falls back to the general path shows as ~3-5x.

Every setup builds the arrays and calls fastce once (Numba compiles, or loads its cache) so
that no timed region includes compilation.
"""
import time

import numpy as np

import fastce  # the suite measures the installed fastce (pip install -e ".[bench]")

from fastce import bench
from fastce.bench import make_workload

FORWARD, LOSS_GRAD = "forward", "loss+grad"
OPS = [FORWARD, LOSS_GRAD]
SHAPES = {
    "4096x32000": (4096, 32000),
    "8x21x512x512": (8, 21, 512, 512),
    "256x10": (256, 10),
}
MAX_GRID_ELEMENTS = 1 << 25     # 128 MiB of float32 logits: ~0.1-0.4 s per call here
TRACK_CALLS = 5                 # timed calls whose median a track_ benchmark reports
MIN_SAMPLE_S = 0.01


def _logits(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= 2.0
    t = rng.integers(0, shape[1], size=shape[:1] + shape[2:])
    return x, t


def _op(op, x, t, weight=None, ignore_index=-100):
    if op == FORWARD:
        return lambda: fastce.cross_entropy(x, t, weight, ignore_index=ignore_index)
    return lambda: fastce.cross_entropy_with_grad(x, t, weight, ignore_index=ignore_index)


def median_seconds(fn, calls=TRACK_CALLS):
    """Median seconds per call over ``calls`` samples; a sample loops fn for >= MIN_SAMPLE_S."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    number = 1 if dt >= MIN_SAMPLE_S else int(min(10_000, MIN_SAMPLE_S / max(dt, 1e-7)) + 1)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    return float(np.median(samples))


class Shapes:
    """fastce on the three reference shapes, float32, int64 targets, no weights/ignores."""
    params = [list(SHAPES), OPS]
    param_names = ["shape", "op"]
    timeout = 300
    warmup_time = 0         # setup already warmed up (compiled)
    repeat = (1, 5, 30.0)

    def setup(self, shape, op):
        self.x, self.t = _logits(SHAPES[shape])
        self.fn = _op(op, self.x, self.t)
        self.fn()               # compile / load the Numba cache outside the timed region

    def time_call(self, shape, op):
        self.fn()

    def track_gbps(self, shape, op):
        return self.x.nbytes / median_seconds(self.fn) / 1e9

    track_gbps.unit = "GB/s"


class Throughput:
    """GB/s of logits over N x C, (N, C) float32 logits; combinations over the cap are skipped."""
    params = [[64, 1024, 8192], [1000, 32000, 256000], OPS]
    param_names = ["N", "C", "op"]
    timeout = 300
    warmup_time = 0

    def setup(self, N, C, op):
        if N * C > MAX_GRID_ELEMENTS:
            raise NotImplementedError(f"{N}x{C} logits exceed the size cap")
        self.x, self.t = _logits((N, C))
        self.fn = _op(op, self.x, self.t)
        self.fn()

    def track_gbps(self, N, C, op):
        return self.x.nbytes / median_seconds(self.fn) / 1e9

    track_gbps.unit = "GB/s"


class Workloads:
    """The benchmark workloads W1 (LM logits, 10% ignored), W2 (segmentation, uint8 targets,
    ignore_index=255, class weights), W3 (small classifier) and the per-call sizes W4 (64 x 1000
    classifier) and W5 (a small segmentation batch, uint8 targets)."""
    params = [["W1", "W2", "W3", "W4", "W5"], OPS]
    param_names = ["workload", "op"]
    timeout = 300
    warmup_time = 0
    repeat = (1, 5, 30.0)

    def setup(self, workload, op):
        p = make_workload(workload)
        self.fn = _op(op, p.x, p.target, p.weight, p.ignore_index)
        self.fn()

    def time_call(self, workload, op):
        self.fn()


# bench.READ, bench.ROOF, spelled out: asv discovers the suite against the installed fastce,
# which may predate them.
ROOFLINE_ROWS = ["read", "exp roof"]


class Roofline:
    """W1 forward and loss+grad as multiples of the roofline rows (fastce time / row time)."""
    params = [OPS, ROOFLINE_ROWS]
    param_names = ["op", "row"]
    timeout = 600
    warmup_time = 0
    shape = None            # W1's full size (the tests set a small one)

    def setup_cache(self):
        # One round-robin measurement serves all four ratios (W1 takes seconds per sample).
        if not hasattr(bench, "roofline_impls"):
            raise NotImplementedError("the installed fastce has no roofline rows")
        p = make_workload("W1", shape=self.shape)
        fns = {op: _op(op, p.x, p.target, p.weight, p.ignore_index) for op in OPS}
        fns.update(bench.roofline_impls(p))
        res = bench.measure_side_by_side(fns, repeats=TRACK_CALLS, max_time=60.0)
        times = {("W1", op, bench.FASTCE): res[op] for op in OPS}
        times.update({("W1", bench.FWD, row): res[row] for row in ROOFLINE_ROWS})
        return bench.roofline_ratios(times)

    def track_ratio(self, ratios, op, row):
        return ratios[(op, row)]

    track_ratio.unit = "x"


PROB_SHAPES = {"4096x2000": (4096, 2000), "8x21x256x256": (8, 21, 256, 256)}


def _probabilities(shape, seed=1):
    p = np.random.default_rng(seed).random(shape, dtype=np.float32)
    p /= p.sum(axis=1, keepdims=True)
    return p


class ProbabilityTargets:
    """Probability targets (same shape as the logits), float32, rows and strided."""
    params = [list(PROB_SHAPES), OPS]
    param_names = ["shape", "op"]
    timeout = 300
    warmup_time = 0
    repeat = (1, 5, 30.0)

    def setup(self, shape, op):
        self.x, self.t = _logits(PROB_SHAPES[shape])
        self.p = _probabilities(PROB_SHAPES[shape])
        self.fn = _op(op, self.x, self.p)
        self.index_fn = _op(op, self.x, self.t)
        self.fn()
        self.index_fn()

    def time_call(self, shape, op):
        self.fn()

    def track_vs_index_targets(self, shape, op):
        res = bench.measure_side_by_side({"prob": self.fn, "index": self.index_fn},
                                         repeats=TRACK_CALLS)
        return res["prob"] / res["index"]

    track_vs_index_targets.unit = "x"


# Small calls with the arguments the lean path serves (fastce.api._lean_call): each should cost
# about the plain call; one that falls back to the general path costs ~25-45 us more.
PER_CALL_ARGS = {
    "plain": dict(),
    "label_smoothing": dict(label_smoothing=0.1),
    "softcap+z_loss": dict(softcap=30.0, z_loss=1e-4),
    "reduction=none": dict(reduction="none"),
    "class_axis=1": dict(class_axis=1),
    "grad_output": dict(grad_output=0.5),
    "out=": dict(out=True),
}


class PerCall:
    """(256, 10) float32 calls, forward and loss+grad, with each argument set: time_, and
    track_ of the time as a multiple of the plain call's (round-robin)."""
    params = [list(PER_CALL_ARGS), OPS]
    param_names = ["args", "op"]
    timeout = 120
    warmup_time = 0
    repeat = (1, 5, 30.0)

    def _fn(self, args, op):
        kw = dict(PER_CALL_ARGS[args])
        if op == FORWARD:
            kw.pop("grad_output", None)
            kw.pop("out", None)
            return lambda: fastce.cross_entropy(self.x, self.t, **kw)
        if kw.pop("out", False):
            kw["out"] = np.empty_like(self.x)
        return lambda: fastce.cross_entropy_with_grad(self.x, self.t, **kw)

    def setup(self, args, op):
        self.x, self.t = _logits((256, 10))
        self.fn = self._fn(args, op)
        self.plain = self._fn("plain", op)
        self.fn()
        self.plain()

    def time_call(self, args, op):
        self.fn()

    def track_vs_plain(self, args, op):
        # (microsecond calls on a noisy machine: more rounds than the large calls need)
        res = bench.measure_side_by_side({"args": self.fn, "plain": self.plain}, repeats=25)
        return res["args"] / res["plain"]

    track_vs_plain.unit = "x"
