"""The GPU backend (fastce.gpu) against fastce.spec and the CPU backend.

Run under the Numba CUDA simulator (no GPU needed, tiny shapes):

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_gpu.py -q

Without the simulator and without a GPU, the GPU cases skip; the import test and the PTX
compilation test (which needs only NVVM, not a device) still run.  Tests marked ``gpu`` run
on a real GPU with CuPy (``python -m fastce.gpu_check`` runs them there).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastce
from fastce import spec

from conftest import HAVE_GPU, SIMULATOR, Backend
from helpers import assert_close, record_gpu_launches, spec_loss_and_grad

ON_GPU = SIMULATOR or HAVE_GPU
# The simulator evaluates kernels with NumPy scalars, which warn on inf - inf (NaN expected).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs NUMBA_ENABLE_CUDASIM=1 or a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_GPU = Backend("gpu")
_to, _host = _GPU.to, _GPU.host     # device arrays: the simulator's, else CuPy's


# Shapes chosen to hit every kernel under the simulator: rows (C > SMALL_C, S == 1), rows with
# few classes (one thread per row), strided (N, C, S), unbatched (C,); C=300 > 4 * 32 threads
# reaches the unrolled loops of the row kernels.
SHAPES = [(3, 37), (2, 300), (5, 3), (2, 3, 5), (37,)]
OPTION_SETS = [
    dict(),
    dict(label_smoothing=0.15),
    dict(softcap=2.5),
    dict(z_loss=0.05),
    dict(label_smoothing=0.1, softcap=3.0, z_loss=0.02, ignore_index=1),
]


def _case(rng, shape, *, prob=False, ignore=None, dtype=np.float64):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    C = shape[1] if len(shape) > 1 else shape[0]
    if prob:
        axis = 1 if len(shape) > 1 else 0
        p = rng.random(shape) ** 2
        return x, (p / p.sum(axis=axis, keepdims=True)).astype(dtype)
    tshape = (shape[0],) + tuple(shape[2:]) if len(shape) > 1 else ()
    t = rng.integers(0, C, tshape)
    if ignore is not None and t.ndim:
        t[rng.random(tshape) < 0.3] = ignore
    return x, t


@needs_gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(o) or "plain")
def test_index_targets_match_spec(shape, opts):
    rng = np.random.default_rng(abs(hash((shape, tuple(opts)))) % 2**32)
    x, t = _case(rng, shape, ignore=opts.get("ignore_index"))
    C = shape[1] if len(shape) > 1 else shape[0]
    w = rng.random(C) + 0.5
    for weight in (None, w):
        for reduction in ("mean", "sum", "none"):
            go = None
            if reduction == "none" and len(shape) > 1:
                go = rng.standard_normal(t.shape)
            loss, grad = fastce.cross_entropy_with_grad(
                _to(x), _to(t), _to(weight), grad_output=_to(go) if go is not None else None,
                reduction=reduction, **opts)
            want_l, want_g = spec_loss_and_grad(x, t, weight, reduction=reduction,
                                                grad_output=go, **opts)
            what = f"{shape} {opts} {reduction} weighted={weight is not None}"
            assert_close(_host(loss), want_l, 1e-10, what=what)
            assert_close(_host(grad), want_g, 1e-10, what=what)


@needs_gpu
@pytest.mark.parametrize("shape", [(3, 37), (2, 300), (4, 3), (2, 3, 5)])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.2, softcap=2.0, z_loss=0.1)],
                         ids=["plain", "all"])
def test_probability_targets_match_spec(shape, opts):
    rng = np.random.default_rng(7)
    x, p = _case(rng, shape, prob=True)
    w = rng.random(shape[1]) + 0.5
    for reduction in ("mean", "sum", "none"):
        loss, grad = fastce.cross_entropy_with_grad(_to(x), _to(p), _to(w), reduction=reduction,
                                                    grad_output=2.0 if reduction != "none"
                                                    else None, **opts)
        want_l, want_g = spec_loss_and_grad(x, p, w, reduction=reduction,
                                            grad_output=2.0 if reduction != "none" else None,
                                            **opts)
        assert_close(_host(loss), want_l, 1e-10, what=reduction)
        assert_close(_host(grad), want_g, 1e-10, what=reduction)


@needs_gpu
@pytest.mark.parametrize("shape", [(4, 37), (2, 6, 3)])
def test_float32_and_float16_match_cpu(shape):
    rng = np.random.default_rng(3)
    for dtype, rtol in ((np.float32, 2e-5), (np.float16, 2e-3)):
        x, t = _case(rng, shape, dtype=dtype)
        w = (rng.random(shape[1]) + 0.5).astype(np.float32)
        for reduction in ("mean", "none"):
            loss, grad = fastce.cross_entropy_with_grad(_to(x), _to(t), _to(w),
                                                        reduction=reduction, label_smoothing=0.1)
            cl, cg = fastce.cross_entropy_with_grad(x, t, w, reduction=reduction,
                                                    label_smoothing=0.1)
            lh, gh = _host(loss), _host(grad)
            assert lh.dtype == dtype and gh.dtype == dtype and gh.shape == x.shape
            assert_close(lh, cl, rtol, what=f"{dtype} loss")
            assert_close(gh, cg, rtol, what=f"{dtype} grad")


@needs_gpu
@pytest.mark.parametrize("shape", [(4, 37), (2, 6, 3), (5, 3)])
@pytest.mark.parametrize("prob", [False, True])
def test_float16_is_read_and_written_as_it_is(monkeypatch, shape, prob):
    """float16 logits go to the kernels without a float32 copy and the gradient is written in
    float16: the float32 computation on the same values, its gradient rounded once."""
    from fastce import gpu
    rng = np.random.default_rng(26)
    x, t = _case(rng, shape, prob=prob, dtype=np.float16)
    w = (rng.random(shape[1]) + 0.5).astype(np.float32)
    opts = dict(label_smoothing=0.1, softcap=4.0, z_loss=0.01)
    if not prob:
        opts["weight"] = _to(w)
    wide_loss, wide_grad = fastce.cross_entropy_with_grad(_to(x.astype(np.float32)),
                                                          _to(t.astype(np.float32) if prob else t),
                                                          **opts)
    sources = []
    gather = gpu._gather
    monkeypatch.setattr(gpu, "_gather", lambda d, *a: sources.append(d) or gather(d, *a))
    xd = _to(x)
    loss, grad = fastce.cross_entropy_with_grad(xd, _to(t), **opts)
    assert not any(d is xd for d in sources)           # (probability targets: a float32 copy)
    gh = _host(grad)
    assert gh.dtype == np.float16 and _host(loss).dtype == np.float16
    # The same float32 arithmetic (bitwise under the simulator; a real GPU's compiler may
    # contract the two kernels' operations differently).
    np.testing.assert_array_max_ulp(gh, _host(wide_grad).astype(np.float16),
                                    maxulp=0 if SIMULATOR else 1)
    assert_close(_host(loss).astype(np.float64), _host(wide_loss), 1e-3)


@needs_gpu
def test_scalar_results_are_0d_device_arrays():
    rng = np.random.default_rng(1)
    x, t = _case(rng, (3, 37))
    loss = fastce.cross_entropy(_to(x), _to(t))
    assert not isinstance(loss, (float, np.generic, np.ndarray))
    assert _host(loss).shape == ()
    assert float(loss) == pytest.approx(spec.cross_entropy(x[:, :, None], t[:, None]), rel=1e-12)
    if SIMULATOR:
        assert hasattr(loss, "copy_to_host")      # a Numba device array for Numba inputs


@needs_gpu
def test_class_axis_and_loss_object():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 6))
    t = rng.integers(0, 6, (2, 3))
    fn = fastce.CrossEntropyLoss(label_smoothing=0.1, class_axis=-1, reduction="sum")
    got_l, got_g = fn.with_grad(_to(x), _to(t))
    want_l, want_g = fastce.cross_entropy_with_grad(x, t, label_smoothing=0.1, class_axis=-1,
                                                    reduction="sum")
    assert_close(_host(got_l), want_l, 1e-10)
    assert_close(_host(got_g), want_g, 1e-10)


@needs_gpu
def test_deterministic_and_inputs_untouched():
    rng = np.random.default_rng(10)
    x, t = _case(rng, (7, 37))
    xd, td = _to(x), _to(t)
    runs = [fastce.cross_entropy_with_grad(xd, td, label_smoothing=0.1) for _ in range(2)]
    assert _host(runs[0][0]).tobytes() == _host(runs[1][0]).tobytes()
    assert _host(runs[0][1]).tobytes() == _host(runs[1][1]).tobytes()
    assert np.array_equal(_host(xd), x) and np.array_equal(_host(td), t)


@needs_gpu
def test_total_is_a_fixed_order_two_stage_sum():
    from fastce import gpu
    a = np.random.default_rng(11).standard_normal(1000)
    d = gpu.BACKEND.asarray(_to(a))
    assert gpu.BACKEND.total(d) == pytest.approx(float(np.sum(a)), rel=1e-12)
    # Integers sum exactly in float64: a partial sum dropped or counted twice shows.
    ints = np.random.default_rng(12).integers(-1000, 1000, 1000).astype(np.float64)
    assert gpu.BACKEND.total(gpu.BACKEND.asarray(_to(ints))) == float(ints.sum())
    D, n, bad = gpu.BACKEND.target_stats(gpu.BACKEND.asarray(_to(np.array([[0, 2, -100, 1]]))),
                                         gpu.BACKEND.asarray(_to(np.array([1.0, 2.0, 3.0]))),
                                         -100, 3)
    assert (D, n, bad) == (6.0, 3, -1)


@needs_gpu
def test_non_contiguous_device_input():
    """Strided device views of any ndim (negative strides too) are read through one copy."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 9))
    t = rng.integers(0, 5, 4)
    xd = _to(x)[:, ::2]                      # a strided device view (4, 5)
    assert_close(_host(fastce.cross_entropy(xd, _to(t))),
           fastce.cross_entropy(np.ascontiguousarray(x[:, ::2]), t), 1e-12)
    x6 = rng.standard_normal((2, 6, 2, 3, 2, 4))
    t6 = rng.integers(0, 3, (2, 2, 3, 2, 2))
    view = (slice(None), slice(None, None, -2), slice(None), slice(None), slice(None),
            slice(None, None, 2))            # (2, 3, 2, 3, 2, 2), 6-D, a negative stride
    loss, grad = fastce.cross_entropy_with_grad(_to(x6)[view], _to(t6), reduction="none")
    want_l, want_g = fastce.cross_entropy_with_grad(np.ascontiguousarray(x6[view]), t6,
                                                    reduction="none")
    assert_close(_host(loss), want_l, 1e-12)
    assert_close(_host(grad), want_g, 1e-12)


