"""The book: chapters execute, and the built HTML is complete and works with no network.

The HTML checks read the book that the session fixture ``html`` (tests/conftest.py) builds into a
temporary folder with the same command as `make book` (warnings are errors), so `make test`
alone checks it; tests/test_browser.py opens the same pages in a browser.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
import yaml

import rddrs

ROOT = Path(__file__).resolve().parents[1]
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


def chapter_files() -> list[str]:
    """The documents of _toc.yml that are Jupytext notebooks (the chapters; not the references)."""
    return [
        name for name in toc_files() if (ROOT / f"{name}.md").read_text(encoding="utf-8").startswith("---\njupytext:")
    ]


# -- the table of contents and the bibliography -----------------------------------------------


def test_toc_lists_the_planned_chapters():
    files = toc_files()
    assert files[0] == "book/intro"
    assert files[-1] == "book/references"
    for name in files:
        assert (ROOT / f"{name}.md").is_file(), f"{name}.md is in _toc.yml but does not exist"
    assert len(chapter_files()) == 11, chapter_files()


BIB = ROOT / "book" / "references.bib"
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
# the works the chapters rely on most (issue 12): each must be in the bibliography and cited
REQUIRED_WORKS = (
    "cohen2019certified",
    "alfarra2020ddrs",
    "eiras2021ancer",
    "labarbarie2022rddrs",
    "salman2019provably",
    "sukenik2022intriguing",
    "yang2020randomized",
    "miolane2020geomstats",
)


def test_every_citation_is_in_the_bibliography_and_the_main_works_are_cited():
    keys = set(re.findall(r"^@\w+\{([^,\s]+),", BIB.read_text(encoding="utf-8"), re.MULTILINE))
    cited = {}
    for name in chapter_files():
        for group in CITE.findall((ROOT / f"{name}.md").read_text(encoding="utf-8")):
            for key in group.split(","):
                cited.setdefault(key.strip(), []).append(name)
    unknown = sorted(set(cited) - keys)
    assert not unknown, f"cited but not in {BIB.name}: {unknown}"
    missing = [key for key in REQUIRED_WORKS if key not in cited]
    assert not missing, f"never cited in a chapter: {missing}"
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["bibtex_bibfiles"] == ["book/references.bib"]
    assert "sphinxcontrib.bibtex" in config["sphinx"]["config"]["extensions"]
    assert "{bibliography}" in (ROOT / "book" / "references.md").read_text(encoding="utf-8")


# -- the intro chapter runs -------------------------------------------------------------------


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
    papermill.execute_notebook(
        str(source), str(executed), kernel_name="python3", cwd=str(ROOT / "book"), progress_bar=False
    )

    nb = nbformat.read(executed, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "rddrs.__version__" in c.source]
    assert len(cells) == 1, "expected one cell printing rddrs.__version__"
    printed = "".join(
        out.get("text", "") for out in cells[0].outputs if out.output_type == "stream" and out.name == "stdout"
    )
    assert printed.strip() == rddrs.__version__


# -- light chapters keep their executed notebooks for nbval; heavy ones run at the smoke preset --


def chapter_lists() -> dict[str, list[str]]:
    """LIGHT_CHAPTERS and HEAVY_CHAPTERS as the Makefile defines them."""
    text = (ROOT / "Makefile").read_text()
    return {
        kind: re.search(rf"^{kind}_CHAPTERS := (.*)$", text, re.MULTILINE).group(1).split()
        for kind in ("LIGHT", "HEAVY")
    }


def test_make_book_runs_the_chapters_again_after_new_result_files(tmp_path):
    """jupyter-book's cache is keyed on a chapter's code: `make book-cache` (a step of `make book`)
    forgets it when a result file is newer than the cache, and only then."""
    cache, doctrees = tmp_path / "_build" / ".jupyter_cache", tmp_path / "_build" / ".doctrees"
    rows, trace = tmp_path / "results" / "paper" / "rs_sigma0.50.tsv", tmp_path / "results" / "x.tsv.traces" / "1.npz"
    for path in (cache / "global.db", doctrees / "intro.doctree", rows, trace):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    os.utime(rows, (1_000_000_000, 1_000_000_000))  # older than the cache; a newer law's trace does not count

    def make():
        return subprocess.run(
            ["make", "-s", "-f", str(ROOT / "Makefile"), "book-cache"], cwd=tmp_path, capture_output=True, text=True
        )

    assert make().returncode == 0 and (cache / "global.db").exists() and doctrees.exists()
    rows.touch()  # new rows, after the build
    os.utime(rows, (time.time() + 5, time.time() + 5))
    done = make()
    assert done.returncode == 0 and "run again" in done.stdout
    assert not cache.exists() and not doctrees.exists() and rows.exists()
    assert make().returncode == 0  # no cache: nothing to forget


def test_every_chapter_is_light_or_heavy():
    lists = chapter_lists()
    assert sorted(lists["LIGHT"] + lists["HEAVY"]) == sorted(Path(f).name for f in chapter_files())


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


# a visible code line fits the text column (~680 px of 8 px characters, with the cell's padding)
CODE_WIDTH = 79
FOLDED = {"hide-input", "remove-input", "remove-cell", "hide-cell"}


@pytest.mark.parametrize("name", chapter_lists()["LIGHT"] + chapter_lists()["HEAVY"])
def test_visible_code_fits_the_page(name):
    """Cells shown to the reader (not folded or removed) have no line that scrolls sideways."""
    jupytext = pytest.importorskip("jupytext")
    long = []
    for cell in jupytext.read(ROOT / "book" / f"{name}.md").cells:
        if cell.cell_type != "code" or FOLDED & set(cell.metadata.get("tags", [])):
            continue
        long += [line for line in cell.source.splitlines() if len(line) > CODE_WIDTH]
    assert not long, f"{name}.md: {len(long)} visible line(s) over {CODE_WIDTH} characters, e.g. {long[0]!r}"


def _unshown_tables(source: str) -> list[int]:
    """Lines of ``Table(...)`` expressions that a notebook does not show: any but a cell's last
    top-level statement (nested ones included), since only that one's value is displayed."""
    import ast

    lines = [line for line in source.splitlines() if not line.lstrip().startswith("%")]  # magics are not Python
    found = []

    def walk(statements, top):
        for i, statement in enumerate(statements):
            call = statement.value if isinstance(statement, ast.Expr) else None
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Table":
                if not (top and i == len(statements) - 1):
                    found.append(statement.lineno)
            if not isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
                for field in ("body", "orelse", "finalbody"):
                    walk(getattr(statement, field, []) or [], False)

    walk(ast.parse("\n".join(lines)).body, True)
    return found


