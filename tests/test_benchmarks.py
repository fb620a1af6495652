"""The benchmark runs: at toy sizes each section prints its measurements, and what it prints is
consistent with itself (every ratio is the quotient of the numbers it is printed beside, to their
printed digits; the parts of the RDDRS step add up to the step; counts are within what they
count), and what section 4 reports about a real search (the smoke preset's) is consistent. No
timing is asserted: the speed is what the benchmark reports, not what the test checks (it keeps
the script from rotting between releases)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from rddrs.core.presets import preset

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(\d+(?:\.\d+)?)"


def printed(text: str) -> tuple[float, float]:
    """The interval of values that print as ``text`` (rounded to its digits)."""
    half = 0.5 * 10.0 ** -(len(text.split(".")[1]) if "." in text else 0)
    return float(text) - half, float(text) + half


def quotient(num: tuple[float, float], den: tuple[float, float]) -> tuple[float, float]:
    assert den[0] > 0, den
    return num[0] / den[1], num[1] / den[0]


def plus(*terms: tuple[float, float]) -> tuple[float, float]:
    return sum(t[0] for t in terms), sum(t[1] for t in terms)


def minus(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] - b[1], a[1] - b[0]


def meets(shown: str, interval: tuple[float, float]) -> bool:
    """Whether the printed value ``shown`` can be the rounding of a value in ``interval``."""
    low, high = printed(shown)
    return low <= interval[1] * (1 + 1e-12) and interval[0] * (1 - 1e-12) <= high


def sections(out: str) -> dict[str, str]:
    """The output of each section, by its number."""
    parts = re.split(r"^(\d)\. ", out, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_bench_core_runs_its_sections_at_toy_sizes():
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_core.py"),
            "--sections",
            "1,2,4,5,6",
            "--samples",
            "16",
            "--inputs",
            "1",
            "--cert-samples",
            "200",
            "--batch-size",
            "100",
            "--anatomy-preset",
            "smoke",
            "--draws",
            "64",
            "--repeat",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    parts = sections(out)
    assert sorted(parts) == ["1", "2", "4", "5", "6"], out
    for key in parts:
        assert f"[section {key}: wall " in out, out

    # section 1: each family's throughput and its ratio to the raw forward throughput (the floor)
    raw = re.search(rf"raw forward of the network:\s+{NUMBER}\s+\(the floor, ratio 1\)", parts["1"])
    families = re.findall(rf"^\s+(isotropic|diagonal|full SPD)\s*:\s+{NUMBER}\s+ratio {NUMBER}$", parts["1"], re.M)
    assert raw and [f[0] for f in families] == ["isotropic", "diagonal", "full SPD"], out
    for _, rate, ratio in families:
        assert meets(ratio, quotient(printed(rate), printed(raw[1]))), (rate, raw[1], ratio)

    # section 2: one row per samples x inputs; network and the rest share the iteration
    rows = re.findall(rf"^\s+(\d+)\s+(\d+)\s+{NUMBER}\s+(-?\d+)%\s+(-?\d+)%\s+{NUMBER}$", parts["2"], re.M)
    assert [r[:2] for r in rows] == [("16", "1")], out
    assert abs(int(rows[0][3]) + int(rows[0][4]) - 100) <= 1, rows

    # section 4: the anatomy of the smoke preset's RDDRS search
    smoke = preset("smoke").search["rddrs"]
    assert f"anatomy of the RDDRS step: smoke preset ({smoke.iterations} steps, {smoke.samples} samples" in out, out
    binds = re.search(
        rf"floor binds in (\d+)/{smoke.iterations} steps \((\d+)-(\d+) eigenvalues below it\); "
        rf"step bound binds in (\d+)/{smoke.iterations}",
        parts["4"],
    )
    assert binds, out
    floor, low, high, bound = map(int, binds.groups())
    assert 0 <= floor <= smoke.iterations and 0 <= low <= high <= 784 and 0 <= bound <= smoke.iterations
    assert (floor == 0) == (high == 0)  # the floor binds in a step iff an eigenvalue fell below it there
    step = re.search(
        rf"step {NUMBER} = gradient {NUMBER} \(network alone {NUMBER}\) \+ exponential map {NUMBER} "
        rf"\(its eigh {NUMBER}\) \+ floor {NUMBER} \(its eigh {NUMBER}\)",
        parts["4"],
    )
    assert step, out
    total, grad, _, exp, exp_eigh, floor_ms, _ = step.groups()
    assert meets(total, plus(printed(grad), printed(exp), printed(floor_ms))), step[0]
    matrix_exp = re.search(
        rf"matrix_exp of the same clamped step: {NUMBER} \(ratio to the exp's eigh {NUMBER}\)", parts["4"]
    )
    assert matrix_exp and meets(matrix_exp[2], quotient(printed(matrix_exp[1]), printed(exp_eigh))), out
    speedups = re.search(
        rf"replaced the exp's eigh: {NUMBER}; if the exponential map cost nothing: {NUMBER}", parts["4"]
    )
    assert speedups, out
    assert meets(
        speedups[1], quotient(printed(total), plus(minus(printed(total), printed(exp_eigh)), printed(matrix_exp[1])))
    ), speedups[0]
    assert meets(speedups[2], quotient(printed(total), minus(printed(total), printed(exp)))), speedups[0]

    # section 5: both network paths, with autograd's dense work per image and shares of the GEMM peak
    assert "network path of sections 1-2: fast" in out, out
    peak = re.search(
        rf"GEMM peak {NUMBER} GFLOP/s \(the floor\); autograd's work 2\.11 MFLOP forward, 4\.22 forward", parts["5"]
    )
    assert peak, out
    paths = re.findall(rf"^\s+(autograd|fast)\s+{NUMBER} \(\s*(\d+)%\)\s+{NUMBER} \(\s*(\d+)%\)$", parts["5"], re.M)
    assert sorted(p[0] for p in paths) == ["autograd", "fast"], out
    speed = {}
    for name, forward, forward_share, both, both_share in paths:
        for value, share in ((forward, forward_share), (both, both_share)):
            low, high = quotient(printed(value), printed(peak[1]))
            assert meets(share, (100 * low, 100 * high)), (name, value, share)
        speed[name] = (forward, both)
    ratios = re.search(rf"fast / autograd: forward {NUMBER}x, forward \+ input gradient {NUMBER}x", parts["5"])
    assert ratios, out
    for shown, fast, autograd in zip(ratios.groups(), speed["fast"], speed["autograd"]):
        assert meets(shown, quotient(printed(fast), printed(autograd))), ratios[0]
    paper = re.search(
        rf"paper preset RDDRS step \(20000 draws, one image\): autograd (\d+) ms, fast (\d+) ms; "
        rf"fast / autograd {NUMBER}x",
        parts["5"],
    )
    assert paper and meets(paper[3], quotient(printed(paper[1]), printed(paper[2]))), out

    # section 6: the command line's start-up, as a ratio to the interpreter's (the floor)
    floor = re.search(rf"^\s+python -c pass\s+{NUMBER}\s+\(the floor, ratio 1\)$", parts["6"], re.M)
    assert floor, out
    started = re.findall(
        rf"^\s+(rddrs --help|rddrs sweep --help|python -c \"import torch\")\s+{NUMBER}"
        rf"\s+ratio {NUMBER}$",
        parts["6"],
        re.M,
    )
    assert [s[0] for s in started] == ["rddrs --help", "rddrs sweep --help", 'python -c "import torch"'], out
    for name, seconds, ratio in started:
        assert meets(ratio, quotient(printed(seconds), printed(floor[1]))), (name, seconds, ratio)
