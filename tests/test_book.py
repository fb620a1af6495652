"""The book: chapters execute, and the built HTML is complete and works with no network.

The HTML checks build the whole book into a temporary folder with the same command as
`make book` (warnings are errors), so `make test` alone checks it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
import yaml

import rddrs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MATHJAX = ROOT / "_mathjax" / "_static" / "mathjax" / "tex-chtml.js"
URL = re.compile(r"^(https?:)?//", re.IGNORECASE)


def toc_files() -> list[str]:
    """Every document named in _toc.yml (root, chapters, parts, sections), in order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            for key in ("chapters", "parts", "sections"):
                walk(entry.get(key))

    walk([toc])
    return files


# -- the intro chapter runs -------------------------------------------------------------------


def test_toc_lists_the_planned_chapters():
    files = toc_files()
    assert files[0] == "book/intro"
    assert len(files) == 9, files
    for name in files:
        assert (ROOT / f"{name}.md").is_file(), f"{name}.md is in _toc.yml but does not exist"


def test_intro_is_a_jupytext_notebook_on_the_python3_kernel():
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(ROOT / "book" / "intro.md")
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.metadata["jupytext"]["text_representation"]["format_name"] == "myst"
    assert any(cell.cell_type == "code" for cell in nb.cells)


def test_intro_executes_and_prints_the_package_version(tmp_path):
    jupytext = pytest.importorskip("jupytext")
    papermill = pytest.importorskip("papermill")
    source = tmp_path / "intro.ipynb"
    jupytext.write(jupytext.read(ROOT / "book" / "intro.md"), source)
    executed = tmp_path / "intro.out.ipynb"
    papermill.execute_notebook(str(source), str(executed), kernel_name="python3",
                               cwd=str(ROOT / "book"), progress_bar=False)

    nb = nbformat.read(executed, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "rddrs.__version__" in c.source]
    assert len(cells) == 1, "expected one cell printing rddrs.__version__"
    printed = "".join(out.get("text", "") for out in cells[0].outputs
                      if out.output_type == "stream" and out.name == "stdout")
    assert printed.strip() == rddrs.__version__


# -- light chapters keep their executed notebooks for nbval; heavy ones run at the smoke preset --


def chapter_lists() -> dict[str, list[str]]:
    """LIGHT_CHAPTERS and HEAVY_CHAPTERS as the Makefile defines them."""
    text = (ROOT / "Makefile").read_text()
    return {kind: re.search(rf"^{kind}_CHAPTERS := (.*)$", text, re.MULTILINE).group(1).split()
            for kind in ("LIGHT", "HEAVY")}


def test_every_chapter_is_light_or_heavy():
    lists = chapter_lists()
    assert sorted(lists["LIGHT"] + lists["HEAVY"]) == sorted(Path(f).name for f in toc_files())


@pytest.mark.parametrize("name", chapter_lists()["LIGHT"])
def test_light_chapter_notebook_is_executed_and_in_sync(name):
    """book/NAME.ipynb (what nbval re-runs and compares) holds exactly the code of book/NAME.md."""
    jupytext = pytest.importorskip("jupytext")
    stored = ROOT / "book" / f"{name}.ipynb"
    assert stored.is_file(), f"{stored.name} missing: run `make notebooks`"
    source = [c.source for c in jupytext.read(ROOT / "book" / f"{name}.md").cells if c.cell_type == "code"]
    cells = [c for c in nbformat.read(stored, as_version=4).cells if c.cell_type == "code"]
    assert [c.source for c in cells] == source, f"{stored.name} is stale: run `make notebooks`"
    assert all(c.execution_count for c in cells), f"{stored.name} was not executed: run `make notebooks`"


@pytest.mark.slow
@pytest.mark.parametrize("name", chapter_lists()["HEAVY"])
def test_heavy_chapter_runs_at_the_smoke_preset(name, tmp_path):
    """As `make results PRESET=smoke` does: papermill with the chapter's parameters replaced."""
    jupytext = pytest.importorskip("jupytext")
    papermill = pytest.importorskip("papermill")
    nb = jupytext.read(ROOT / "book" / f"{name}.md")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}.md needs one cell tagged parameters"
    for key in ("preset", "device", "results_dir"):
        assert re.search(rf"^{key} = ", tagged[0].source, re.MULTILINE), f"{name}.md: no parameter {key}"
    source = tmp_path / f"{name}.ipynb"
    jupytext.write(nb, source)
    papermill.execute_notebook(str(source), str(tmp_path / f"{name}.out.ipynb"), kernel_name="python3",
                               cwd=str(ROOT / "book"), progress_bar=False,
                               parameters={"preset": "smoke", "results_dir": str(tmp_path / "results")})
    assert any((tmp_path / "results").rglob("*.tsv")), "the chapter wrote no result file"


