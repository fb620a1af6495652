"""The malloc tuning of the entry points (``allocator.tune``: the command line, sweep workers, the
heavy chapters): it takes effect, it can be switched off, it changes no result, and importing the
library alone changes nothing (each check runs in a fresh process, since the tuning is a change to
the process)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rddrs.pipeline.results import read_rows

ROOT = Path(__file__).resolve().parents[1]

# RSS after a 256 MiB block is written and freed: glibc returns a mmapped block to the kernel
# at once; with the tuning the block came from the heap and stays in the process for reuse.
_PROBE = """
import ctypes
from rddrs.pipeline import allocator
allocator.tune()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = rss()
block = libc.malloc(256 * 2**20)
ctypes.memset(block, 1, 256 * 2**20)
libc.free(ctypes.c_void_p(block))
print(allocator.status(), round(rss() - before))
"""


def _probe(env):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin", **env}
    ).stdout.split()
    return out[0], float(out[-1])


def test_tuning_keeps_freed_blocks_in_the_process():
    status, kept = _probe({})
    assert status == "on"
    assert kept > 200  # MiB still resident after free: the next batch reuses them


def test_tuning_can_be_switched_off():
    status, kept = _probe({"RDDRS_TUNE_MALLOC": "0"})
    assert status.startswith("off")
    assert kept < 50  # glibc's default: the block went back to the kernel


@pytest.mark.parametrize("method", ["rs", "ddrs", "ancer", "rddrs"])
def test_tuning_changes_no_row(tmp_path, method):
    rows = {}
    for tuning in ("1", "0"):
        out = tmp_path / f"{method}_{tuning}.tsv"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "rddrs",
                "certify",
                "--method",
                method,
                "--sigma",
                "0.25",
                "--model",
                str(ROOT / "data/models/mnist_cnn_sigma0.25.pt"),
                "--preset",
                "smoke",
                "--count",
                "2",
                "--data",
                str(ROOT / "data"),
                "--out",
                str(out),
                "--quiet",
            ],
            check=True,
            capture_output=True,
            env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "RDDRS_TUNE_MALLOC": tuning},
        )
        rows[tuning] = {i: {k: v for k, v in r.items() if k != "seconds"} for i, r in read_rows(out).items()}
    assert rows["1"] == rows["0"] and len(rows["1"]) == 2
    # the command line tuned its process, or said why not
    status = {
        t: json.loads((tmp_path / f"{method}_{t}.tsv.json").read_text())["provenance"]["malloc_tuning"]
        for t in ("1", "0")
    }
    assert status == {"1": "on", "0": "off (RDDRS_TUNE_MALLOC=0)"}


def test_importing_the_library_changes_no_allocator_and_the_core_loads_no_pipeline():
    """``import rddrs.core...`` loads nothing of rddrs.pipeline or rddrs.studies and leaves malloc as it
    is; only an entry point tunes it."""
    probe = (
        "import sys, rddrs, rddrs.core.certify, rddrs.core.optimize, rddrs.core.regions\n"
        "print(sorted(m for m in sys.modules if m.startswith(('rddrs.pipeline', 'rddrs.studies'))))\n"
        "from rddrs.pipeline import allocator\n"
        "print(allocator.status())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}
    ).stdout.splitlines()
    assert out == ["[]", "not tuned"]
