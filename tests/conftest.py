"""Shared fixtures: the book built once per session (test_book and test_browser both read it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MATHJAX = ROOT / "_mathjax" / "_static" / "mathjax" / "tex-chtml.js"


@pytest.fixture(scope="session")
def html(tmp_path_factory) -> Path:
    """Build the book from scratch into a temporary folder, as `make book` does (warnings are
    errors), and return the site's folder. RDDRS_BUILT_BOOK=_build/html checks a site that is
    already built instead (quicker while editing; `make test` always builds)."""
    if os.environ.get("RDDRS_BUILT_BOOK"):
        return Path(os.environ["RDDRS_BUILT_BOOK"]).resolve()
    if not MATHJAX.is_file():  # bootstrap the offline MathJax copy, as `make book` would
        subprocess.run(["make", "mathjax"], cwd=ROOT, check=True, capture_output=True)
    out = tmp_path_factory.mktemp("book")
    proc = subprocess.run(
        [str(BIN / "jupyter-book"), "build", "-W", "-n", "--keep-going", "--path-output", str(out), str(ROOT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert proc.returncode == 0, f"book build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    site = out / "_build" / "html"
    assert site.is_dir()
    return site
