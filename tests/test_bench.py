"""The demo, ``python -m fastce bench --quick`` and the asv suite run (CPU, seconds each)."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fastce import bench

ROOT = Path(__file__).resolve().parents[1]
ASV_DIR = ROOT / "asv_bench"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(args, timeout=120, cwd=ROOT):
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------
def test_demo_values_are_computed_by_fastce():
    values = bench.demo_values()
    assert [round(f, 4) for _, f, _, _ in values] == [1.4803, 1.6075, 1.5472]
    assert [round(m, 4) for _, _, m, _ in values] == [1.4803, 1.6075, 1.5472]


def test_python_m_fastce_demo():
    out = _run([sys.executable, "-m", "fastce"]).stdout
    for value in ("1.4803", "1.6075", "1.5472"):
        # fastce.cross_entropy, CrossEntropyLoss and the "torch prints" column
        assert len(re.findall(re.escape(value), out)) >= 3, out
    assert "sum of the targets' weights" in out
    assert "forward" in out and "loss+grad" in out


# ---------------------------------------------------------------------------------------------
# The NumPy baseline and the benchmark helpers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["W1", "W2", "W3", "W4", "W5"])
def test_numpy_baseline_matches_fastce(name):
    p = bench.make_workload(name, quick=True)
    loss, grad = bench.numpy_cross_entropy_with_grad(p.x, p.target, p.weight, p.ignore_index)
    ref_loss, ref_grad = bench.fastce.cross_entropy_with_grad(p.x, p.target, p.weight,
                                                              ignore_index=p.ignore_index)
    assert bench.numpy_cross_entropy(p.x, p.target, p.weight, p.ignore_index) == loss
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-9)
    if p.workload.ignore_fraction:
        assert np.any(p.target == p.ignore_index)
    e = bench.exactness(p)
    assert e["loss_rel"] < 1e-5 and e["grad_rel"] < 1e-5


def test_side_by_side_rounds_vary_the_order(monkeypatch):
    """Every callable gets one sample per round, and the rounds take them in different orders
    (the same in every run), so that no row always follows the same library."""
    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
    monkeypatch.setattr(bench, "_calibrate", lambda fn: 1)
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abcd"}
    for _ in range(2):
        calls.clear()
        times = bench.measure_side_by_side(fns, repeats=6, warmup=0)
        assert set(times) == set("abcd")
        rounds = ["".join(calls[i:i + 4]) for i in range(0, 24, 4)]
        assert all(sorted(r) == list("abcd") for r in rounds)
        assert rounds[0] == "abcd" and len(set(rounds)) > 2
        predecessors = {r[r.index("b") - 1] for r in rounds if r.index("b")}
        assert len(predecessors) > 1
        if _ == 0:
            first = rounds
    assert rounds == first


def test_goals_evaluation():
    times = {("W1", "forward", "fastce"): 1.0, ("W1", "forward", "jax"): 2.0,
             ("W1", "forward", "exp roof"): 0.5, ("W1", "loss+grad", "fastce-out"): 0.9,
             ("W3", "forward", "fastce"): 3.0, ("W3", "forward", "torch"): 10.0,
             ("W3", "forward", "torch-1t"): 5.0}
    res = {g.text: (r, ok) for g, r, ok in bench.evaluate_goals(times)}
    assert res["W1 forward <= 0.4x JAX"] == (0.5, False)
    assert res["W1 forward <= 1.15x exp roof"] == (2.0, False)
    assert res["W1 loss+grad out= <= 2.0x exp roof"] == (1.8, True)   # vs the forward's roof
    assert res["W3 forward <= 0.7x torch"] == (0.6, True)       # the faster torch counts
    assert res["W2 forward <= 0.3x torch"] == (None, None)


def test_bench_quick_cli():
    proc = _run([sys.executable, "-m", "fastce", "bench", "--quick", "--workloads", "W2,W3",
                 "--repeats", "2"], timeout=180)
    out = proc.stdout
    for lib in ("fastce", "numpy"):
        assert re.search(rf"W2\s+forward\s+{lib}\b", out), out
        assert re.search(rf"W3\s+loss\+grad\s+{lib}\b", out), out
    assert "exactness" in out and "goals" in out
    assert "[bench]" in proc.stderr          # progress goes to stderr


def test_bench_roofline_rows_and_ratios():
    """The read and exp roof rows are timed with fastce in one round-robin run, and the printed
    ratios are fastce's times divided by theirs."""
    out = io.StringIO()
    res = bench.run_bench(["W1"], quick=True, repeats=2, out=out, libraries=["fastce"],
                          progress=lambda m: None)
    times, text = res["times"], out.getvalue()
    for row in (bench.READ, bench.ROOF):
        assert 0 < times[("W1", "forward", row)] < 10, times
        assert re.search(rf"W1\s+forward\s+{row}\b", text), text
    ratios = bench.roofline_ratios(times)
    assert set(ratios) == {(op, row) for op in ("forward", "loss+grad")
                           for row in (bench.READ, bench.ROOF)}
    for (op, row), r in ratios.items():
        assert math.isfinite(r) and r > 0
        assert r == times[("W1", op, "fastce")] / times[("W1", "forward", row)]
    m = re.search(r"fastce forward\s+([0-9.]+)x read\s+([0-9.]+)x exp roof", text)
    assert m, text
    assert float(m.group(2)) == pytest.approx(ratios[("forward", bench.ROOF)], abs=0.006)
    # The exp roof does strictly more than the read: the max and an exp per logit.
    assert times[("W1", "forward", bench.ROOF)] > 0.5 * times[("W1", "forward", bench.READ)]