# --- dispatch: arguments on different devices -----------------------------------------------
@needs_gpu
@pytest.mark.parametrize("which", ["target", "weight", "grad_output"])
def test_mixed_devices_raise_naming_the_argument(which):
    rng = np.random.default_rng(13)
    x, t = _case(rng, (3, 5))
    w = rng.random(5)
    go = rng.standard_normal(3)
    args = dict(target=_to(t), weight=_to(w), grad_output=_to(go))
    args[which] = {"target": t, "weight": w, "grad_output": go}[which]
    with pytest.raises(TypeError, match=repr(which)):
        fastce.cross_entropy_backward(_to(x), args["target"], args["grad_output"],
                                      args["weight"], reduction="none")
    # the other direction: host input with a device argument
    args = dict(target=t, weight=w, grad_output=go)
    args[which] = _to(args[which])
    with pytest.raises(TypeError, match=repr(which)):
        fastce.cross_entropy_backward(x, args["target"], args["grad_output"], args["weight"],
                                      reduction="none")


@needs_gpu
def test_scalar_grad_output_on_host_is_allowed():
    rng = np.random.default_rng(14)
    x, t = _case(rng, (3, 37))
    g1 = _host(fastce.cross_entropy_backward(_to(x), _to(t), 2.0))
    g2 = _host(fastce.cross_entropy_backward(_to(x), _to(t), np.float64(2.0)))
    assert_close(g1, 2 * _host(fastce.cross_entropy_backward(_to(x), _to(t))), 1e-12)
    assert_close(g2, g1, 0)


