"""The package's architecture: three layers (core, pipeline, studies) and the command line on
top, imports flowing downward only, no cycle, light sub-package imports, and results that the
layout does not change."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from rddrs.cli import main
from rddrs.pipeline.results import read_rows, read_sidecar

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "rddrs"
#: what each part may import from rddrs (besides itself and the package root's RDDRSError)
ALLOWED = {
    "core": {"core"},
    "pipeline": {"core", "pipeline"},
    "studies": {"core", "pipeline", "studies"},
    "cli": {"core", "pipeline", "studies"},
}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        yield name, path


def rddrs_imports(path: Path) -> set[str]:
    """The rddrs modules a file imports anywhere in it, at its top or inside a function
    (``from rddrs.x.y import z`` -> rddrs.x.y, or rddrs.x.y.z where that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rddrs"):
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.add(
                    target if (PACKAGE.parent / target.replace(".", "/")).with_suffix(".py").exists() else node.module
                )
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rddrs")}
    return found


def part(module: str) -> str | None:
    bits = module.split(".")
    return bits[1] if len(bits) > 1 and bits[1] in ALLOWED else None


def test_the_package_is_three_layers_and_the_command_line():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__"))
    assert top == ["__init__.py", "__main__.py", "cli.py", "core", "pipeline", "studies"], top


@pytest.mark.parametrize("name, path", list(modules()))
def test_imports_flow_downward_only(name, path):
    own = part(name)
    if own is None:
        return  # the package root and __main__
    for target in rddrs_imports(path):
        other = part(target)
        assert other is None or other in ALLOWED[own], f"{name} imports {target}"


def test_no_module_imports_itself_back():
    graph = {name: {t for t in rddrs_imports(path) if t != name} for name, path in modules()}
    state: dict[str, str] = {}

    def visit(node, chain):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", " -> ".join(chain + [node])
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if nxt in graph:
                visit(nxt, chain + [node])
        state[node] = "done"

    for name in graph:
        visit(name, [])


def test_the_parts_import_nothing_heavy():
    code = "import sys, rddrs.core, rddrs.pipeline, rddrs.studies, rddrs.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


#: float columns of rows written on another machine, or with the other network path, agree to this
#: relative tolerance (float32 kernels round differently across CPUs and paths: measured up to 3e-6)
ROW_RTOL = 1e-4
DISCRETE = ("idx", "label", "predict", "correct", "search")


def assert_rows_match(got: dict, want: dict) -> None:
    """Every row of ``want`` in ``got``: discrete columns equal, floats within ``ROW_RTOL``."""
    assert sorted(got) == sorted(want)
    for i, row in want.items():
        for key, value in row.items():
            if key == "seconds":
                continue
            if key in DISCRETE or not isinstance(value, float):
                assert got[i][key] == value, (i, key)
            else:
                assert got[i][key] == pytest.approx(value, rel=ROW_RTOL, abs=1e-12), (i, key)


@pytest.mark.parametrize("network", ["fast", "autograd"])
@pytest.mark.parametrize("method", ["rs", "ddrs", "ancer", "rddrs"])
def test_the_same_seed_gives_the_rows_written_before_the_layout_changed(tmp_path, monkeypatch, method, network):
    """tests/data/smoke_sigma0.25 holds smoke-preset rows written by the flat package (commit d801c1a),
    one thread, on another machine; today's must be the same on either network path: the discrete
    columns exactly, the floats within ROW_RTOL."""
    import torch

    torch.set_num_threads(1)
    monkeypatch.setenv("RDDRS_FAST_NETWORK", "1" if network == "fast" else "0")
    out = tmp_path / f"{method}.tsv"
    assert (
        main(
            [
                "certify",
                "--method",
                method,
                "--sigma",
                "0.25",
                "--model",
                str(ROOT / "data" / "models" / "mnist_cnn_sigma0.25.pt"),
                "--preset",
                "smoke",
                "--data",
                str(ROOT / "data"),
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert read_sidecar(out)["provenance"]["network"] == network
    assert_rows_match(read_rows(out), read_rows(ROOT / "tests" / "data" / "smoke_sigma0.25" / f"{method}.tsv"))
