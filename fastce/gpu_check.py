"""Check and benchmark fastce's GPU backend on a real GPU machine.

    python -m fastce.gpu_check --out DIR            # tests + benchmarks, report in DIR
    python -m fastce.gpu_check --out DIR --quick    # tiny shapes (also runs under the simulator)
    python -m fastce.gpu_check --ptx                # only: compile every kernel to PTX (no GPU)

Steps: (1) ``pytest -m gpu`` plus the GPU-backend tests with CuPy arrays, logged to
DIR/pytest_gpu.log; (2) fastce's loss (forward) and loss+grad against torch CUDA
``F.cross_entropy`` (forward; forward+backward) on (4096, 32000) and (8192, 128256) float32 and
float16 and (8, 21, 512, 512) float32, with the device copy bandwidth (a CuPy copy) measured in
the same run; DIR/gpu_benchmark.md gets the times, ratios, GB/s, % of copy bandwidth and the GPU
name.  Without a GPU it says so and exits 0 (2 with ``--require-gpu``).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import subprocess
import sys
import time

import numpy as np

FULL_CASES = [((4096, 32000), "float32"), ((4096, 32000), "float16"),
              ((8192, 128256), "float32"), ((8192, 128256), "float16"),
              ((8, 21, 512, 512), "float32")]
QUICK_CASES = [((4, 40), "float32"), ((4, 40), "float16"), ((1, 3, 4, 4), "float32")]


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
        for F, ft in ((np.float32, nt.float32), (np.float64, nt.float64)):
            fns = gpu._kernels(F)[1]
            for tdt in (nt.int64, nt.int32, nt.uint8):
                sig = (arr(ft, 3), arr(tdt, 2), arr(ft, 1), *(f8,) * 7, nt.boolean, nt.int64,
                       nt.boolean, arr(f8, 1), nt.int64, arr(ft, 3), arr(f8, 2), arr(f8, 2),
                       arr(u1, 2))
                for k in ("index_rows", "index_strided"):
                    cuda.compile_ptx(fns[k], sig, cc=cc)
                    n += 1
            sig = (arr(ft, 3), arr(ft, 3), arr(ft, 1), *(f8,) * 6, nt.boolean, arr(f8, 1),
                   nt.int64, arr(ft, 3), arr(f8, 2), arr(f8, 2))
            for k in ("prob_elems", "prob_rows"):
                cuda.compile_ptx(fns[k], sig, cc=cc)
                n += 1
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
        n += 2
        # The protocol's small kernels; _k_gather_nd casts on its store (float16 included).
        for o, a in ((nt.float16, nt.float32), (nt.float32, nt.float16), (f8, i8),
                     (f8, nt.boolean), (i8, nt.int32)):
            cuda.compile_ptx(gpu._k_gather_nd.py_func, (arr(o, 1), arr(a, 1), i8, arr(i8, 1),
                                                        arr(i8, 1)), cc=cc)
            cuda.compile_ptx(gpu._k_fill.py_func, (arr(o, 1), o), cc=cc)
            n += 2
        cuda.compile_ptx(gpu._k_add.py_func, (arr(nt.float16, 1), arr(f8, 1), arr(f8, 1)), cc=cc)
        cuda.compile_ptx(gpu._k_lse_sign.py_func, (arr(f8, 1), arr(f8, 1)), cc=cc)
        n += 2
        return n
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


def _copy_bandwidth(cupy, timer, nbytes, repeat):
    """GB/s of a device-to-device copy (read + write bytes) of an nbytes buffer."""
    if cupy is None:
        return float("nan")
    src = cupy.empty(nbytes // 4, dtype=np.float32)
    src.fill(1.0)
    dst = cupy.empty_like(src)
    t = timer(lambda: cupy.copyto(dst, src), repeat)
    return 2 * src.nbytes / t / 1e9


def benchmark(cupy, torch, quick, log):
    """Rows of the report: one per (case, mode)."""
    import fastce
    timer = _timer(cupy)
    repeat = 1 if quick else 20
    cases = QUICK_CASES if quick else FULL_CASES
    rng = np.random.default_rng(0)
    rows = []
    biggest = 0
    for shape, dtname in cases:
        dtype = np.dtype(dtname)
        C = shape[1]
        tshape = (shape[0],) + tuple(shape[2:])
        log(f"case {shape} {dtname}")
        if cupy is not None:
            x = (cupy.random.standard_normal(shape, dtype=np.float32) * 3).astype(dtype)
            t = cupy.random.randint(0, C, tshape).astype(np.int64)
        else:
            x = _device_array(None, (rng.standard_normal(shape) * 3).astype(dtype))
            t = _device_array(None, rng.integers(0, C, tshape))
        nbytes_x = math.prod(shape) * dtype.itemsize
        biggest = max(biggest, nbytes_x)

        def fwd():
            return fastce.cross_entropy(x, t)

        def fwd_bwd():
            return fastce.cross_entropy_with_grad(x, t)

        results = {"fwd": timer(fwd, repeat), "fwd+bwd": timer(fwd_bwd, repeat)}
        torch_t = {}
        if torch is not None:
            import torch.nn.functional as F
            xt = torch.as_tensor(x, device="cuda")
            tt = torch.as_tensor(t, device="cuda")
            with torch.no_grad():
                torch_t["fwd"] = timer(lambda: F.cross_entropy(xt, tt), repeat)
            xg = xt.clone().requires_grad_(True)

            def torch_fb():
                xg.grad = None
                F.cross_entropy(xg, tt).backward()
            torch_t["fwd+bwd"] = timer(torch_fb, repeat)
        for mode, sec in results.items():
            # Bytes moved at the minimum: read logits (+ targets); with grad also write it.
            moved = nbytes_x + (nbytes_x if mode == "fwd+bwd" else 0)
            if mode == "fwd+bwd":
                moved += nbytes_x       # the second read of the logits for the gradient
            rows.append(dict(shape=shape, dtype=dtname, mode=mode, fastce=sec,
                             torch=torch_t.get(mode, float("nan")), moved=moved))
        del x, t
    bw = _copy_bandwidth(cupy, timer, max(biggest, 1 << 20), repeat)
    return rows, bw


def write_report(path, rows, bw, gpu_name, quick, notes):
    lines = [f"# fastce GPU benchmark ({'quick' if quick else 'full'})", "",
             f"- GPU: {gpu_name}", f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- device copy bandwidth (CuPy copy, read+write): "
             f"{'n/a' if math.isnan(bw) else f'{bw:.0f} GB/s'}", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "Times are medians (CUDA events); GB/s counts the bytes fastce must move (logits "
              "read once for the loss, twice plus the gradient write for loss+grad).", "",
              "| shape | dtype | mode | fastce ms | torch ms | fastce/torch | fastce GB/s | "
              "% of copy BW |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gbs = r["moved"] / r["fastce"] / 1e9
        ratio = r["fastce"] / r["torch"] if r["torch"] == r["torch"] else float("nan")
        pct = 100 * gbs / bw if bw == bw else float("nan")
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['fastce'] * 1e3:.3f} | "
                     f"{r['torch'] * 1e3:.3f} | {ratio:.2f} | {gbs:.0f} | {pct:.0f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


TEST_FILES = ("test_gpu.py", "test_cross_entropy.py", "test_errors.py")


def tests_dir():
    """fastce's tests/ beside the package (a source checkout), or None (an installed wheel
    has no tests)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tests = os.path.join(root, "tests")
    ok = all(os.path.isfile(os.path.join(tests, f)) for f in TEST_FILES)
    return tests if ok else None