def test_bench_without_bf16_workloads_prints_no_bf16_section():
    out = io.StringIO()
    bench.run_bench(["W3"], quick=True, repeats=2, out=out, libraries=["fastce"],
                    progress=lambda m: None)
    text = out.getvalue()
    assert re.search(r"W3\s+forward\s+fastce", text), text
    assert "bfloat16 logits" not in text and "bfloat16 forward:" not in text
    assert "[skip] W1 bfloat16 forward <= 1.05x float32: not measured" in text   # goals list


def test_roofline_kernels_compute_row_sums():
    x = np.random.default_rng(1).standard_normal((5, 300)).astype(np.float32)
    p = bench.Problem(bench.WORKLOADS["W1"], x, np.zeros(5, np.int64), None, -100)
    fns = bench.roofline_impls(p)
    assert set(fns) == {bench.READ, bench.ROOF}
    out = np.empty(5, np.float32)
    bench._read_rows(x, out)
    np.testing.assert_allclose(out, x.sum(axis=1), rtol=1e-5, atol=1e-4)
    bench._exp_roof_rows(x, out)
    ref = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True)).sum(axis=1)
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_cpu_target_honours_numba_cpu_name():
    code = ("from fastce import bench; n, w, r = bench.cpu_target(); print(n, w, r)")
    env = _env()
    env.update(NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="+avx,+avx2,+fma",
               NUMBA_CACHE_DIR=str(Path(tempfile.mkdtemp())))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    name, width, reg = proc.stdout.split()
    assert (name, width) == ("haswell", "256") and reg in ("ymm", "xmm"), proc.stdout
    name, width, reg = bench.cpu_target()
    assert name and reg in ("zmm", "ymm", "xmm")


def test_bench_softmax_quick():
    import io
    out = io.StringIO()
    res = bench.run_softmax_bench(quick=True, repeats=1, out=out, progress=lambda m: None,
                                  max_time=0.5)
    text = out.getvalue()
    for name in bench.SOFTMAX_FUNCS:
        assert re.search(rf"{name}\s+[\d.]+ ms\s+[\d.]+ ms", text), text
        assert (name, "axis=None") in res["times"] and (name, "scipy") in res["times"]
    assert "axis=(1, 2)" in text and "softmax goals" in text
    x = np.zeros((4, 16), np.float32)
    forms = bench.softmax_forms(x)
    assert all(a.size == x.size for a, _ in forms.values())


