"""Check and benchmark fastce's GPU backend on a real GPU machine, within a time budget.

    python -m fastce.gpu_check --out DIR            # full run (default deadline 300 s wall)
    python -m fastce.gpu_check --out DIR --quick    # tiny shapes (also runs under the simulator)
    python -m fastce.gpu_check --ptx                # only: compile every kernel to PTX (no GPU)

Writes, as it goes (a run cut short keeps what it measured):
- DIR/preflight.json: versions, GPU name, one trivial launch, whether NVVM and NVRTC load;
- DIR/bench.jsonl: one line per case: fastce forward and loss+grad against torch CUDA eager
  (forward; forward+backward) and Liger-Kernel's cross entropy where importable, CUDA-event
  medians, GB/s at the ideal byte count (forward: logits read once; loss+grad: read once and
  the gradient written once) against the read and copy bandwidth measured in the same run;
- DIR/parity.jsonl: per case, the device results against the float64 spec on whole rows of the
  first positions, and whether two runs are bitwise equal (a (40000, 65536) float16 case checks
  N*C > 2^31);
- DIR/cache.json: a fresh process's first loss+grad twice over one new Numba cache directory
  (the kernels compiled and saved, then loaded from the disk cache);
- DIR/pytest_gpu.log + DIR/junit.xml: the GPU cases of the kernel tests, one pytest subprocess
  with the time that is left;
- DIR/summary.md: the tables.
Without a GPU it says so and exits 0 (2 with ``--require-gpu``).  No package is installed on
the GPU machine: bring pytest, hypothesis (and liger-kernel) in a ``pip install --target`` folder
on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np

class NoCompiler(RuntimeError):
    """NVVM (the CUDA compiler library) is not available."""


def compile_ptx_all(cc=(8, 0)):
    """Compile every loss kernel of fastce.gpu to PTX for compute capability ``cc``.

    Needs only NVVM, not a GPU: checks that the kernels type and compile for real hardware,
    which the simulator cannot show.  Returns the number of kernels compiled.
    """
    from numba import config
    if config.ENABLE_CUDASIM:
        raise NoCompiler("the CUDA simulator is enabled")
    import types as pytypes

    import numba.cuda.dispatcher as disp
    from numba import cuda
    from numba import types as nt

    try:
        from numba.cuda.cudadrv.nvvm import NVVM
        NVVM()
    except Exception as e:  # pragma: no cover - depends on the machine
        raise NoCompiler(f"NVVM is not available: {e}") from None
    from . import gpu

    # Device functions ask the current device for its compute capability: pretend one.
    saved = disp.get_current_device
    disp.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=cc)
    try:
        def arr(dt, nd):
            return nt.Array(dt, nd, "C")
        n = 0
        f8, u1 = nt.float64, nt.uint8
        f2, f4 = nt.float16, nt.float32
        # (compute dtype, logits and gradient dtype, target dtypes): float16 logits are read
        # and written as they are by the loss kernels (reads_float16), computed in float32;
        # the softmax family reads them through a float32 copy.
        # bfloat16 logits (None): read and written as their uint16 bits by the index kernels.
        for F, ft, xt, tdts in ((np.float32, f4, f4, (nt.int64, nt.int32, nt.uint8)),
                                (np.float64, f8, f8, (nt.int64, nt.int32, nt.uint8)),
                                (np.float32, f4, f2, (nt.int64,)),
                                (None, f4, nt.uint16, (nt.int64,))):
            fns = gpu._bf16_kernels()[1] if F is None else gpu._kernels(F)[1]
            for tdt in tdts:
                sig = (arr(xt, 3), arr(tdt, 2), arr(ft, 1), *(f8,) * 7, nt.boolean,
                       arr(f8, 1), nt.int64, nt.boolean, arr(f8, 1), nt.int64, arr(xt, 3),
                       arr(f8, 2), arr(f8, 2), arr(u1, 2), arr(f8, 2))
                for k in ("index_rows", "index_strided"):
                    cuda.compile_ptx(fns[k], sig, cc=cc)
                    n += 1
            if F is None:
                continue
            sig = (arr(xt, 3), arr(ft, 3), arr(ft, 1), *(f8,) * 6, nt.boolean, arr(f8, 1),
                   nt.int64, arr(xt, 3), arr(f8, 2), arr(f8, 2), arr(f8, 2))
            for k in ("prob_elems", "prob_rows"):
                cuda.compile_ptx(fns[k], sig, cc=cc)
                n += 1
            if xt != ft:
                continue
            for k in ("softmax_rows", "softmax_strided"):
                cuda.compile_ptx(fns[k], (arr(ft, 3), nt.int64, arr(ft, 3), arr(f8, 2)), cc=cc)
                n += 1
            cuda.compile_ptx(gpu._k_lse_weighted.py_func, (arr(ft, 2), arr(f8, 2), nt.boolean,
                                                           arr(f8, 1), arr(f8, 1)), cc=cc)
            cuda.compile_ptx(gpu._k_nll.py_func, (arr(f8, 2), arr(ft, 3), arr(nt.int64, 2),
                                                  arr(f8, 1), nt.int64), cc=cc)
            n += 2
        i8 = nt.int64
        cuda.compile_ptx(gpu._k_sum.py_func, (arr(f8, 1), i8, i8, arr(f8, 1)), cc=cc)
        cuda.compile_ptx(gpu._k_stats.py_func, (arr(i8, 1), arr(nt.float32, 1), i8, i8, i8, i8,
                                                arr(f8, 1), arr(f8, 1), arr(f8, 1)), cc=cc)
        cuda.compile_ptx(gpu._k_stats_merge.py_func, (arr(f8, 1), arr(f8, 1), arr(f8, 1),
                                                      arr(f8, 1)), cc=cc)
        cuda.compile_ptx(gpu._k_grad_den.py_func, (arr(f8, 1), nt.boolean, arr(f8, 1), arr(f8, 1)),
                         cc=cc)
        n += 4
        # The protocol's small kernels; _k_gather_nd casts on its store (float16 included).
        for o, a in ((nt.float16, nt.float32), (nt.float32, nt.float16), (f8, i8),
                     (f8, nt.boolean), (i8, nt.int32)):
            cuda.compile_ptx(gpu._k_gather_nd.py_func, (arr(o, 1), arr(a, 1), i8, arr(i8, 1),
                                                        arr(i8, 1)), cc=cc)
            cuda.compile_ptx(gpu._k_fill.py_func, (arr(o, 1), o), cc=cc)
            n += 2
        cuda.compile_ptx(gpu._k_add.py_func, (arr(nt.float16, 1), arr(f8, 1), arr(f8, 1)), cc=cc)
        cuda.compile_ptx(gpu._k_widen_bf16.py_func, (arr(f4, 1), arr(nt.uint16, 1)), cc=cc)
        cuda.compile_ptx(gpu._k_narrow_bf16.py_func, (arr(nt.uint16, 1), arr(f4, 1)), cc=cc)
        n += 2
        cuda.compile_ptx(gpu._k_lse_sign.py_func, (arr(f8, 1), arr(f8, 1)), cc=cc)
        n += 2
        for o in (nt.float16, nt.float32, f8):      # the reduced loss, in the input's dtype
            cuda.compile_ptx(gpu._k_loss.py_func, (arr(f8, 1), arr(f8, 1), nt.boolean,
                                                   nt.boolean, nt.boolean, f8, f8, arr(f8, 1),
                                                   arr(o, 1)), cc=cc)
            n += 1
        return n
    except Exception as e:
        # float16 kernels link CUDA's fp16 headers through NVRTC
        if "nvrtc" in f"{type(e).__name__} {e}".lower():
            raise NoCompiler(f"NVRTC is not available: {e}") from None
        raise
    finally:
        disp.get_current_device = saved


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def _simulator():
    from numba import config
    return bool(config.ENABLE_CUDASIM)


def _gpu_env():
    """(xp module or None, torch or None, GPU name, reason if no GPU)."""
    if _simulator():
        return None, None, "Numba CUDA simulator", None
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, None, None, "CuPy finds no CUDA device"
    except Exception as e:
        return None, None, None, f"CuPy is not usable ({type(e).__name__}: {e})"
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    try:
        import torch
        if not torch.cuda.is_available():
            torch = None
    except Exception:
        torch = None
    return cupy, torch, name, None


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _timer(cupy):
    """A function timing fn() in seconds (median of repeats, CUDA events on a real GPU)."""
    def run(fn, repeat, warmup=None):
        warmup = (1 if repeat < 3 else 2) if warmup is None else warmup
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if cupy is not None:
                start, stop = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return float(np.median(times))
    return run


def _device_array(cupy, a):
    if cupy is not None:
        return cupy.asarray(a)
    from numba import cuda
    return cuda.to_device(a)


def _bandwidths(cupy, timer, nbytes, repeat):
    """(copy GB/s counting read + write, read GB/s of a sum) over an nbytes buffer: the
    device's own limits, measured in the same run as the kernels they are compared with."""
    if cupy is None:
        return float("nan"), float("nan")
    src = cupy.ones(nbytes // 4, dtype=np.float32)
    dst = cupy.empty_like(src)
    t_copy = timer(lambda: cupy.copyto(dst, src), repeat)
    t_read = timer(lambda: src.sum(), repeat)
    del dst
    return 2 * src.nbytes / t_copy / 1e9, src.nbytes / t_read / 1e9


# ---------------------------------------------------------------------------------------------
# Cases: one JSON line each in bench.jsonl and parity.jsonl, flushed as it is measured
# ---------------------------------------------------------------------------------------------
class Case(NamedTuple):
    shape: tuple
    dtype: str
    weights: bool = False       # random class weights
    ignored: float = 0.0        # fraction of targets set to ignore_index
    timed: bool = True          # False: parity and repeatability only (huge problems)

    @property
    def name(self):
        extra = (" weights" if self.weights else "") + (
            f" {self.ignored:.0%} ignored" if self.ignored else "")
        return f"{self.shape} {self.dtype}{extra}"


FULL_CASES = [Case((4096, 32000), "float32"), Case((4096, 32000), "float16"),
              Case((4096, 32000), "bfloat16"),
              Case((8192, 128256), "float32"), Case((8192, 128256), "float16"),
              Case((8192, 128256), "bfloat16"),
              Case((8, 21, 512, 512), "float32", weights=True, ignored=0.1),
              # N*C > 2^31: 64-bit offsets
              Case((40000, 65536), "float16", timed=False)]
QUICK_CASES = [Case((4, 40), "float32"), Case((4, 40), "float16"), Case((4, 40), "bfloat16"),
               Case((1, 3, 4, 4), "float32", weights=True, ignored=0.25)]
PARITY_ROWS = 64        # positions compared with the float64 spec (the whole row each)


def _inputs(cupy, case, seed=0):
    """Device logits, targets (ignore_index -100) and weights (or None) of a case."""
    shape, C = case.shape, case.shape[1]
    tshape = (shape[0],) + tuple(shape[2:])
    rng = np.random.default_rng(seed)
    if cupy is not None:
        cupy.random.seed(seed)
        x32 = cupy.random.standard_normal(shape, dtype=np.float32) * 3
        t = cupy.random.randint(0, C, tshape).astype(np.int64)
        if case.ignored:
            t[cupy.random.random(tshape) < case.ignored] = -100
        x = _device_cast(cupy, x32, case.dtype)
        w = cupy.asarray(rng.random(C) + 0.5, dtype=np.float32) if case.weights else None
        return x, t, w
    from numba import cuda
    if case.dtype == "bfloat16":
        import ml_dtypes  # noqa: F401  (names the dtype for NumPy)
    x = (rng.standard_normal(shape) * 3).astype(case.dtype)
    t = rng.integers(0, C, tshape)
    if case.ignored:
        t[rng.random(tshape) < case.ignored] = -100
    w = (rng.random(C) + 0.5).astype(case.dtype) if case.weights else None
    return cuda.to_device(x), cuda.to_device(t), (None if w is None else cuda.to_device(w))


def _device_cast(cupy, x32, dtype):
    if dtype != "bfloat16":
        return x32.astype(dtype)
    # No bfloat16 in CuPy: a torch bf16 tensor is what users hand over.
    import torch
    return torch.as_tensor(x32, device="cuda").to(torch.bfloat16)


def _to_host(a):
    """float64 NumPy copy of a CuPy / Numba / torch device array."""
    if hasattr(a, "detach"):
        return a.detach().float().cpu().numpy().astype(np.float64)
    if hasattr(a, "copy_to_host"):
        return np.asarray(a.copy_to_host(), dtype=np.float64)
    import cupy
    return cupy.asnumpy(a).astype(np.float64)


def parity(x, t, w, case):
    """fastce on the device vs the float64 spec on the first PARITY_ROWS positions (loss per
    position and the 'sum' gradient depend on their own position only), plus repeatability:
    two runs of the mean loss and the gradient bitwise equal."""
    import fastce
    from . import spec
    per = fastce.cross_entropy(x, t, w, reduction="none")
    loss_a, grad_a = fastce.cross_entropy_with_grad(x, t, w, reduction="sum")
    loss_b, grad_b = fastce.cross_entropy_with_grad(x, t, w, reduction="sum")
    n = min(PARITY_ROWS, case.shape[0])
    if len(case.shape) == 2:
        xs, ts, got_l, got_g = x[:n], t[:n], per[:n], grad_a[:n]
    else:                       # strided: the first image's positions
        xs, ts, got_l, got_g = x[:1], t[:1], per[:1], grad_a[:1]
    xh, th = _to_host(xs), _to_host(ts).astype(np.int64)
    wh = None if w is None else _to_host(w)
    N, C = xh.shape[0], xh.shape[1]
    x3, t2 = xh.reshape(N, C, -1), th.reshape(N, -1)
    want_l = spec.cross_entropy(x3, t2, wh, reduction="none").reshape(_to_host(got_l).shape)
    _, want_g = spec.cross_entropy_with_grad(x3, t2, wh, reduction="sum")
    gl, gg = _to_host(got_l), _to_host(got_g).reshape(want_g.shape)
    scale = max(1e-2, float(np.abs(want_g).max()))
    return dict(loss_max_rel=float(np.max(np.abs(gl - want_l) / np.maximum(np.abs(want_l), 1e-30))),
                grad_max_abs_over_max=float(np.max(np.abs(gg - want_g)) / scale),
                repeat_bitwise=bool(_to_host(loss_a) == _to_host(loss_b)
                                    and np.array_equal(_to_host(grad_a), _to_host(grad_b))),
                positions=int(np.size(want_l)))


def _liger():
    """Liger-Kernel's cross entropy (input, target) -> loss, or None when not importable."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:
        return None
    return liger_cross_entropy


def _torch_times(torch, timer, x, t, w, repeat):
    """Eager torch (and Liger's CE where importable) fwd / fwd+bwd on the same data."""
    import torch.nn.functional as F
    xt = x if hasattr(x, "detach") else torch.as_tensor(x, device="cuda")
    tt, wt = torch.as_tensor(t, device="cuda"), (None if w is None else
                                                 torch.as_tensor(w, device="cuda").to(xt.dtype))
    xg = xt.detach().clone().requires_grad_(True)
    out = {}
    with torch.no_grad():
        out["torch fwd"] = timer(lambda: F.cross_entropy(xt, tt, wt), repeat)

    def fwd_bwd(loss_fn):
        def run():
            xg.grad = None
            loss_fn(xg, tt).backward()
        return run
    out["torch fwd+bwd"] = timer(fwd_bwd(lambda a, b: F.cross_entropy(a, b, wt)), repeat)
    liger = _liger()
    if liger is not None and xt.ndim == 2 and wt is None:
        out["liger fwd+bwd"] = timer(fwd_bwd(liger), repeat)
    return out


def run_case(cupy, torch, case, timer, repeat, bw):
    """(bench row, parity row) of one case; errors are recorded in the rows, not raised."""
    import fastce
    row = dict(case=case.name, shape=list(case.shape), dtype=case.dtype)
    try:
        x, t, w = _inputs(cupy, case)
    except Exception as e:
        return dict(row, error=f"inputs: {type(e).__name__}: {e}"), None
    try:
        par = dict(row, **parity(x, t, w, case))
    except Exception as e:
        par = dict(row, error=f"{type(e).__name__}: {e}")
    if not case.timed:
        return None, par
    itemsize = 2 if case.dtype == "bfloat16" else np.dtype(case.dtype).itemsize
    nbytes = math.prod(case.shape) * itemsize
    try:
        row["fastce fwd"] = timer(lambda: fastce.cross_entropy(x, t, w), repeat)
        row["fastce fwd+bwd"] = timer(lambda: fastce.cross_entropy_with_grad(x, t, w), repeat)
        # No target check: nothing read back, so the host never waits inside the call.
        row["fastce fwd+bwd unchecked"] = timer(
            lambda: fastce.cross_entropy_with_grad(x, t, w, check_targets=False), repeat)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
    if torch is not None:
        try:
            row.update(_torch_times(torch, timer, x, t, w, repeat))
        except Exception as e:
            row["torch error"] = f"{type(e).__name__}: {e}"
    # The ideal bytes: the forward reads the logits once; loss+grad reads them once and
    # writes the gradient once.
    for mode, moved, limit in (("fwd", nbytes, bw["read"]), ("fwd+bwd", 2 * nbytes, bw["copy"])):
        sec = row.get(f"fastce {mode}")
        if sec:
            row[f"{mode} GB/s"] = moved / sec / 1e9
            row[f"{mode} % of limit"] = 100 * moved / sec / 1e9 / limit if limit == limit else None
    return row, par


def _append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def write_summary(out, pre, bw, rows, pars, notes):
    """summary.md from what the run measured (also after a time-out: what is there)."""
    def ms(v):
        return f"{v * 1e3:.3f}" if isinstance(v, float) else "-"

    def ratio(a, b):
        return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) and b else "-"
    lines = [f"# fastce GPU check ({pre.get('gpu')})", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- versions: {pre.get('versions')}",
             f"- copy bandwidth (read+write): {bw['copy']:.0f} GB/s; read (sum): "
             f"{bw['read']:.0f} GB/s", *(f"- {n}" for n in notes), "",
             "Medians of CUDA-event times. % of limit: the forward's bytes (logits read once) "
             "over the read bandwidth; loss+grad's ideal bytes (read once + gradient written "
             "once) over the copy bandwidth.", "",
             "| case | fastce fwd ms | torch fwd ms | fwd / torch | fwd % of read | "
             "fastce fwd+bwd ms | torch ms | Liger ms | / torch | / Liger | % of copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} |" + " |" * 9)
            continue
        pf, pb = r.get("fwd % of limit"), r.get("fwd+bwd % of limit")
        lines.append(
            f"| {r['case']} | {ms(r.get('fastce fwd'))} | {ms(r.get('torch fwd'))} | "
            f"{ratio(r.get('fastce fwd'), r.get('torch fwd'))} | "
            f"{'-' if pf is None else f'{pf:.0f}'} | {ms(r.get('fastce fwd+bwd'))} | "
            f"{ms(r.get('torch fwd+bwd'))} | {ms(r.get('liger fwd+bwd'))} | "
            f"{ratio(r.get('fastce fwd+bwd'), r.get('torch fwd+bwd'))} | "
            f"{ratio(r.get('fastce fwd+bwd'), r.get('liger fwd+bwd'))} | "
            f"{'-' if pb is None else f'{pb:.0f}'} |")
    lines += ["", "Loss+grad with `check_targets=False` (no copy back, no host wait in the "
              "call) against the checked call:", "", "| case | checked ms | unchecked ms | "
              "unchecked / checked |", "|---|---|---|---|"]
    for r in rows:
        if "error" not in r:
            a, b = r.get("fastce fwd+bwd"), r.get("fastce fwd+bwd unchecked")
            lines.append(f"| {r['case']} | {ms(a)} | {ms(b)} | {ratio(b, a)} |")
    lines += ["", "Parity with the float64 spec (whole rows of the first positions) and "
              "repeatability (two runs bitwise equal):", "",
              "| case | positions | loss max rel err | grad max err / max | repeat bitwise |",
              "|---|---|---|---|---|"]
    for p in pars:
        if "error" in p:
            lines.append(f"| {p['case']} | error: {p['error']} | | | |")
        else:
            lines.append(f"| {p['case']} | {p['positions']} | {p['loss_max_rel']:.2e} | "
                         f"{p['grad_max_abs_over_max']:.2e} | {p['repeat_bitwise']} |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Preflight and tests
# ---------------------------------------------------------------------------------------------
def preflight(cupy, name, log):
    """Versions, the GPU, one trivial launch, whether NVVM / NVRTC load: what a failed run's
    cause most often is, recorded before anything slow."""
    import numba
    versions = {"python": sys.version.split()[0], "numpy": np.__version__,
                "numba": numba.__version__}
    for mod in ("numba_cuda", "cupy", "torch", "liger_kernel", "pytest", "hypothesis"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception as e:
            versions[mod] = f"absent ({type(e).__name__})"
    pre = {"gpu": name, "versions": versions}
    try:
        from numba import cuda

        @cuda.jit
        def _one(a):
            a[0] = 1.0
        a = cuda.to_device(np.zeros(1, np.float32))
        _one[1, 1](a)
        pre["trivial launch"] = bool(a.copy_to_host()[0] == 1.0)
    except Exception as e:
        pre["trivial launch"] = f"FAILED: {type(e).__name__}: {e}"
    for lib, probe in (("nvvm", "numba.cuda.cudadrv.nvvm:NVVM"),
                       ("nvrtc", "numba.cuda.cudadrv.nvrtc:NVRTC")):
        modname, attr = probe.split(":")
        try:
            getattr(__import__(modname, fromlist=[attr]), attr)()
            pre[lib] = "ok"
        except Exception as e:
            pre[lib] = f"not found: {type(e).__name__}: {e}"
    log(f"preflight: {json.dumps(pre)}")
    return pre


# A fresh process's first loss+grad on the GPU (run twice over one new Numba cache directory).
_FIRST_CALL = """
import json, time
import numpy as np
t0 = time.perf_counter()
import cupy, fastce
rng = np.random.default_rng(0)
x = cupy.asarray(rng.standard_normal((64, 1000)).astype(np.float32))
t = cupy.asarray(rng.integers(0, 1000, 64))
t1 = time.perf_counter()
fastce.cross_entropy_with_grad(x, t)
cupy.cuda.runtime.deviceSynchronize()
print(json.dumps({"import_s": t1 - t0, "first_call_s": time.perf_counter() - t1}))
"""


def kernel_cache_check(out, log, timeout):
    """fastce.gpu's kernels cached on disk: a fresh process's first loss+grad twice over one
    new Numba cache directory (compiling and saving, then loading), to out/cache.json.
    Returns a line for the summary."""
    import tempfile
    cache = tempfile.mkdtemp(prefix="fastce_gpu_cache_")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["NUMBA_CACHE_DIR"] = cache
    runs = []
    for label in ("compiled", "cached"):
        try:
            p = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, text=True,
                               capture_output=True, timeout=timeout)
            if p.returncode == 0:
                run = json.loads(p.stdout.strip().splitlines()[-1])
            else:
                run = {"error": p.stderr.strip()[-2000:]}
            run["cache warnings"] = [ln for ln in p.stderr.splitlines() if "kernel cache" in ln]
        except subprocess.TimeoutExpired:
            run = {"error": f"timed out after {timeout:.0f} s"}
        run["run"] = label
        runs.append(run)
        log(f"kernel cache: {json.dumps(run)[:500]}")
    files = sum(len(names) for _, _, names in os.walk(cache))
    with open(os.path.join(out, "cache.json"), "w") as f:
        json.dump({"runs": runs, "cache files": files}, f, indent=1)
    first, second = (r.get("first_call_s") for r in runs)
    if first is None or second is None:
        return f"kernel cache: a run failed ({files} cache files; cache.json)"
    return (f"kernel cache: first loss+grad of a fresh process {first:.2f} s compiling, "
            f"{second:.2f} s from the cache ({files} cache files; cache.json)")


TEST_FILES = ("test_gpu.py", "test_cross_entropy.py", "test_errors.py", "test_reliability.py",
              "test_softmax.py", "test_torch_adapter.py")


def tests_dir():
    """fastce's tests/ beside the package (a source checkout), or None (an installed wheel
    has no tests)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tests = os.path.join(root, "tests")
    ok = all(os.path.isfile(os.path.join(tests, f)) for f in TEST_FILES)
    return tests if ok else None


def run_tests(out, log, timeout):
    """The GPU cases of the kernel test files in ONE pytest subprocess with a time limit,
    streamed to out/pytest_gpu.log, with out/junit.xml: (exit code or None when not run,
    what happened)."""
    tests = tests_dir()
    if tests is None:
        return None, ("not run: fastce's tests/ is not beside the package (not a source "
                      "checkout; clone the repository to run them, or pass --no-tests)")
    if timeout < 20:
        return None, "not run: no time left before the deadline"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "gpu",
           f"--junitxml={os.path.join(out, 'junit.xml')}",
           *(os.path.join(tests, name) for name in TEST_FILES)]
    logfile = os.path.join(out, "pytest_gpu.log")
    with open(logfile, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=os.path.dirname(tests), env=env, stdout=f,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124, f"TIMED OUT after {timeout:.0f} s (partial log: pytest_gpu.log)"
    tail = open(logfile).read().strip().splitlines()[-1:]
    return rc, f"exit {rc}: {tail[0] if tail else ''} (pytest_gpu.log, junit.xml)"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastce.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out", help="output folder")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (simulator friendly)")
    ap.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    ap.add_argument("--ptx", action="store_true", help="only compile the kernels to PTX")
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 when there is no GPU")
    ap.add_argument("--deadline", type=float, default=300.0,
                    help="seconds of wall time for the whole run (cases past it are skipped, "
                         "the tests get what is left)")
    args = ap.parse_args(argv)
    t_end = time.monotonic() + args.deadline

    if args.ptx:
        try:
            print(f"compiled {compile_ptx_all()} kernels to PTX")
            return 0
        except NoCompiler as e:
            print(f"fastce.gpu_check: cannot compile: {e}")
            return 2

    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "gpu_check.log"), "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    cupy, torch, name, reason = _gpu_env()
    if reason is not None:
        log(f"fastce.gpu_check: no GPU to check ({reason}). Run this on a machine with an NVIDIA "
            f"GPU and CuPy (and torch with CUDA for the comparison), or use --quick under "
            f"NUMBA_ENABLE_CUDASIM=1.")
        logf.close()
        return 2 if args.require_gpu else 0
    pre = preflight(cupy, name, log)
    with open(os.path.join(args.out, "preflight.json"), "w") as f:
        json.dump(pre, f, indent=1)
    if torch is None:
        notes = ["torch with CUDA is not available: no torch comparison"]
    else:
        notes = [] if _liger() else ["Liger-Kernel not importable: no Liger column"]
    if not args.quick:
        notes.append(kernel_cache_check(args.out, log, timeout=max(10.0, min(
            120.0, (t_end - time.monotonic()) / 4))))
    timer = _timer(cupy)
    repeat = 1 if args.quick else 20
    cases = QUICK_CASES if args.quick else FULL_CASES
    biggest = max(math.prod(c.shape) * 4 for c in cases if c.timed)
    bw = dict(zip(("copy", "read"), _bandwidths(cupy, timer, biggest, repeat)))
    log(f"bandwidth GB/s: {bw}")
    bench_path, parity_path = (os.path.join(args.out, f) for f in ("bench.jsonl", "parity.jsonl"))
    rows, pars = [], []
    for case in cases:
        if time.monotonic() > t_end - 60:
            notes.append(f"skipped past the deadline: {case.name}")
            continue
        log(f"case {case.name}")
        row, par = run_case(cupy, torch, case, timer, repeat, bw)
        for path, r, acc in ((bench_path, row, rows), (parity_path, par, pars)):
            if r is not None:
                _append_jsonl(path, r)
                acc.append(r)
        write_summary(args.out, pre, bw, rows, pars, notes)
    rc_tests = 0
    if not args.no_tests:
        rc_tests, what = run_tests(args.out, log, t_end - time.monotonic() - 5)
        notes.append(f"tests: {what}")
        log(f"tests: {what}")
    write_summary(args.out, pre, bw, rows, pars, notes)
    log(f"wrote {os.path.join(args.out, 'summary.md')}")
    logf.close()
    bad_parity = any("error" in p or not p["repeat_bitwise"] for p in pars
                     if p["dtype"] != "bfloat16")
    return 1 if (rc_tests not in (None, 0, 5) or bad_parity) else 0


if __name__ == "__main__":
    sys.exit(main())
