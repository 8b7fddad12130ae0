"""``python -m fastce bench --workloads TORCH,JAX``: the adapter workloads run (quick sizes)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_adapters_quick_cli():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "fastce", "bench", "--quick", "--workloads",
                           "TORCH,JAX", "--repeats", "1", "--no-compile"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for group, row in (("TORCH", "torch"), ("TORCH", "fastce.torch"),
                       ("TORCH", "fastce.torch fused"), ("TORCH-LIN", "fastce.torch linear_ce"),
                       ("TORCH-LIN", "torch unfused"), ("JAX", "fastce.jax"), ("JAX", "optax")):
        assert re.search(rf"{group}\s+{re.escape(row)}\s+\d", out), out
    assert "peak extra memory" in out and "adapter goals" in out
    assert re.search(r"max \|grad diff\| \d\.\d\de-(0[5-9]|1\d)", out), out   # float32 agreement