def test_a_table_that_is_not_shown_is_caught():
    assert _unshown_tables("Table(a)\nx = 1\nif x:\n    Table(b)\nTable(c)") == [1, 4]
    assert _unshown_tables("display(Table(a))\nTable(b)") == []


@pytest.mark.parametrize("name", chapter_lists()["LIGHT"] + chapter_lists()["HEAVY"])
def test_every_table_is_shown(name):
    """A ``Table`` that is not a cell's last statement is built and never displayed: wrap it in display()."""
    jupytext = pytest.importorskip("jupytext")
    missing = [
        (cell.source.splitlines()[0][:60], line)
        for cell in jupytext.read(ROOT / "book" / f"{name}.md").cells
        if cell.cell_type == "code"
        for line in _unshown_tables(cell.source)
    ]
    assert not missing, f"{name}.md: tables built but not shown (cell, line): {missing}"


#: the prose one page may hold (characters of its markdown cells), so a reader finds its point
PROSE_LIMIT = 25_000


@pytest.mark.parametrize("name", chapter_lists()["LIGHT"] + chapter_lists()["HEAVY"])
def test_no_page_holds_more_prose_than_a_reader_takes_in(name):
    jupytext = pytest.importorskip("jupytext")
    prose = sum(len(c.source) for c in jupytext.read(ROOT / "book" / f"{name}.md").cells if c.cell_type == "markdown")
    assert 1000 < prose <= PROSE_LIMIT, f"{name}.md holds {prose} characters of prose"


def test_heavy_chapters_fold_their_code_and_check_what_they_state():
    """Heavy chapters show prose, figures and tables with every code cell folded, and assert the
    facts they state (no error is caught and printed instead)."""
    jupytext = pytest.importorskip("jupytext")
    for name in chapter_lists()["HEAVY"]:
        cells = [c for c in jupytext.read(ROOT / "book" / f"{name}.md").cells if c.cell_type == "code"]
        shown = [c.source.splitlines()[0] for c in cells if not FOLDED & set(c.metadata.get("tags", []))]
        code = "\n".join(c.source for c in cells)
        asserts = len(re.findall(r"^\s*assert ", code, re.MULTILINE))
        assert asserts >= 4, f"{name}.md asserts {asserts} facts"
        assert not re.search(r"except\b[^\n]*:\s*\n\s*print", code), f"{name}.md prints an error it caught"
        if name == "mnist":
            assert not shown, f"mnist.md shows code cells: {shown}"


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
    papermill.execute_notebook(
        str(source),
        str(tmp_path / f"{name}.out.ipynb"),
        kernel_name="python3",
        cwd=str(ROOT / "book"),
        progress_bar=False,
        parameters={"preset": "smoke", "results_dir": str(tmp_path / "results")},
    )
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
        elif (
            tag == "link"
            and attrs.get("href")
            and ({"stylesheet", "preload", "icon", "modulepreload"} & set((attrs.get("rel") or "").split()))
        ):
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


def _pages(site: Path) -> list[Path]:
    """The site's pages (the theme's Jinja macro files under _static/ are not pages)."""
    pages = sorted(p for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts)
    assert pages
    return pages


def test_every_toc_chapter_is_built(html):
    for name in toc_files():
        assert (html / f"{name}.html").is_file(), f"no HTML page for {name}"


def test_the_built_intro_shows_the_executed_version(html):
    text = (html / "book" / "intro.html").read_text(encoding="utf-8")
    outputs = re.findall(r'class="cell_output[^"]*".*?<pre>(.*?)</pre>', text, re.DOTALL)
    assert any(re.sub(r"<[^>]+>", "", out).strip() == rddrs.__version__ for out in outputs)


def test_every_image_exists(html):
    for page in _pages(html):
        for src in _parse(page).images:
            if src.startswith("data:"):
                continue
            assert not URL.match(src), f"{page.name} loads an image from the network: {src}"
            assert _local(page, src).is_file(), f"{page.name}: missing image {src}"


def test_no_page_loads_anything_from_the_network(html):
    for page in _pages(html):
        assets = _parse(page)
        for ref in assets.scripts + assets.links:
            assert not URL.match(ref), f"{page.name} loads {ref} from the network"
            assert _local(page, ref).is_file(), f"{page.name}: missing {ref}"
        for body in assets.inline:  # e.g. a CDN address handed to a loader script
            assert not re.search(r"https?://", body), f"{page.name}: inline script with a URL"


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