# --- without a GPU ---------------------------------------------------------------------------
def test_import_fastce_without_cupy_or_gpu():
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import fastce, fastce.gpu, numpy as np\n"
            "assert 'cupy' not in sys.modules or sys.modules['cupy'] is None\n"
            "print(float(fastce.cross_entropy(np.zeros((2, 3)), np.array([0, 1]))))\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == pytest.approx(np.log(3.0))


def test_kernels_compile_to_ptx():
    """Every loss kernel compiles for a real GPU (sm_80): needs NVVM only, not a device."""
    if SIMULATOR:
        pytest.skip("the simulator has no compiler")
    from fastce import gpu_check
    try:
        n = gpu_check.compile_ptx_all(cc=(8, 0))
    except gpu_check.NoCompiler as e:
        pytest.skip(str(e))
    assert n == 51          # every kernel of fastce.gpu (update when adding one)


def test_gpu_check_times_a_fresh_process_compiling_then_loading_the_kernels(tmp_path,
                                                                             monkeypatch):
    """gpu_check's kernel cache step (its subprocesses faked here: they need a GPU): both
    first calls and the cache's warnings in cache.json, one line for the summary."""
    import subprocess
    from fastce import gpu_check
    outputs = iter([(0, '{"import_s": 1.0, "first_call_s": 9.5}', ""),
                    (0, '{"import_s": 1.0, "first_call_s": 0.25}',
                     "UserWarning: fastce: GPU kernel cache not loaded (EOFError: x)")])
    seen = []

    def run(cmd, env, **kw):
        seen.append(env["NUMBA_CACHE_DIR"])
        rc, out, err = next(outputs)
        return subprocess.CompletedProcess(cmd, rc, out, err)

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    line = gpu_check.kernel_cache_check(str(tmp_path), lambda msg: None, timeout=5)
    assert line.startswith("kernel cache: first loss+grad of a fresh process 9.50 s compiling, "
                           "0.25 s from the cache")
    assert seen[0] == seen[1]                          # one cache directory for both runs
    report = json.loads((tmp_path / "cache.json").read_text())
    assert [r["run"] for r in report["runs"]] == ["compiled", "cached"]
    assert report["runs"][1]["cache warnings"] == [
        "UserWarning: fastce: GPU kernel cache not loaded (EOFError: x)"]


