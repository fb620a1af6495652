"""The benchmark runs: at toy sizes its sections print their measurements, and what section 4
reports about a real search (the smoke preset's) is consistent (it keeps the script from rotting
between releases)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from rddrs.core.presets import preset

ROOT = Path(__file__).resolve().parents[1]


def test_bench_core_runs_its_sections_at_toy_sizes():
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), "--sections", "1,2,4,5",
                           "--samples", "16", "--inputs", "1", "--cert-samples", "200", "--batch-size", "100",
                           "--anatomy-preset", "smoke", "--draws", "64"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    ratios = [float(r) for r in re.findall(r"ratio (\d+\.\d+)", out)]
    assert len(ratios) == 3 and all(0 < r < 2 for r in ratios), out
    assert re.search(r"^\s+16\s+1\s+\d+\.\d+", out, re.M), out  # section 2's row
    smoke = preset("smoke").search["rddrs"]
    assert f"anatomy of the RDDRS step: smoke preset ({smoke.iterations} steps, {smoke.samples} samples" in out, out
    binds = re.search(rf"floor binds in (\d+)/{smoke.iterations} steps \((\d+)-(\d+) eigenvalues below it\); "
                      rf"step bound binds in (\d+)/{smoke.iterations}", out)
    assert binds, out
    floor, low, high, bound = map(int, binds.groups())
    assert 0 <= floor <= smoke.iterations and 0 <= low <= high <= 784 and 0 <= bound <= smoke.iterations
    speedups = re.search(r"replaced the exp's eigh: (\d+\.\d+); if the exponential map cost nothing: (\d+\.\d+)", out)
    assert speedups and 0.5 < float(speedups[1]) <= float(speedups[2]) + 0.05, out
    parts = re.search(r"step (\d+) = gradient (\d+) \(network alone (\d+)\) \+ exponential map (\d+) .* \+ floor (\d+)",
                      out)
    step, grad, _, exp, floor_ms = map(int, parts.groups())
    assert abs(step - (grad + exp + floor_ms)) <= 2
    # section 5: both network paths, with autograd's dense work per image and shares of the GEMM peak
    assert "network path of sections 1-2: fast" in out, out
    assert re.search(r"GEMM peak \d+ GFLOP/s \(the floor\); autograd's work 2\.11 MFLOP forward, 4\.22 forward", out), out
    rows = set(re.findall(r"^\s+(autograd|fast)\s+\d+\.\d+ \(\s*\d+%\)\s+\d+\.\d+ \(\s*\d+%\)", out, re.M))
    assert sorted(rows) == ["autograd", "fast"], out
    assert re.search(r"paper preset RDDRS step \(20000 draws, one image\): autograd \d+ ms, fast \d+ ms; "
                     r"fast / autograd \d+\.\d+x", out), out
