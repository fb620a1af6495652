"""Shared by the tests: random scale matrices of each family (built without the library), and
the check that an error is an ``RDDRSError`` with a one-line message."""

from __future__ import annotations

import pytest
import torch

from rddrs import RDDRSError
from rddrs.core.noise import Diagonal, FullSPD, Isotropic

F64 = torch.float64
FAMILIES = ["isotropic", "diagonal", "full"]


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


def raises_one_line(fn, *args, **kwargs) -> str:
    """The message of the ``RDDRSError`` that ``fn(*args, **kwargs)`` raises; it must be one line."""
    with pytest.raises(RDDRSError) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg
