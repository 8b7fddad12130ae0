"""Codegen regression: the exp loops of the forward kernels (rows, small-C rows, strided blocks,
probability targets, the shard statistics of Dask's class chunks, strided softmax) compile to
packed vector code in the data's precision on AVX2 (``haswell``) and AVX-512
(``skylake-avx512``) alike, and the AVX2 code holds no masked stores.

Whether LLVM vectorises a loop depends on the kernel's structure and on its cost model, and a
loop that falls back to scalar code still gives the right answers, only 4-8x slower.  So each
CPU name compiles the kernel in its own subprocess (Numba reads NUMBA_CPU_NAME once, at import)
with a fresh NUMBA_CACHE_DIR (code loaded from the cache cannot be inspected, and would have
been compiled for another CPU), and the assembly is checked for the exp's instructions.  The
kernels are compiled there for the signatures that a native run of the public API gave, and
never run: AVX-512 code would stop an AVX2 host with SIGILL.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# NUMBA_CPU_FEATURES="" makes LLVM use the named CPU's own features; unset, Numba would give
# the named CPU this host's features (AVX-512 code under the name haswell).
TARGETS = {"haswell": ("ymm",), "skylake-avx512": ("ymm", "zmm")}

# Step 1, native code: calls the forward kernel of each layout through the public API
# (whatever their argument lists) and pickles {(kernel key, label): signature} of the calls.
_SIGNATURES = r"""
import pickle, sys
import numpy as np
import fastce
from fastce import cpu, shards
rng = np.random.default_rng(0)
out = {}


def record(key, label, dtype):
    sig = [s for s in cpu._KERNELS[key].signatures if str(s[0].dtype) == dtype]
    assert len(sig) == 1, (key, cpu._KERNELS[key].signatures)
    out[(key, label)] = sig[0]


for dt in ("float32", "float64"):
    rows = rng.standard_normal((64, 2048)).astype(dt)
    probs = rng.random((64, 2048)).astype(dt)
    fastce.cross_entropy(rows, np.arange(64) % 2048)                 # _index_rows
    fastce.cross_entropy(rows, probs / probs.sum(1, keepdims=True))  # _prob_blocks
    fastce.cross_entropy(rng.standard_normal((2, 21, 64, 64)).astype(dt),
                         rng.integers(0, 21, (2, 64, 64)))           # _index_blocks
    fastce.cross_entropy(rng.standard_normal((8192, 10)).astype(dt),
                         rng.integers(0, 10, 8192))                  # the same, rows
    for name in ("_index_rows", "_prob_blocks", "_index_blocks"):
        record((name, False, False) + ((False,) if name != "_prob_blocks" else ()), dt, dt)
    # the softmax family's strided kernel (softmax over axis 1 of (N, C, S))
    fastce.softmax(rng.standard_normal((2, 21, 64)).astype(dt), axis=1)
    record("_softmax_strided", dt, dt)
    # the shard statistics kernel (Dask's class chunks), on a class-chunk view as Dask hands it
    shards.shard_stats(rows[:, :1000], np.arange(64) % 2048, 0, 2048)
    record("_shard_stats_rows", dt, dt)
# bfloat16 rows (uint16 bits): the forward and the gradient variant (bf16 out)
import ml_dtypes
xb = rng.standard_normal((64, 2048)).astype(ml_dtypes.bfloat16)
fastce.cross_entropy(xb, np.arange(64) % 2048)
fastce.cross_entropy_with_grad(xb, np.arange(64) % 2048)
for grad in (False, True):
    record(("_index_rows", grad, False, False), "grad" if grad else "fwd", "uint16")
with open(sys.argv[1], "wb") as f:
    pickle.dump(out, f)
"""

# Step 2, under the CPU name: compiles those signatures without running them (AVX-512 code
# cannot run on an AVX2 host) and prints {kernel: {label: assembly}}.
_ASSEMBLY = r"""
import json, pickle, sys
from fastce import _shard_kernels, cpu
_shard_kernels._register()          # (the shard kernels are registered on first use)
with open(sys.argv[1], "rb") as f:
    sigs = pickle.load(f)
out = {}
for (key, label), sig in sigs.items():
    disp = cpu._KERNELS[key]
    disp.compile(sig)
    name = key if isinstance(key, str) else key[0]
    if key in (("_index_rows", False, False, False), ("_index_rows", True, False, False)) \
            and label in ("fwd", "grad"):
        name = "bf16_rows"
    out.setdefault(name, {})[label] = disp.inspect_asm(sig)
json.dump(out, sys.stdout)
"""


def _run(script, args, env, cache):
    env = dict(env, NUMBA_CACHE_DIR=str(cache))
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _asm(cpu_name, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("NUMBA_CPU_NAME", None)
    env.pop("NUMBA_CPU_FEATURES", None)
    sigs = tmp_path / "signatures.pickle"
    _run(_SIGNATURES, [str(sigs)], env, tmp_path / "native_cache")
    env.update(NUMBA_CPU_NAME=cpu_name, NUMBA_CPU_FEATURES="")
    return json.loads(_run(_ASSEMBLY, [str(sigs)], env, tmp_path / "numba_cache"))


_INSN = re.compile(r"^\s+(v[a-z0-9]+)\s+([^\n#]*)", re.M)


def vector_profile(asm):
    """Counter of (mnemonic class, precision suffix, widest register) over the exp's
    instructions: 'round' (vround*, vrndscale*: the exp's n = rint(u)) and 'fma' (vfmadd* /
    vfnmadd*: its polynomial); suffix 'ps'/'pd' packed, 'ss'/'sd' scalar."""
    prof = Counter()
    for op, args in _INSN.findall(asm):
        m = re.match(r"v(?:round|rndscale)(ps|pd|ss|sd)$", op)
        kind = "round"
        if not m:
            m = re.match(r"vf(?:n)?m(?:add|sub)\d{3}(ps|pd|ss|sd)$", op)
            kind = "fma"
        if not m:
            continue
        reg = next((r for r in ("zmm", "ymm", "xmm") if r in args), "")
        prof[(kind, m.group(1), reg)] += 1
    return prof


def exp_loops_vectorised(asm, dtype, regs):
    """'' when the exp loops are packed code on one of ``regs``, else why not.

    Packed: at least one packed rint and a packed polynomial (>= 5 FMAs, the float32 exp's
    degree) in the dtype's own precision on a vector register, and no more scalar rints than
    packed ones (a vectorised loop keeps at most a scalar remainder beside each vector body).
    A float32 kernel whose exps run in float64 fails: the precision must be the data's."""
    prof = vector_profile(asm)
    p, s = ("ps", "ss") if dtype == "float32" else ("pd", "sd")
    packed_round = sum(prof[("round", p, r)] for r in regs)
    packed_fma = sum(prof[("fma", p, r)] for r in regs)
    scalar_round = sum(n for (k, suf, _), n in prof.items() if k == "round" and suf == s)
    if packed_round == 0:
        return f"no packed {p} rint on {regs}: {dict(prof)}"
    if packed_fma < 5:
        return f"{packed_fma} packed {p} FMAs on {regs} (< 5): {dict(prof)}"
    if scalar_round > packed_round:
        return f"{scalar_round} scalar rints vs {packed_round} packed: {dict(prof)}"
    return ""


_MASKED_STORE = re.compile(r"^\s+v(?:p)?maskmov[a-z]*\s+%[xy]mm\d+,\s*%[xy]mm\d+,\s*[^%\s]*\(",
                           re.M)


def masked_stores(asm):
    """AVX/AVX2 masked stores (vmaskmovps/pd, vpmaskmovd/q to memory) in ``asm``: LLVM emits
    them for a loop that writes back a max where it read it (nothing to store where the old
    value was NaN), and AMD's cores run them ~10x slower than plain stores.  (AVX-512's
    k-masked stores are fast everywhere and not counted.)"""
    return len(_MASKED_STORE.findall(asm))


def _packed_shift(op, asm, regs):
    """Whether ``asm`` shifts 32-bit lanes by 16 (bfloat16 <-> float32 bits) on ``regs``."""
    return any(r in args for args in re.findall(r"^\s+%s\s+\$16, ([^\n#]*)" % op, asm, re.M)
               for r in regs)


# ---------------------------------------------------------------------------------------------
# The checker itself, on hand-written assembly
# ---------------------------------------------------------------------------------------------
_PACKED = """
    vsubps  %ymm1, %ymm0, %ymm2
    vroundps    $4, %ymm2, %ymm3
    vfmadd213ps %ymm4, %ymm3, %ymm5
    vfmadd213ps %ymm4, %ymm3, %ymm5
    vfmadd213ps %ymm4, %ymm3, %ymm5
    vfmadd213ps %ymm4, %ymm3, %ymm5
    vfmadd213ps %ymm4, %ymm3, %ymm5
    vroundss    $4, %xmm2, %xmm2, %xmm3
"""
_SCALAR = _PACKED.replace("ps ", "ss ").replace("ymm", "xmm")


def test_checker_accepts_packed_and_rejects_scalar_code():
    assert exp_loops_vectorised(_PACKED, "float32", ("ymm",)) == ""
    assert "no packed ps rint" in exp_loops_vectorised(_SCALAR, "float32", ("ymm",))
    # float64 exps in a float32 kernel, or AVX2 code where AVX-512 registers are asked for
    assert exp_loops_vectorised(_PACKED.replace("ps ", "pd "), "float32", ("ymm",)) != ""
    assert exp_loops_vectorised(_PACKED, "float32", ("zmm",)) != ""
    # a packed rint beside a scalar polynomial is no vectorised exp
    few = _PACKED.replace("vfmadd213ps %ymm4, %ymm3, %ymm5", "vfmadd213ss %xmm4, %xmm3, %xmm5")
    assert "packed ps FMAs" in exp_loops_vectorised(few, "float32", ("ymm",))
    assert masked_stores("    vmaskmovps %ymm6, %ymm4, (%rcx,%r10,4)\n"
                         "    vmaskmovps %xmm2, %xmm1, 16(%rcx)\n") == 2
    assert masked_stores("    vmaskmovpd -96(%rdx,%rsi,8), %ymm2, %ymm6\n") == 0   # a load
    assert masked_stores(_PACKED) == 0
    assert _packed_shift("vpslld", "    vpslld $16, %ymm1, %ymm1\n", ("ymm",))
    assert not _packed_shift("vpslld", "    vpslld $16, %xmm1, %xmm1\n", ("ymm",))


# ---------------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cpu_name", list(TARGETS))
def test_forward_exp_loops_are_packed(cpu_name, tmp_path):
    kernels = _asm(cpu_name, tmp_path)
    bf16 = kernels.pop("bf16_rows")
    assert sorted(kernels) == ["_index_blocks", "_index_rows", "_prob_blocks",
                               "_shard_stats_rows", "_softmax_strided"]
    regs = TARGETS[cpu_name]
    for variant, text in bf16.items():
        # bfloat16 rows: float32 exps, and the widening (bits << 16) packed too, as is the
        # gradient's narrowing (>> 16 after the rounding add)
        why = exp_loops_vectorised(text, "float32", regs)
        assert why == "", f"{cpu_name} bf16 rows {variant}: {why}"
        assert _packed_shift("vpslld", text, regs), f"{cpu_name} bf16 rows {variant}: widening"
        if variant == "grad":
            assert _packed_shift("vpsrld", text, regs), f"{cpu_name} bf16 rows: narrowing"
    for kernel, asm in kernels.items():
        if cpu_name == "haswell":       # AVX2 code: no AVX-512 register anywhere
            assert not any("zmm" in a for a in asm.values()), kernel
            for dtype, text in asm.items():
                assert masked_stores(text) == 0, f"{kernel} {dtype}: masked stores"
        for dtype, text in asm.items():
            regs = TARGETS[cpu_name]
            if kernel == "_prob_blocks" and dtype == "float32":
                # Its loop mixes the float32 exps with float64 sums of the probabilities, so
                # LLVM picks 4 lanes (xmm for float32): packed in the data's precision, but
                # half a ymm register -- the next step is to split that loop in two passes.
                regs = ("xmm",) + regs
            why = exp_loops_vectorised(text, dtype, regs)
            assert why == "", f"{cpu_name} {kernel} {dtype}: {why}"
