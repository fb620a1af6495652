"""Shared by the tests: random scale matrices of each family (built without the library), the
closed-form worst point of a linear classifier, the check that an error is an ``RDDRSError`` with
a one-line message, and what bad-input tests of the command line need (snapshots of files,
commands that file permissions bind)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rddrs import RDDRSError
from rddrs.core.noise import Diagonal, FullSPD, Isotropic

F64 = torch.float64
FAMILIES = ["isotropic", "diagonal", "full"]
ROOT = Path(__file__).resolve().parents[1]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scale_matrix(family: str, d: int, seed: int, dtype=F64) -> torch.Tensor:
    """A random symmetric scale matrix S of the family (scales in [0.2, 1.7])."""
    gen = generator(seed)
    if family == "isotropic":
        s = (0.3 + torch.rand((), generator=gen, dtype=F64)) * torch.eye(d, dtype=F64)
    elif family == "diagonal":
        s = torch.diag(0.2 + 1.5 * torch.rand(d, generator=gen, dtype=F64))
    else:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
        s = (q * (0.2 + 1.5 * torch.rand(d, generator=gen, dtype=F64))) @ q.T
        s = 0.5 * (s + s.T)
    return s.to(dtype)


def smoothing(family: str, s: torch.Tensor, reps: int):
    """The law ``x + S eps`` repeated for ``reps`` inputs."""
    if family == "isotropic":
        return Isotropic(s[0, 0].repeat(reps), s.shape[0])
    if family == "diagonal":
        return Diagonal(torch.diagonal(s).repeat(reps, 1))
    return FullSPD(s.repeat(reps, 1, 1))


def worst_point(model, x: torch.Tensor, law, r) -> torch.Tensor:
    """The point of ``{x + S u : ||u|| <= r}`` closest to the other class of the linear classifier
    ``model`` (``rddrs.studies.validity.LinearClassifier``, score ``w.z + b``):
    ``x - sign(w.x + b) r S S^T w / ||S^T w||``, which moves the score by ``-sign r ||S^T w||``
    (test_validity checks it against dense algebra; test_attack's optimum)."""
    r = torch.as_tensor(r, dtype=x.dtype, device=x.device).expand(len(x))
    step = r * torch.sign(model.score(x)) / model.scaled_normal(law).norm(dim=1)
    return x - (step[:, None] * model.scaled_normal(law, 2)).reshape(x.shape)


def raises_one_line(fn, *args, **kwargs) -> str:
    """The message of the ``RDDRSError`` that ``fn(*args, **kwargs)`` raises; it must be one line."""
    with pytest.raises(RDDRSError) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def snapshot(*paths) -> dict:
    """The bytes and modification time of each file at or under ``paths`` (absent ones left out):
    equal snapshots before and after a command mean it left those files untouched."""
    files = []
    for path in map(Path, paths):
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def exit_status(main, args: list[str]) -> int:
    """What ``main(args)`` exits with: its return value, or the status of argparse's SystemExit."""
    try:
        return main(args)
    except SystemExit as stop:
        return stop.code


#: the capabilities that let root ignore file permissions (linux/capability.h), and the prctl
#: option that drops one from a process and what it executes
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def _without_overrides() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_bound_by_permissions(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """``rddrs ARGS`` in a subprocess that file permissions bind as they bind any user: when the
    tests run as root, whom they do not bind, the subprocess runs without the capabilities that
    override them (Linux), as a plain owner of its files."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "rddrs", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_without_overrides if os.geteuid() == 0 else None,
    )
