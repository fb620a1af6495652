"""Keep large CPU buffers inside the process instead of handing them back to the kernel.

Every batch of noisy images and every activation of the network is a fresh tensor of
megabytes. glibc's malloc serves blocks above its mmap threshold (128 KiB at start, raised
dynamically up to 32 MiB) with ``mmap`` and returns them with ``munmap`` when they are freed,
and it trims the top of its heap when more than 128 KiB there is free. Each batch then costs
page faults, zero-filling and unmapping: on 2 cores about half of the CPU time of the
sampling loops went to the kernel, and the speed changed from run to run with where the
dynamic threshold happened to stand.

``tune()`` sets, with ``mallopt``, ``M_MMAP_MAX = 0`` (every block comes from the heap) and
``M_TRIM_THRESHOLD = -1`` (the heap is never trimmed): a freed block is reused by the next
batch, and the pages are faulted in once, on the first batch. The process keeps its peak
heap until it exits. Nothing else changes: tensors hold the same values, so results are
identical to the last bit. (A finite threshold is not enough: ``mallopt``'s int argument
stops at 2 GiB, and the search's activations at 32 inputs x 2000 samples pass that.)

``import rddrs`` calls ``tune()`` once, so the command line, the chapters and any code that
imports the library get it. It is a change to the whole process, so it can be switched off:
set ``RDDRS_TUNE_MALLOC=0`` in the environment before importing rddrs. It does nothing
where glibc is not the C library, or where another allocator (jemalloc, tcmalloc, loaded
with ``LD_PRELOAD``) already replaces malloc.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: ``mallopt`` parameters of glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
ENV = "RDDRS_TUNE_MALLOC"

_state: dict[str, str] = {"status": "not tuned"}


def _preloaded_allocator() -> str | None:
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in ("jemalloc", "tcmalloc", "mimalloc") if name in preload), None)


def tune() -> str:
    """Apply the thresholds once (see the module docstring); returns what was done."""
    if _state["status"] != "not tuned":
        return _state["status"]
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        status = f"off ({ENV}=0)"
    elif platform.libc_ver()[0] != "glibc":
        status = "off (the C library is not glibc)"
    elif other := _preloaded_allocator():
        status = f"off ({other} is preloaded)"
    else:
        mallopt = ctypes.CDLL(None).mallopt
        # no mmap for any block, and no trimming of the heap's top (-1 disables it)
        ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
        status = "on" if ok else "off (glibc refused the thresholds)"
    _state["status"] = status
    return status


def status() -> str:
    """``on``, or ``off (why)``; recorded in every result file's provenance."""
    return _state["status"]
