"""Cold start: the on-disk cache (also for a read-only install), ``python -m fastce warmup`` and
``python -m fastce bench --workloads COLD --quick``.  Each test compiles into an empty cache in
subprocesses (the small-rows kernel only: the cheapest), so each takes seconds to a minute."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a subprocess: one small-rows forward call, then the kernels' cache statistics.
_PROBE = """
import json, numpy as np, fastce
from fastce import cpu
x = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
t = np.arange(64) % 10
fastce.cross_entropy(x, t)
hits = misses = 0
for d in cpu._KERNELS.values():
    hits += sum(d.stats.cache_hits.values())
    misses += sum(d.stats.cache_misses.values())
print("PROBE " + json.dumps({"file": fastce.__file__, "hits": hits, "misses": misses}))
"""


def _env(pythonpath=ROOT, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE_DIR")}
    env["PYTHONPATH"] = str(pythonpath)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _python(args, env, cwd, timeout=600):
    proc = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _probe(env, cwd):
    out = _python(["-c", _PROBE], env, cwd)
    return json.loads(re.search(r"^PROBE (.*)$", out, re.M).group(1))


def _cache_files(path):
    return [p for p in Path(path).rglob("*") if p.suffix in (".nbi", ".nbc")]


def test_cache_of_a_read_only_install_falls_back_to_the_user_cache(tmp_path):
    # The package copied as an installed one would be, into a directory this process cannot
    # write: chmod, or (for root, whom permissions do not stop) a file where Numba would make
    # its __pycache__ directory.
    site = tmp_path / "site-packages"
    shutil.copytree(ROOT / "fastce", site / "fastce",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if os.geteuid() == 0:
        (site / "fastce" / "__pycache__").write_text("not a directory")
    for p in [site, *site.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        user_cache = tmp_path / "xdg-cache"
        env = _env(site, XDG_CACHE_HOME=user_cache, HOME=tmp_path / "home",
                   PYTHONDONTWRITEBYTECODE=1)
        first = _probe(env, tmp_path)
        assert first["file"].startswith(str(site))
        assert first["misses"] > 0 and first["hits"] == 0
        assert _cache_files(user_cache / "numba"), "nothing cached in the user cache"
        assert not _cache_files(site)
        second = _probe(env, tmp_path)              # a new process: loads, compiles nothing
        assert second["hits"] > 0 and second["misses"] == 0, second
    finally:
        for p in [site, *site.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_warmup_cli_fills_the_cache(tmp_path):
    cache = tmp_path / "numba-cache"
    env = _env(NUMBA_CACHE_DIR=cache)
    out = _python(["-m", "fastce", "warmup", "--dtypes", "float32", "--layouts", "small"],
                  env, ROOT)
    assert "fastce warmup: float32 x small" in out, out
    assert re.search(r"compiled small/float32\s+\d+\.\d s", out), out
    assert "compiled again" not in out, out
    assert _cache_files(cache)
    probe = _probe(env, ROOT)                   # a new process finds the kernel cached
    assert probe["hits"] > 0 and probe["misses"] == 0, probe


def test_warmup_cli_rejects_unknown_layout():
    proc = subprocess.run([sys.executable, "-m", "fastce", "warmup", "--layouts", "cols"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "cols" in proc.stderr


def test_bench_cold_quick():
    out = _python(["-m", "fastce", "bench", "--workloads", "COLD", "--quick"], _env(), ROOT)
    assert re.search(r"\(4096, 10\) float32 \(small-C rows\)\s+\d+\.\d\d\s+\d+\.\d\d", out), out
    assert re.search(r"same, int32 targets\s+\d+\.\d\d", out), out
    assert "reference kernel" in out and "cached bare process: import fastce" in out, out
    assert re.search(r"then first result \d\.\d\d\d s", out), out
    assert "all together <=" in out
    # int32 targets reuse the int64 kernel: far cheaper than the first call
    first = {m.group(1): float(m.group(2)) for m in
             re.finditer(r"^  (\S.*?)\s+(\d+\.\d\d)\s+\d+\.\d\d$", out, re.M)}
    small = first["(4096, 10) float32 (small-C rows)"]
    assert first["same, int32 targets"] < 0.5 * small, out


# Run in a subprocess with an empty cache: first calls of the rows, block and softmax kernels, with
# every function that Numba compiles for them recorded (qualified name, argument types).
_COMPILED = """
import json, numpy as np
from numba.core import event
compiled = []
class Record(event.Listener):
    def on_start(self, e):
        compiled.append((e.data["dispatcher"].py_func.__qualname__, str(e.data["args"])))
    def on_end(self, e):
        pass