def test_kernels_are_cached_on_disk_and_a_failing_cache_only_warns():
    """Off the simulator every kernel is a cached dispatcher (compiled once per machine, as the
    CPU's); a cache entry that fails to load or save costs a compile and a warning."""
    if SIMULATOR:
        pytest.skip("the simulator compiles nothing")
    from fastce import gpu
    kernels = [gpu._k_sum, gpu._k_stats, gpu._k_loss, *gpu._kernels(np.float32)[0].values()]
    assert all(isinstance(k._cache, gpu._SoftCache) for k in kernels)

    class Broken:
        def load_overload(self, *args):
            raise OSError("no such file")

        def save_overload(self, *args):
            raise EOFError("truncated")

    soft = gpu._SoftCache(Broken())
    with pytest.warns(UserWarning, match="not loaded .OSError: no such file"):
        assert soft.load_overload("sig", None) is None
    with pytest.warns(UserWarning, match="not saved .EOFError: truncated"):
        soft.save_overload("sig", None)


@needs_gpu
def test_gpu_check_quick_mode(tmp_path):
    if not SIMULATOR:
        pytest.skip("quick mode is exercised under the simulator")
    from fastce import gpu_check
    rc = gpu_check.main(["--out", str(tmp_path), "--quick", "--no-tests"])
    assert rc == 0
    bench = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    parity = [json.loads(line) for line in (tmp_path / "parity.jsonl").read_text().splitlines()]
    assert [r["case"] for r in bench] == [c.name for c in gpu_check.QUICK_CASES]
    assert all(r["fastce fwd"] > 0 and r["fastce fwd+bwd"] > 0 for r in bench)
    assert len(parity) == len(bench) and all(p["repeat_bitwise"] for p in parity)
    assert all(p["loss_max_rel"] < 1e-2 and p["grad_max_abs_over_max"] < 1e-2 for p in parity)
    report = (tmp_path / "summary.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| case | fastce fwd ms")
    assert json.loads((tmp_path / "preflight.json").read_text())["trivial launch"] is True


