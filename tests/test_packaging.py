"""The environment files say what the Makefile installs (conda cannot run here, so parse them)."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_pins_and_entry_points():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    for pin in ("torch==2.14.1", "torchvision==0.29.1"):
        assert pin in deps
    assert any(d.startswith("numpy") and "<2.4" in d for d in deps)  # geomstats 2.8 needs numpy.trapz
    extras = project["optional-dependencies"]
    assert "geomstats==2.8.0" in extras["test"] and "geomstats==2.8.0" in extras["book"]
    assert any(d.startswith("jupyter-book") and "<2" in d for d in extras["book"])
    assert project["scripts"] == {"rddrs": "rddrs.cli:main"}
    assert extras["cluster"] == ["ray==2.60.0"]


def test_make_installs_the_cluster_extra_and_sweeps_before_the_chapters():
    """make test runs the Ray tests, so its install line brings the cluster extra; make results
    with ENGINE runs rddrs sweep before re-executing the chapters."""
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -e '.[book,test,cluster]'" in makefile
    results = makefile[makefile.index("\nresults:") :]
    results = results[: results.index("\n\n")]
    assert results.index("rddrs sweep --preset $(PRESET)") < results.index("papermill")


def test_environment_yml_matches():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "-e .[book,test,cluster]" in pip


def test_the_browser_test_and_the_bibliography_are_installed():
    """selenium and sphinxcontrib-bibtex come with the extras; .ci/run installs Debian's browser."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("selenium") for d in extras["test"])
    for extra in ("book", "test"):
        assert any(d.startswith("sphinxcontrib-bibtex") for d in extras[extra]), extra
    ci = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install" in ci and "chromium-driver" in ci and "(chromium)" in ci
    assert ci.rstrip().endswith("make test")


def test_a_source_tree_that_is_not_installed_reports_the_version_of_its_pyproject(tmp_path):
    """On a bare machine running from ``PYTHONPATH=src`` the rows' provenance names the source's
    version, not ``0+unknown``."""
    shutil.copytree(ROOT / "src" / "rddrs", tmp_path / "src" / "rddrs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    code = "import sys; sys.path.insert(0, 'src'); import rddrs; print(rddrs.__version__)"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert out.stdout.strip() == f"{expected}+source"
    (tmp_path / "pyproject.toml").unlink()
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0+unknown"