event.register("numba:compile", Record())
import fastce
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 100)).astype(np.float32)
fastce.cross_entropy(x, np.arange(64) % 100)
x = rng.standard_normal((2, 5, 8, 8)).astype(np.float32)
fastce.cross_entropy(x, rng.integers(0, 5, (2, 8, 8)))
fastce.softmax(rng.standard_normal((4, 100)).astype(np.float32), axis=-1)
fastce.softmax(x, axis=1)
fastce.shard_stats(x, rng.integers(0, 10, (2, 8, 8)), 0, 10, argmax=True)
print("COMPILED " + json.dumps(compiled))
"""


def test_first_calls_compile_each_function_once_and_no_numpy_overloads(tmp_path):
    """What the cold start no longer pays for: NumPy's allocation overloads (np.empty, zeros,
    zeros_like, full) and the builtins' min / max (a function compiled per signature; fastce
    lowers them in place), the shape-mismatch error of a slice assigned from an array, and
    a function compiled twice for the same types (Numba compiles an overload once per set of
    its callers' options: helpers and overloads must share one)."""
    out = _python(["-c", _COMPILED], _env(NUMBA_CACHE_DIR=tmp_path), ROOT)
    compiled = [tuple(c) for c in json.loads(re.search(r"^COMPILED (.*)$", out, re.M).group(1))]
    names = [name for name, _ in compiled]
    assert any(name.startswith("_index_blocks") for name in names), names
    # (ol_raise_with_shape_context_cpu: a slice assigned from an array compiles NumPy's
    # shape-mismatch error, string formatting included: ~20 functions)
    foreign = [n for n in names if n.split(".")[0] in (
        "ol_np_empty", "ol_np_zeros", "ol_np_empty_like", "ol_np_zeros_like", "impl_np_full",
        "ol_array_zero_fill", "ol_raise_with_shape_context_cpu", "ol_min", "ol_max",
        "_cast_like_impl")]
    assert not foreign, foreign
    twice = [c for c in set(compiled) if compiled.count(c) > 1]
    assert not twice, twice


# Run in a subprocess with an empty cache: rows and block kernels with a gradient, then which
# code library each compiled helper and kernel got, and the results' bytes.
_LIBRARIES = """
import hashlib, json, numpy as np, numba, fastce
from fastce import cpu, _shard_kernels
rng = np.random.default_rng(0)
x = (3 * rng.standard_normal((64, 100))).astype(np.float32)
t = np.arange(64) % 100
x4 = rng.standard_normal((2, 5, 8, 8)).astype(np.float32)
t4 = rng.integers(0, 5, (2, 8, 8))
out = [fastce.cross_entropy(x, t, reduction="none"),
       *fastce.cross_entropy_with_grad(x, t, label_smoothing=0.1),
       fastce.cross_entropy(x4, t4, reduction="none"),
       *fastce.cross_entropy_with_grad(x4, t4)]
libraries = {}
for module in (cpu, _shard_kernels):
    for name, obj in vars(module).items():
        if isinstance(obj, numba.core.dispatcher.Dispatcher):
            kind = "helper" if obj.targetoptions.get("no_cpython_wrapper") else "kernel"
            for cres in obj.overloads.values():
                libraries.setdefault(kind, set()).add(type(cres.library).__name__)
for d in cpu._KERNELS.values():
    for cres in d.overloads.values():
        libraries.setdefault("kernel", set()).add(type(cres.library).__name__)
digest = hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in out)).hexdigest()
print("LIBRARIES " + json.dumps({k: sorted(v) for k, v in libraries.items()}) + " " + digest)
"""


def test_helpers_get_no_machine_code_and_kernels_compute_the_same(tmp_path):
    """fastce._pipelines: the helpers' code libraries stop at optimised IR (no machine code of
    their own); the kernels get Numba's own, and their results are bitwise those with Numba's
    pipeline for the helpers too (FASTCE_NUMBA_PIPELINES=default)."""
    runs = {}
    for flag in ("fastce", "default"):
        out = _python(["-c", _LIBRARIES],
                      _env(NUMBA_CACHE_DIR=tmp_path / flag, FASTCE_NUMBA_PIPELINES=flag), ROOT)
        libraries, digest = re.search(r"^LIBRARIES (.*) (\w+)$", out, re.M).groups()
        runs[flag] = (json.loads(libraries), digest)
    assert runs["fastce"][0] == {"helper": ["HelperLibrary"], "kernel": ["JITCodeLibrary"]}
    assert runs["default"][0] == {"helper": ["JITCodeLibrary"], "kernel": ["JITCodeLibrary"]}
    assert runs["fastce"][1] == runs["default"][1]