def test_asv_gpu_benchmarks_skip_without_gpu():
    if HAVE_GPU:
        pytest.skip("a GPU is present")
    import importlib.util
    path = os.path.join(ROOT, "asv_bench", "benchmarks", "bench_gpu.py")
    spec_ = importlib.util.spec_from_file_location("fastce_asv_bench_gpu", path)
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    with pytest.raises(NotImplementedError):
        mod.GPUShapes().setup("4096x32000-f32", mod.FORWARD)
    with pytest.raises(NotImplementedError):
        mod.GPUCopyBandwidth().setup()


# --- streams ---------------------------------------------------------------------------------
@pytest.mark.skipif(not SIMULATOR, reason="records the simulator's kernel launches")
def test_every_launch_and_host_copy_of_a_call_is_on_the_call_stream(monkeypatch):
    call_stream, launches = record_gpu_launches(monkeypatch)
    rng = np.random.default_rng(21)
    x, t = _case(rng, (4, 40), ignore=1)
    x4, t4 = _case(rng, (2, 3, 5))
    xp, p = _case(rng, (3, 37), prob=True)
    w = rng.random(40) + 0.5
    xd, td, wd = _to(x), _to(t), _to(w)
    fastce.cross_entropy(xd, td, wd, ignore_index=1, return_token_accuracy=True)
    fastce.cross_entropy_with_grad(_to(np.ascontiguousarray(x.T)).T, td, label_smoothing=0.1)
    fastce.cross_entropy_backward(_to(x4), _to(t4), reduction="sum")
    fastce.cross_entropy(_to(xp), _to(p))
    fastce.nll_loss(fastce.log_softmax(xd, axis=1), td, wd, ignore_index=1)
    fastce.logsumexp(xd, axis=1, b=_to(np.abs(x)))
    kernels = {name for name, _ in launches}
    assert {"_k_stats", "_k_sum", "index_rows", "index_strided", "prob_rows", "softmax_rows",
            "_k_nll", "_k_gather_nd", "_k_lse_weighted"} <= kernels, kernels
    off = [(name, cfg) for name, cfg in launches if len(cfg) < 3 or cfg[2] is not call_stream]
    assert not off, off
    assert call_stream.waits >= 4      # the host read stats and totals after the call's work


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_a_call_reads_back_only_its_target_statistics(monkeypatch, dtype):
    """The reduced loss stays on the device: a call's one host copy is the target check (the
    mean's denominator, bad targets); token accuracy, a Python float, is one more."""
    from fastce import gpu
    copies = []
    host_copy = gpu._host_copy
    monkeypatch.setattr(gpu, "_host_copy", lambda d: copies.append(d.size) or host_copy(d))
    rng = np.random.default_rng(24)
    x, t = _case(rng, (4, 40), ignore=1, dtype=dtype)
    w = (rng.random(40) + 0.5).astype(dtype)
    xd, td, wd = _to(x), _to(t), _to(w)
    calls = [
        (lambda: fastce.cross_entropy(xd, td, wd, ignore_index=1), 1),
        (lambda: fastce.cross_entropy(xd, td, wd, ignore_index=1, reduction="sum",
                                      z_loss=0.01), 1),
        (lambda: fastce.cross_entropy_with_grad(xd, td, label_smoothing=0.1)[0], 1),
        (lambda: fastce.nll_loss(xd, td, wd, ignore_index=1), 1),
        (lambda: fastce.cross_entropy(xd, td, return_token_accuracy=True).loss, 2),
    ]
    for call, expected in calls:
        copies.clear()
        call()
        assert len(copies) == expected, copies
        assert copies[0] == 3                          # (D, count, first bad position)
    cpu = fastce.cross_entropy(x, t, w, ignore_index=1, z_loss=0.01)
    got = fastce.cross_entropy(xd, td, wd, ignore_index=1, z_loss=0.01)
    assert _host(got).dtype == cpu.dtype and _host(got).shape == ()
    assert_close(_host(got), cpu, 1e-6 if dtype == np.float64 else 3e-3)


