"""GPU benchmarks of fastce (CuPy arrays): forward and loss+grad, time_ and track_ GB/s.

Every setup raises NotImplementedError (asv's "skip") when CuPy or a CUDA device is missing, or
under the Numba CUDA simulator, so the suite runs cleanly on CPU-only machines.  Timings
synchronise the device: fastce's mean/sum already copy the loss to the host, and every call
here ends with a device synchronize.
"""
import os
import time

import numpy as np

import fastce  # the suite measures the installed fastce (pip install -e ".[bench]")

FORWARD, LOSS_GRAD = "forward", "loss+grad"
OPS = [FORWARD, LOSS_GRAD]
SHAPES = {
    "4096x32000-f32": ((4096, 32000), "float32"),
    "4096x32000-f16": ((4096, 32000), "float16"),
    "8192x128256-f32": ((8192, 128256), "float32"),
    "8x21x512x512-f32": ((8, 21, 512, 512), "float32"),
}
TRACK_CALLS = 10


def _cupy_or_skip():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise NotImplementedError("GPU benchmarks do not run under the CUDA simulator")
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise NotImplementedError("no CUDA device")
        return cupy
    except NotImplementedError:
        raise
    except Exception as e:
        raise NotImplementedError(f"CuPy/CUDA not available: {e}") from None


def _problem(cupy, key):
    shape, dtname = SHAPES[key]
    x = (cupy.random.standard_normal(shape, dtype=np.float32) * 2).astype(dtname)
    t = cupy.random.randint(0, shape[1], shape[:1] + shape[2:]).astype(np.int64)
    return x, t


def _call(cupy, op, x, t):
    if op == FORWARD:
        fastce.cross_entropy(x, t)
    else:
        fastce.cross_entropy_with_grad(x, t)
    cupy.cuda.Device().synchronize()


def _bytes(op, x):
    """Bytes fastce must move: the logits once (forward); twice plus the gradient (loss+grad)."""
    return x.nbytes * (1 if op == FORWARD else 3)


class GPUShapes:
    params = (list(SHAPES), OPS)
    param_names = ["shape", "op"]
    timeout = 300

    def setup(self, key, op):
        self.cupy = _cupy_or_skip()
        self.x, self.t = _problem(self.cupy, key)
        _call(self.cupy, op, self.x, self.t)       # compile the kernels outside the timing

    def teardown(self, key, op):
        self.x = self.t = None
        if getattr(self, "cupy", None) is not None:
            self.cupy.get_default_memory_pool().free_all_blocks()

    def time_fastce(self, key, op):
        _call(self.cupy, op, self.x, self.t)

    def track_gbps(self, key, op):
        times = []
        for _ in range(TRACK_CALLS):
            t0 = time.perf_counter()
            _call(self.cupy, op, self.x, self.t)
            times.append(time.perf_counter() - t0)
        return _bytes(op, self.x) / float(np.median(times)) / 1e9

    track_gbps.unit = "GB/s"


class GPUCopyBandwidth:
    """The device copy bandwidth that the GB/s above compare to."""
    timeout = 120

    def setup(self):
        self.cupy = _cupy_or_skip()
        self.src = self.cupy.ones(1 << 28, dtype=np.float32)     # 1 GiB
        self.dst = self.cupy.empty_like(self.src)

    def track_copy_gbps(self):
        cp = self.cupy
        cp.copyto(self.dst, self.src)
        cp.cuda.Device().synchronize()
        times = []
        for _ in range(TRACK_CALLS):
            t0 = time.perf_counter()
            cp.copyto(self.dst, self.src)
            cp.cuda.Device().synchronize()
            times.append(time.perf_counter() - t0)
        return 2 * self.src.nbytes / float(np.median(times)) / 1e9

    track_copy_gbps.unit = "GB/s"