def run_tests(out, log):
    """pytest -m gpu and the GPU-backend tests with CuPy, logged to out/pytest_gpu.log: the
    worst exit code, or None when there are no tests to run."""
    tests = tests_dir()
    if tests is None:
        log("tests: NOT RUN: fastce's tests/ is not beside the package (not a source checkout; "
            "clone the repository to run them, or pass --no-tests)")
        return None
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    logfile = os.path.join(out, "pytest_gpu.log")
    rcs = []
    with open(logfile, "w") as f:
        for args in (["-m", "gpu", tests],
                     [*(os.path.join(tests, name) for name in TEST_FILES), "-k", "gpu"]):
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, cwd=os.path.dirname(tests), env=env, stdout=f,
                                stderr=subprocess.STDOUT).returncode
            f.write(f"[exit {rc}]\n\n")
            rcs.append(rc)
    log(f"tests: exit codes {rcs} (log: {logfile})")
    return max(rcs)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastce.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out", help="output folder")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (simulator friendly)")
    ap.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    ap.add_argument("--ptx", action="store_true", help="only compile the kernels to PTX")
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 when there is no GPU")
    args = ap.parse_args(argv)

    if args.ptx:
        try:
            print(f"compiled {compile_ptx_all()} kernels to PTX")
            return 0
        except NoCompiler as e:
            print(f"fastce.gpu_check: cannot compile: {e}")
            return 2

    os.makedirs(args.out, exist_ok=True)
    logpath = os.path.join(args.out, "gpu_check.log")
    logf = open(logpath, "a")

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
    log(f"GPU: {name}")
    notes = []
    rc_tests = 0
    if not args.no_tests:
        rc_tests = run_tests(args.out, log)
        if rc_tests is None:
            rc_tests = 0
            notes.append("tests: not run (no tests/ beside the package: not a source checkout)")
        else:
            notes.append(f"tests: {'passed' if rc_tests == 0 else f'FAILED (exit {rc_tests})'} "
                         f"(pytest_gpu.log)")
    if torch is None:
        notes.append("torch with CUDA is not available: no torch comparison")
    rows, bw = benchmark(cupy, torch, args.quick, log)
    report = os.path.join(args.out, "gpu_benchmark.md")
    write_report(report, rows, bw, name, args.quick, notes)
    log(f"wrote {report}")
    logf.close()
    return 1 if rc_tests not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