@needs_gpu
@pytest.mark.parametrize("n", [1, 31, 300, 5000])
def test_target_statistics_fold_on_the_device(n):
    """The per-block partials of the target statistics folded by a second kernel: the same
    denominators and first bad position as the CPU's, over one or several blocks."""
    from fastce import cpu, gpu
    rng = np.random.default_rng(27)
    C = 7
    w = rng.random(C) + 0.5
    t = rng.integers(-1, C, (1, n))
    t[0, ::3] = -100
    D, count, bad = gpu.target_stats(_to(t), _to(w), -100, C)
    cD, ccount, cbad = cpu.BACKEND.target_stats(t, w, -100, C)
    assert (count, bad) == (ccount, cbad) and D == pytest.approx(cD, rel=1e-12)
    assert bad == (int(np.flatnonzero(t[0] == -1)[0]) if (t == -1).any() else -1)


@needs_gpu
def test_reduced_loss_over_zero_weight_is_nan_on_the_device():
    rng = np.random.default_rng(25)
    x, t = _case(rng, (3, 37))
    w = np.zeros(37)
    loss = fastce.cross_entropy(_to(x), _to(t), _to(w), z_loss=0.1)
    assert np.isnan(_host(loss))
    assert np.isnan(_host(fastce.nll_loss(_to(x), _to(t), _to(w))))
    assert _host(fastce.cross_entropy(_to(x), _to(t), _to(w), reduction="sum")) == 0.0


def test_producer_streams_are_waited_for_with_an_event(monkeypatch):
    """An argument whose __cuda_array_interface__ names a stream other than the call's: the
    call's stream waits for it on the device (an event), the host does not."""
    from fastce import gpu
    log = []

    class Event:
        def record(self, stream):
            log.append(("record", stream))

        def wait(self, stream):
            log.append(("wait", stream))

    monkeypatch.setattr(gpu.cuda, "event", lambda timing=False: Event())
    monkeypatch.setattr(gpu, "_stream_handle", lambda: 0xC0FFEE)
    monkeypatch.setattr(gpu, "_stream", lambda: "call")
    monkeypatch.setattr(gpu, "_numba_stream", lambda device, handle: f"stream {handle:#x}")
    monkeypatch.setattr(gpu, "_device_id", lambda: 0)
    gpu._wait_for_producer(None)           # nothing pending (interface v2, or no stream)
    gpu._wait_for_producer(0xC0FFEE)       # the call's own stream
    assert log == []
    gpu._wait_for_producer(gpu.LEGACY_STREAM)
    assert log == [("record", "stream 0x1"), ("wait", "call")]