def test_bench_rejects_unknown_workload():
    proc = subprocess.run([sys.executable, "-m", "fastce", "bench", "--workloads", "W9"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "W9" in proc.stderr


# ---------------------------------------------------------------------------------------------
# asv
# ---------------------------------------------------------------------------------------------
def _load_suite():
    path = ASV_DIR / "benchmarks" / "bench_cross_entropy.py"
    spec = importlib.util.spec_from_file_location("fastce_asv_bench_cross_entropy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_asv_suite_direct_call():
    mod = _load_suite()
    b = mod.Shapes()
    for op in mod.OPS:
        b.setup("256x10", op)
        b.time_call("256x10", op)
        assert b.track_gbps("256x10", op) > 0
    assert mod.Shapes.track_gbps.unit == "GB/s"
    t = mod.Throughput()
    with pytest.raises(NotImplementedError):
        t.setup(8192, 256000, "forward")        # over the size cap: skipped by asv
    w = mod.Workloads()
    w.setup("W3", "loss+grad")
    w.time_call("W3", "loss+grad")
    assert mod.ROOFLINE_ROWS == [bench.READ, bench.ROOF]
    r = mod.Roofline()
    r.shape = (64, 4000)
    ratios = r.setup_cache()
    for op in mod.OPS:
        for row in mod.Roofline.params[1]:
            v = r.track_ratio(ratios, op, row)
            assert math.isfinite(v) and v > 0
    assert len(ratios) == 4
    pt = mod.ProbabilityTargets()
    for shape, op in (("4096x2000", "forward"), ("8x21x256x256", "loss+grad")):
        mod.PROB_SHAPES[shape] = (64, 100) if shape == "4096x2000" else (2, 5, 8, 8)
        pt.setup(shape, op)
        pt.time_call(shape, op)
        v = pt.track_vs_index_targets(shape, op)
        assert math.isfinite(v) and v > 0
    pc = mod.PerCall()
    for args in mod.PerCall.params[0]:
        for op in mod.OPS:
            pc.setup(args, op)
            pc.time_call(args, op)
    assert math.isfinite(pc.track_vs_plain(args, op)) and mod.PerCall.track_vs_plain.unit == "x"


def test_asv_softmax_suite_direct_call():
    path = ASV_DIR / "benchmarks" / "bench_softmax.py"
    spec = importlib.util.spec_from_file_location("fastce_asv_bench_softmax", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert set(mod.AxisForms.params[1]) >= {"axis=-1", "axis=(1, 2)", "axis=None"}
    mod.FORMS = {k: ((8, 4, 100) if len(shape) == 3 else (8, 400), axis)
                 for k, (shape, axis) in mod.FORMS.items()}     # small shapes for the test
    for form in mod.FORMS:
        b = mod.AxisForms()
        b.setup("softmax", form)
        b.time_call("softmax", form)
    w = mod.Weighted()
    w.setup("axis=None")
    w.time_logsumexp_b("axis=None")


def test_asv_conf_is_valid_json():
    text = (ASV_DIR / "asv.conf.json").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
    conf = json.loads(text)
    assert conf["benchmark_dir"] == "benchmarks" and conf["repo"] == ".."


def _asv_conf_copy(tmp_path):
    """asv_bench's configuration with absolute paths and results/html under tmp_path."""
    text = (ASV_DIR / "asv.conf.json").read_text()
    conf = json.loads("\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//")))
    conf.update(repo=str(ROOT), benchmark_dir=str(ASV_DIR / "benchmarks"),
                results_dir=str(tmp_path / "results"), html_dir=str(tmp_path / "html"),
                env_dir=str(tmp_path / "env"))
    path = tmp_path / "asv.conf.json"
    path.write_text(json.dumps(conf))
    return path


def _git_has_commit():
    if shutil.which("git") is None:
        return False
    proc = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True)
    return proc.returncode == 0


@pytest.mark.skipif(shutil.which("asv") is None and importlib.util.find_spec("asv") is None,
                    reason="asv is not installed")
@pytest.mark.skipif(not _git_has_commit(), reason="asv needs a git repository with a commit")
def test_asv_quick_run(tmp_path):
    conf = _asv_conf_copy(tmp_path)
    asv = [sys.executable, "-m", "asv"]
    # The machine description: asv asks for it interactively unless given.
    _run(asv + ["machine", "--yes", "--machine", "fastce-test", "--config", str(conf)],
         cwd=tmp_path)
    proc = _run(asv + ["check", "--python=same", "--config", str(conf)], cwd=tmp_path)
    assert "No problems found" in proc.stdout + proc.stderr
    proc = _run(asv + ["run", "--python=same", "--quick", "--machine", "fastce-test",
                       "--config", str(conf), "--show-stderr",
                       "--bench", r"Shapes.time_call\(.256x10"], timeout=180, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "Shapes.time_call" in out and "failed" not in out.lower(), out
    assert any((tmp_path / "results").rglob("*.json"))