# -- the built HTML ---------------------------------------------------------------------------


class _Assets(HTMLParser):
    """Collect what a page loads: script sources and bodies, images, stylesheets."""

    def __init__(self):
        super().__init__()
        self.scripts: list[str] = []
        self.inline: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self._in_script = True
            if attrs.get("src"):
                self.scripts.append(attrs["src"])
        elif tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])
        elif tag == "link" and attrs.get("href") and (
                {"stylesheet", "preload", "icon", "modulepreload"} & set((attrs.get("rel") or "").split())):
            self.links.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append(data)


def _parse(page: Path) -> _Assets:
    assets = _Assets()
    assets.feed(page.read_text(encoding="utf-8"))
    return assets


def _local(page: Path, ref: str) -> Path:
    return (page.parent / unquote(urlsplit(ref).path)).resolve()


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """Build the book from scratch into a temporary folder, as `make book` does."""
    if not MATHJAX.is_file():  # bootstrap the offline MathJax copy, as `make book` would
        subprocess.run(["make", "mathjax"], cwd=ROOT, check=True, capture_output=True)
    out = tmp_path_factory.mktemp("book")
    proc = subprocess.run(
        [str(BIN / "jupyter-book"), "build", "-W", "-n", "--keep-going",
         "--path-output", str(out), str(ROOT)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert proc.returncode == 0, f"book build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    site = out / "_build" / "html"
    assert site.is_dir()
    return site


def _pages(site: Path) -> list[Path]:
    """The site's pages (the theme's Jinja macro files under _static/ are not pages)."""
    pages = sorted(p for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts)
    assert pages
    return pages


@pytest.mark.slow
def test_every_toc_chapter_is_built(html):
    for name in toc_files():
        assert (html / f"{name}.html").is_file(), f"no HTML page for {name}"


@pytest.mark.slow
def test_the_built_intro_shows_the_executed_version(html):
    text = (html / "book" / "intro.html").read_text(encoding="utf-8")
    outputs = re.findall(r'class="cell_output[^"]*".*?<pre>(.*?)</pre>', text, re.DOTALL)
    assert any(re.sub(r"<[^>]+>", "", out).strip() == rddrs.__version__ for out in outputs)


@pytest.mark.slow
def test_every_image_exists(html):
    for page in _pages(html):
        for src in _parse(page).images:
            if src.startswith("data:"):
                continue
            assert not URL.match(src), f"{page.name} loads an image from the network: {src}"
            assert _local(page, src).is_file(), f"{page.name}: missing image {src}"


@pytest.mark.slow
def test_no_page_loads_anything_from_the_network(html):
    for page in _pages(html):
        assets = _parse(page)
        for ref in assets.scripts + assets.links:
            assert not URL.match(ref), f"{page.name} loads {ref} from the network"
            assert _local(page, ref).is_file(), f"{page.name}: missing {ref}"
        for body in assets.inline:  # e.g. a CDN address handed to a loader script
            assert not re.search(r"https?://", body), f"{page.name}: inline script with a URL"


@pytest.mark.slow
def test_mathjax_is_the_local_copy(html):
    intro = html / "book" / "intro.html"
    scripts = [src for src in _parse(intro).scripts if "mathjax" in src.lower()]
    assert len(scripts) == 1, scripts
    script = _local(intro, scripts[0])
    assert script.name == "tex-chtml.js" and script.is_file()
    # the fonts and the TeX extensions that tex-chtml.js loads from beside itself
    assert any((script.parent / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert (script.parent / "input" / "tex" / "extensions").is_dir()
    # every page with mathematics loads that same copy
    for page in _pages(html):
        text = page.read_text(encoding="utf-8")
        if 'class="math' in text:
            mj = [s for s in _parse(page).scripts if "mathjax" in s.lower()]
            assert mj and _local(page, mj[0]) == script, page.name