# --- real GPU (CuPy) -------------------------------------------------------------------------
def _pending_logits(cupy, host):
    """A device copy of ``host`` that the current stream writes only after ~100 ms of other
    work: a kernel on any other stream that does not wait for it reads zeros."""
    x = cupy.zeros(host.shape, host.dtype)
    busy = cupy.ones((2048, 2048), cupy.float32)
    for _ in range(100):
        busy = busy @ busy * np.float32(1 / 2048)
    x += cupy.asarray(host) + busy[0, 0] - 1        # busy[0, 0] == 1
    return x


@pytest.mark.gpu
def test_runs_on_cupys_current_non_blocking_stream_after_its_pending_work():
    import cupy
    rng = np.random.default_rng(22)
    x, t = _case(rng, (512, 3000), dtype=np.float32)
    want_loss, want_grad = fastce.cross_entropy_with_grad(x, t)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        xd = _pending_logits(cupy, x)
        loss, grad = fastce.cross_entropy_with_grad(xd, cupy.asarray(t))
        grad_host = cupy.asnumpy(grad)      # on the stream, after fastce's work
    assert_close(float(loss), want_loss, 1e-5)
    assert_close(grad_host, want_grad, 1e-5)


@pytest.mark.gpu
def test_a_producer_stream_named_by_the_array_interface_is_waited_for():
    """An array whose __cuda_array_interface__ (v3) names a non-blocking stream with work still
    queued: fastce, on CuPy's current (default) stream, waits for it with an event."""
    import cupy
    rng = np.random.default_rng(23)
    x, t = _case(rng, (512, 3000), dtype=np.float32)
    want = fastce.cross_entropy(x, t)
    producer = cupy.cuda.Stream(non_blocking=True)
    with producer:
        xd = _pending_logits(cupy, x)

    class Exported:
        __cuda_array_interface__ = {**xd.__cuda_array_interface__, "stream": producer.ptr,
                                    "version": 3}

    loss = fastce.cross_entropy(Exported(), cupy.asarray(t))
    assert_close(float(cupy.asnumpy(loss)), want, 1e-5)


@pytest.mark.gpu
def test_cupy_arrays_in_cupy_arrays_out():
    import cupy
    rng = np.random.default_rng(15)
    x, t = _case(rng, (64, 1000), dtype=np.float32)
    xd, td = cupy.asarray(x), cupy.asarray(t)
    loss, grad = fastce.cross_entropy_with_grad(xd, td, label_smoothing=0.1)
    assert isinstance(loss, cupy.ndarray) and loss.shape == () and loss.dtype == np.float32
    assert isinstance(grad, cupy.ndarray) and grad.shape == x.shape
    cl, cg = fastce.cross_entropy_with_grad(x, t, label_smoothing=0.1)
    assert_close(cupy.asnumpy(loss), cl, 1e-5)
    assert_close(cupy.asnumpy(grad), cg, 1e-5)
    per = fastce.cross_entropy(xd, td, reduction="none")
    assert isinstance(per, cupy.ndarray)
    x4 = rng.standard_normal((2, 5, 16, 16)).astype(np.float32)
    t4 = rng.integers(0, 5, (2, 16, 16))
    assert_close(cupy.asnumpy(fastce.cross_entropy_backward(cupy.asarray(x4), cupy.asarray(t4))),
                 fastce.cross_entropy_backward(x4, t4), 1e-5)


@pytest.mark.gpu
def test_cupy_large_rows_match_cpu():
    import cupy
    rng = np.random.default_rng(16)
    x = (rng.standard_normal((256, 32000)) * 4).astype(np.float32)
    t = rng.integers(0, 32000, 256)
    t[::7] = -100
    gl, gg = fastce.cross_entropy_with_grad(cupy.asarray(x), cupy.asarray(t), softcap=30.0,
                                            z_loss=1e-4)
    cl, cg = fastce.cross_entropy_with_grad(x, t, softcap=30.0, z_loss=1e-4)
    assert_close(cupy.asnumpy(gl), cl, 1e-5)
    assert_close(cupy.asnumpy(gg), cg, 1e-4)


