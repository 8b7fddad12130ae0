"""The ``TORCH`` and ``JAX`` workloads of ``python -m fastce bench``: fastce's autograd adapters
(``fastce.torch``, ``fastce.jax``) inside a training step, next to the frameworks' own losses.

- TORCH: W1 (4096, 32000) float32, one training step of the loss (forward + backward, the
  gradient w.r.t. the logits) through ``fastce.torch.cross_entropy`` (``fused=False`` and
  ``fused=True``) against ``torch.nn.functional.cross_entropy``, eager and under
  ``torch.compile(fullgraph=True)``; then ``fastce.torch.linear_cross_entropy`` (N=4096,
  H=256, V=32000) forward + backward against the unfused torch path (``F.linear`` +
  ``F.cross_entropy``): time, and the peak extra memory of one step measured in a fresh child
  process (peak RSS, with glibc told to mmap every allocation over 64 KiB so that freed memory
  really leaves the process; outputs excluded).
- JAX: W1 ``jax.jit(jax.value_and_grad(loss))`` through ``fastce.jax.cross_entropy`` against
  ``optax.softmax_cross_entropy_with_integer_labels`` (masked mean over non-ignored targets).

All timings are medians of round-robin samples (``fastce.bench.measure_side_by_side``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

__all__ = ["ADAPTER_GOALS", "torch_step_fns", "torch_linear_fns", "jax_step_fns",
           "linear_peak_extra", "run_adapters"]

LOGITS_W1 = (4096, 32000)
LINEAR = dict(N=4096, H=256, V=32000)


@dataclass(frozen=True)
class AdapterGoal:
    group: str
    name: str            # the fastce row
    other: str           # the reference row
    limit: float
    text: str


ADAPTER_GOALS = (
    AdapterGoal("TORCH", "fastce.torch", "torch", 0.4, "W1 step fastce.torch <= 0.4x torch eager"),
    AdapterGoal("TORCH", "fastce.torch fused", "torch", 0.4,
                "W1 step fastce.torch fused=True <= 0.4x torch eager"),
    AdapterGoal("TORCH", "fastce.torch compiled", "torch compiled", 0.6,
                "W1 step compiled fastce.torch <= 0.6x compiled torch"),
    AdapterGoal("TORCH", "fastce.torch fused compiled", "torch compiled", 0.6,
                "W1 step compiled fastce.torch fused=True <= 0.6x compiled torch"),
    AdapterGoal("TORCH-LIN", "fastce.torch linear_ce", "torch unfused", 1.2,
                "linear CE step time <= 1.2x the unfused torch path"),
    AdapterGoal("JAX", "fastce.jax", "optax", 0.6, "W1 jit(value_and_grad) fastce.jax <= 0.6x optax"),
)


# ---------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------
def _torch_step(loss_fn, x, t):
    import torch
    threads = os.cpu_count() or 1

    def step():
        loss = loss_fn(x, t)
        (g,) = torch.autograd.grad(loss, x)
        return loss, g
    step.before = lambda: torch.set_num_threads(threads)
    return step


def torch_step_fns(p, compile=True, progress=None):
    """{row name: training-step callable} for the TORCH workload on Problem ``p``."""
    import torch
    import torch.nn.functional as F

    import fastce.torch as ft
    ii = p.ignore_index
    x = torch.from_numpy(p.x).requires_grad_(True)
    t = torch.from_numpy(p.target.astype(np.int64))

    def torch_ce(x, t):
        return F.cross_entropy(x, t, ignore_index=ii)

    def fastce_ce(x, t):
        return ft.cross_entropy(x, t, ignore_index=ii)

    def fastce_fused(x, t):
        return ft.cross_entropy(x, t, ignore_index=ii, fused=True)

    fns = {"torch": _torch_step(torch_ce, x, t), "fastce.torch": _torch_step(fastce_ce, x, t),
           "fastce.torch fused": _torch_step(fastce_fused, x, t)}
    if compile:
        for name, fn in (("torch compiled", torch_ce), ("fastce.torch compiled", fastce_ce),
                         ("fastce.torch fused compiled", fastce_fused)):
            step = _torch_step(torch.compile(fn, fullgraph=True), x, t)
            try:
                if progress:
                    progress(f"TORCH: compiling {name} (inductor)")
                step()                                    # compiles
            except Exception as e:                        # e.g. no C++ compiler for inductor
                if progress:
                    progress(f"TORCH: {name} skipped: {type(e).__name__}: {e}")
                continue
            fns[name] = step
    return fns


def torch_linear_fns(N, H, V):
    """{row name: step callable} for fastce.torch.linear_cross_entropy and the unfused path."""
    import torch
    import torch.nn.functional as F

    import fastce.torch as ft
    from fastce.linear import make_problem
    h, c, t = make_problem(N, H, V)
    h = torch.from_numpy(h).requires_grad_(True)
    c = torch.from_numpy(c).requires_grad_(True)
    t = torch.from_numpy(t)
    threads = os.cpu_count() or 1

    def fused():
        loss = ft.linear_cross_entropy(h, c, t)
        return (loss, *torch.autograd.grad(loss, (h, c)))

    def unfused():
        loss = F.cross_entropy(F.linear(h, c), t)
        return (loss, *torch.autograd.grad(loss, (h, c)))
    for fn in (fused, unfused):
        fn.before = lambda: torch.set_num_threads(threads)
    return {"fastce.torch linear_ce": fused, "torch unfused": unfused}


def _rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _linear_memory_child(name, N, H, V):
    """Run in a child process: one warm-up step, reset the peak RSS, one measured step; prints
    JSON {"peak_extra": bytes beyond the step's outputs, "reset": whether the peak was reset}."""
    fn = torch_linear_fns(N, H, V)[name]
    import gc
    out = fn()                                     # warm-up: Numba kernels, BLAS, allocator
    del out
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                           # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    before = _rss()
    out = fn()
    after = _rss()
    outputs = sum(int(o.numel()) * o.element_size() for o in out)
    peak = after["VmHWM"] - before["VmRSS"] - outputs if reset else None
    print(json.dumps({"peak_extra": peak, "reset": reset}))


def linear_peak_extra(name, N, H, V, timeout=600):
    """Peak extra bytes of one linear-CE training step ``name`` (see _linear_memory_child), or
    None where the peak RSS cannot be reset (no /proc/self/clear_refs)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    code = (f"from fastce.bench_adapters import _linear_memory_child as f; "
            f"f({name!r}, {N}, {H}, {V})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra"]


# ---------------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------------
def jax_step_fns(p):
    """{row name: callable} for the JAX workload: jit(value_and_grad) of fastce.jax and optax."""
    import jax
    import jax.numpy as jnp

    import fastce.jax as fj
    ii = p.ignore_index
    x = jnp.asarray(p.x)
    t = jnp.asarray(p.target.astype(np.int32))

    def fastce_loss(x, t):
        return fj.cross_entropy(x, t, ignore_index=ii)

    fns = {"fastce.jax": jax.jit(jax.value_and_grad(fastce_loss))}
    try:
        import optax

        def optax_loss(x, t):
            valid = t != ii
            per = optax.softmax_cross_entropy_with_integer_labels(x, jnp.where(valid, t, 0))
            return jnp.sum(jnp.where(valid, per, 0.0)) / jnp.sum(valid)
        fns["optax"] = jax.jit(jax.value_and_grad(optax_loss))
    except ImportError:
        pass
    return {name: (lambda f=f: jax.block_until_ready(f(x, t))) for name, f in fns.items()}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def _host(v):
    return np.asarray(v.detach() if hasattr(v, "detach") else v, np.float64)


def _check_close(fns, a, b):
    """|loss difference| and max |gradient difference| between two step results."""
    ra, rb = fns[a](), fns[b]()
    loss = abs(float(_host(ra[0])) - float(_host(rb[0])))
    grad = max(float(np.max(np.abs(_host(ga) - _host(gb)))) for ga, gb in zip(ra[1:], rb[1:]))
    return loss, grad


def run_adapters(groups=("TORCH", "JAX"), quick=False, repeats=None, out=sys.stdout,
                 progress=None, max_time=None, compile=True):
    """Time the adapter workloads; print their table and goals.  Returns {"times": {(group,
    row): seconds}, "memory": {row: bytes}, "goals": [(goal, ratio, passed)]}."""
    from . import bench
    from .bench import measure_side_by_side
    repeats = repeats if repeats is not None else (3 if quick else 7)
    max_time = max_time if max_time is not None else (2.0 if quick else 30.0)
    progress = progress or (lambda m: None)
    times, memory, notes = {}, {}, []
    rows = []

    def timed(group, fns, ref):
        res = measure_side_by_side(fns, repeats, max_time=max_time,
                                   progress=lambda m: progress(f"{group}: {m}"))
        for name, t in res.items():
            times[(group, name)] = t
            rows.append((group, name, t, ref, t / res[ref] if ref in res else None))

    if "TORCH" in groups and bench.torch_available():
        p = bench.make_workload("W1", quick)
        progress(f"TORCH: W1 {p.x.shape} training step (forward + backward)")
        fns = torch_step_fns(p, compile=compile, progress=progress)
        d_loss, d_grad = _check_close(fns, "fastce.torch", "torch")
        notes.append(f"TORCH W1: fastce.torch vs torch float32: |loss diff| {d_loss:.2e}, "
                     f"max |grad diff| {d_grad:.2e}")
        timed("TORCH", {k: v for k, v in fns.items() if "compiled" not in k}, "torch")
        compiled = {k: v for k, v in fns.items() if "compiled" in k}
        if "torch compiled" in compiled:
            timed("TORCH", compiled, "torch compiled")
        del fns, compiled, p
        N = 1024 if quick else LINEAR["N"]
        H, V = LINEAR["H"], LINEAR["V"]
        progress(f"TORCH-LIN: linear_cross_entropy N={N}, H={H}, V={V} training step")
        lin = torch_linear_fns(N, H, V)
        d_loss, d_grad = _check_close(lin, "fastce.torch linear_ce", "torch unfused")
        notes.append(f"TORCH-LIN: fastce.torch vs torch float32: |loss diff| {d_loss:.2e}, "
                     f"max |grad diff| {d_grad:.2e}")
        timed("TORCH-LIN", lin, "torch unfused")
        del lin
        logits = N * V * 4
        for name in ("fastce.torch linear_ce", "torch unfused"):
            progress(f"TORCH-LIN: peak memory of {name} (child process)")
            memory[name] = linear_peak_extra(name, N, H, V)
        memory["logits"] = logits
    if "JAX" in groups and bench.jax_available():
        p = bench.make_workload("W1", quick)
        progress(f"JAX: W1 {p.x.shape} jit(value_and_grad)")
        fns = jax_step_fns(p)
        timed("JAX", fns, "optax" if "optax" in fns else "fastce.jax")
        del fns, p

    print("\nadapters: one training step of the loss (forward + backward), float32, "
          f"medians of {repeats} round-robin samples{' (--quick sizes)' if quick else ''}:",
          file=out)
    print(f"  {'group':<10}{'row':<30}{'median':>12}{'vs':>16}{'ratio':>9}", file=out)
    for group, name, t, ref, ratio in rows:
        r = "" if name == ref or ratio is None else f"{ratio:.3f}x"
        vs = "" if name == ref else ref
        print(f"  {group:<10}{name:<30}{t * 1e3:>9.1f} ms{vs:>16}{r:>9}", file=out)
    for n in notes:
        print(f"  {n}", file=out)
    goals = []
    if memory:
        lg = memory["logits"]
        for name in ("fastce.torch linear_ce", "torch unfused"):
            b = memory[name]
            txt = "n/a (peak RSS cannot be reset here)" if b is None else \
                f"{b / 2**20:8.1f} MiB = {b / lg:.3f} x the logits"
            print(f"  TORCH-LIN peak extra memory, {name:<24}{txt}", file=out)
        b = memory["fastce.torch linear_ce"]
        if b is not None:
            goals.append((AdapterGoal("TORCH-LIN", "", "", 0.15,
                                      "linear CE peak extra memory <= 0.15x the logits"),
                          b / lg, b / lg <= 0.15))
    for g in ADAPTER_GOALS:
        a, b = times.get((g.group, g.name)), times.get((g.group, g.other))
        if a is not None and b is not None:
            goals.append((g, a / b, a / b <= g.limit))
    print("\nadapter goals (fastce / other):", file=out)
    for g, r, ok in goals:
        print(f"  [{'PASS' if ok else 'FAIL'}] {g.text}: {r:.3f}x", file=out)
    if quick:
        print("  (--quick sizes: the goals are defined at full size)", file=out)
    return {"times": times, "memory": memory, "goals": goals}