@needs_gpu
@pytest.mark.parametrize("shape", [(3, 37), (5, 3), (2, 3, 4)])
def test_bfloat16_read_and_written_by_the_index_kernels(monkeypatch, shape):
    """bfloat16 logits (ml_dtypes on the device: Numba arrays, or a torch / ml_dtypes '<V2'
    interface) reach the index kernels as their bits; the loss is float32, the gradient
    bfloat16 rounded to nearest even: the CPU's bits.  out= float32, out=input, a strided
    input, probability targets and nll_loss go through float32 copies; no float32 copy of the
    logits otherwise."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from fastce import gpu
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(31)
    x, t = _case(rng, shape, ignore=1, dtype=np.float32)
    x = x.astype(bf16)
    C = shape[1]
    w = (rng.random(C) + 0.5).astype(np.float32)
    widened = []
    copy_as = gpu._copy_as
    monkeypatch.setattr(gpu, "_copy_as", lambda d, dt: (d.dtype == bf16 and widened.append(
        d.shape)) or copy_as(d, dt))
    for opts in (dict(ignore_index=1), dict(label_smoothing=0.1, z_loss=0.01, ignore_index=1),
                 dict(reduction="none", softcap=3.0)):
        loss, grad = fastce.cross_entropy_with_grad(_to(x), _to(t), _to(w), **opts)
        want_l, want_g = fastce.cross_entropy_with_grad(x, t, w, **opts)
        assert _host(loss).dtype == np.float32 and _host(grad).dtype == bf16
        assert_close(_host(loss), want_l, 1e-6)
        np.testing.assert_array_equal(_host(grad).view(np.uint16), want_g.view(np.uint16))
        only = fastce.cross_entropy(_to(x), _to(t), _to(w), **opts)
        assert_close(_host(only), want_l, 1e-6)
    assert not widened
    want_l, want_g = fastce.cross_entropy_with_grad(x, t)
    out32 = _to(np.zeros(shape, np.float32))
    fastce.cross_entropy_with_grad(_to(x), _to(t), out=out32)
    np.testing.assert_array_equal(_host(out32).astype(bf16).view(np.uint16),
                                  want_g.view(np.uint16))
    xd = _to(x)
    fastce.cross_entropy_with_grad(xd, _to(t), out=xd)
    np.testing.assert_array_equal(_host(xd).view(np.uint16), want_g.view(np.uint16))
    perm = tuple(reversed(range(x.ndim)))                      # a strided device view
    _, gs = fastce.cross_entropy_with_grad(_to(np.ascontiguousarray(x.transpose(perm)))
                                           .transpose(perm), _to(t))
    np.testing.assert_array_equal(_host(gs).view(np.uint16), want_g.view(np.uint16))
    p = rng.random(shape).astype(np.float32)
    p /= p.sum(axis=1, keepdims=True)
    pl, pg = fastce.cross_entropy_with_grad(_to(x), _to(p))
    cl, cg = fastce.cross_entropy_with_grad(x, p)
    assert_close(_host(pl), cl, 1e-6)
    np.testing.assert_array_equal(_host(pg).view(np.uint16), cg.view(np.uint16))
    assert_close(_host(fastce.nll_loss(_to(x), _to(t), ignore_index=1)),
                 fastce.nll_loss(x, t, ignore_index=1), 1e-6)
    bad = t.copy()
    bad.flat[-1] = C + 2
    per, g = fastce.cross_entropy_with_grad(_to(x), _to(bad), reduction="none",
                                            check_targets=False)
    assert np.isnan(_host(per).flat[-1]) and np.isnan(
        np.moveaxis(_host(g).astype(np.float32), 1, -1).reshape(-1, C)[-1]).all()
    with pytest.raises(TypeError, match="bfloat16"):
        fastce.softmax(_to(x), axis=1)
