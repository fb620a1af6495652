"""The built book as its readers see it: every page opened from the local files in headless
Chromium (Selenium with Debian's ``chromium`` and ``chromium-driver``).

For each page, in a 1280-pixel window: MathJax typeset every formula (no error, no TeX left in
the text); every table is an HTML ``<table>`` with a caption, and no Markdown pipe table reached
the text; every image loaded and is shown at (nearly) its own size, so that figures drawn at the
page's width with 9 pt text are read at 9 pt; no visible code, output or table scrolls sideways;
no heading starts with a number of its own beside the book's (no "7.1. 1. Objectives"), and the
prose refers to sections by the book's numbers ("section 7.3", never a bare "section 3"); the
console has no errors; and nothing was requested from the network (every request is a file://
or data: URL).

Then every page in the light and the dark theme, at 1280 pixels (a laptop) and 390 pixels (a
phone): every block of text (paragraphs, notes, captions, list items, table cells, headings)
has a WCAG contrast of at least 4.5 with what is behind it; no table is clipped at 1280
pixels; at 390 no caption is cut, and a table or figure wider than the screen scrolls in a box
that shows it does (a shadow at the edge that hides more); the page itself never scrolls
sideways. A full-page screenshot of each page, theme and width is saved in
``_build/screenshots/`` for people to look at.

Without a browser the tests are skipped with the command that installs one; in CI (``CI=true``)
a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from test_book import toc_files

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "_build" / "screenshots"
WIDTH, HEIGHT = 1280, 900  # a laptop window: the text column is ~680 CSS pixels wide
INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium (or pip install -e '.[test]')"
# without the background-networking flags Chromium phones home (and fails on a closed network)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-extensions",
    "--disable-default-apps",
    f"--window-size={WIDTH},{HEIGHT}",
    "--hide-scrollbars",
)
LOCAL_SCHEMES = ("file://", "data:", "about:", "blob:")


def _missing() -> str | None:
    """What is missing to run the browser tests, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            return f"{program} is not on PATH"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        message = f"{missing}; install with: {INSTALL}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the browser test must run in CI: {message}")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="rddrs-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(60)
    driver.get("about:blank")  # leave the start page (its chrome:// requests) before logging
    driver.get_log("browser"), driver.get_log("performance")
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# The checks, run in the page. Text is read from visible text nodes only (not from code, not from
# typeset maths, not from folded cells); "visible" means rendered (closed <details> are not).
INSPECT = r"""
const done = arguments[arguments.length - 1];
let article = null;
const skip = "pre, code, script, style, mjx-container, .MathJax, mjx-assistive-mml, svg";
function visible(el) { return !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length); }
function texts(outside) {
  const out = [];
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest(outside) || !visible(el)) continue;
    out.push(n.textContent);
  }
  return out;
}
// wait for the page (and its article) to be loaded, then for MathJax to have typeset it
const loaded = new Promise(resolve => {
  const poll = () => (document.readyState === "complete" && document.querySelector("article.bd-article"))
      ? resolve() : setTimeout(poll, 50);
  poll();
});
loaded.then(() => (window.MathJax && MathJax.startup && MathJax.startup.promise) || null)
      .catch(e => null).then(() => {
 try {
  article = document.querySelector("article.bd-article");
  const maths = [...article.querySelectorAll(".math")];
  const tables = [...article.querySelectorAll("table")];
  const scrollers = [...article.querySelectorAll(
      "pre, .rddrs-table-wrapper, .cell_output, div.math, mjx-container[display]")]
      .filter(el => visible(el) && !el.closest("details:not([open])") && el.scrollWidth > el.clientWidth + 1)
      .map(el => `${el.tagName.toLowerCase()}.${[...el.classList].join(".")}: ` +
                 `${el.scrollWidth} > ${el.clientWidth} px: ${el.textContent.trim().slice(0, 60)}`);
  done({
    mathjax: !!window.MathJax,
    maths: maths.length,
    untypeset: maths.filter(m => !m.querySelector("mjx-container")).map(m => m.textContent.slice(0, 80)),
    errors: [...article.querySelectorAll("mjx-merror")].map(e => e.textContent.slice(0, 80)),
    text: texts(skip).join(""),
    prose: texts(skip + ", table"),
    tables: tables.length,
    uncaptioned: tables.filter(t => !(t.caption && t.caption.textContent.trim()))
                       .map(t => t.textContent.trim().slice(0, 80)),
    images: [...document.images].map(i => ({src: i.currentSrc || i.src, complete: i.complete,
        natural: i.naturalWidth, shown: i.clientWidth,
        width: parseFloat(i.getAttribute("width") || i.style.width || "0"),
        inArticle: article.contains(i)})),
    scrollers: scrollers,
    // headings as read: the book's number (span.section-number) taken out
    headings: [...article.querySelectorAll("h1, h2, h3, h4, h5, h6")].map(h => {
      const copy = h.cloneNode(true);
      copy.querySelectorAll(".section-number, .headerlink").forEach(n => n.remove());
      return {numbered: !!h.querySelector(".section-number"), text: copy.textContent.trim()};
    }),
    pageWidth: document.documentElement.scrollWidth,
    height: document.documentElement.scrollHeight,
  });
 } catch (e) { done({failure: String(e) + " " + (e.stack || "")}); }
});
"""

TEX_LEFT = ("\\(", "\\)", "\\[", "\\]", "$$")


def _raw_tex(text: str) -> list[str]:
    """Pieces of text that are TeX which MathJax did not typeset."""
    import re

    found = [t for t in TEX_LEFT if t in text]
    found += re.findall(r"\$[^$\n]{0,80}?[\\^_{}][^$\n]{0,80}?\$", text)
    return found


def _pipe_tables(pieces: list[str]) -> list[str]:
    """Lines of text, outside tables, that look like a Markdown table: a delimiter row, or a
    line that starts and ends with a pipe and holds three or more."""
    import re

    lines = [line.strip() for piece in pieces for line in piece.splitlines()]
    return [
        line[:80]
        for line in lines
        if re.search(r"\|\s*:?[-–—]+:?\s*\|", line)
        or (line.startswith("|") and line.endswith("|") and line.count("|") >= 3)
    ]


def _own_number(heading: str) -> bool:
    """A heading that starts with a number of its own ("1. Objectives", "2) Steps", "III."): the
    book numbers its sections, so a second number reads "7.1. 1. Objectives"."""
    import re

    return bool(re.match(r"(\d+|[IVX]+)(\.\d+)*[.):]\s", heading))


def _bare_sections(pieces: list[str]) -> list[str]:
    """References such as "section 5" or "sections 1 to 6" in the prose: the book numbers its
    sections "8.6", so a bare number names no section the reader can find."""
    import re

    text = " ".join(" ".join(pieces).split())
    return [m.group(0) for m in re.finditer(r"\b[Ss]ections? \d+(?!\d|\.\d)", text)]


def test_the_number_checks_read_headings_and_references_as_a_reader_would():
    """What the page test calls a doubled number or a bare section reference (no browser needed)."""
    assert _own_number("1. Objectives, step rules and starts") and _own_number("2) Step sizes")
    assert not _own_number("The weight κ of the smallest eigenvalue") and not _own_number("2026 results")
    found = _bare_sections(["at equal budget (section 5)", "sections 1 to 6: 8 test images"])
    assert found == ["section 5", "sections 1"]
    assert _bare_sections(["as section 8.6 shows, and as in section 7.3."]) == []
    assert _bare_sections(["measured in section 5."]) == ["section 5"]


def _requests(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _screenshot(driver, name: str, height: int, width: int = WIDTH) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.set_window_size(width, min(max(height, HEIGHT), 32_000))
    time.sleep(0.3)
    driver.save_screenshot(str(SCREENSHOTS / f"{name.replace('/', '_')}.png"))
    driver.set_window_size(width, HEIGHT)


@pytest.mark.parametrize("name", toc_files())
def test_page_reads_well_in_a_browser(browser, html, name):
    page = html / f"{name}.html"
    assert page.is_file(), f"no page {page}"
    browser.set_window_size(WIDTH, HEIGHT)
    browser.get("about:blank")
    browser.get_log("browser"), browser.get_log("performance")  # start with empty logs
    browser.get(page.as_uri())
    seen = browser.execute_async_script(INSPECT)
    assert "failure" not in seen, f"{name}: the page inspection failed: {seen.get('failure')}"
    problems = []

    # MathJax: loaded wherever there is maths, every formula typeset, no error, no TeX left
    if seen["maths"] and not seen["mathjax"]:
        problems.append("the page has maths but MathJax did not load")
    problems += [f"formula not typeset: {t!r}" for t in seen["untypeset"]]
    problems += [f"MathJax error: {t!r}" for t in seen["errors"]]
    problems += [f"TeX left in the text: {t!r}" for t in _raw_tex(seen["text"])]
    # tables: HTML tables with a caption, no Markdown pipes in the text
    problems += [f"table without a caption: {t!r}" for t in seen["uncaptioned"]]
    problems += [f"Markdown table in the text: {t!r}" for t in _pipe_tables(seen["prose"])]
    # images: loaded, and shown at (nearly) their own size so that their text stays legible
    for image in seen["images"]:
        if not image["complete"] or image["natural"] == 0:
            problems.append(f"image did not load: {image['src'][:100]}")
        elif image["inArticle"]:
            intended = image["width"] or image["natural"]
            if image["shown"] < 0.9 * intended:
                problems.append(
                    f"image shrunk to {image['shown'] / intended:.0%} of its size "
                    f"({image['shown']} of {intended:g} px), its text below 9 pt: {image['src'][-70:]}"
                )
    # headings: one number each, the book's; prose refers to sections by the book's numbers
    problems += [
        f"heading with a number of its own: {h['text'][:60]!r}" for h in seen["headings"] if _own_number(h["text"])
    ]
    problems += [f"section referred to by a bare number: {ref!r}" for ref in _bare_sections(seen["prose"])]
    # nothing scrolls sideways
    problems += [f"scrolls sideways: {s}" for s in seen["scrollers"]]
    if seen["pageWidth"] > WIDTH:
        problems.append(f"the page is {seen['pageWidth']} px wide in a {WIDTH} px window")
    # the console and the network
    problems += [f"console error: {e['message'][:200]}" for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    problems += [f"network request: {url[:120]}" for url in _requests(browser) if not url.startswith(LOCAL_SCHEMES)]

    _screenshot(browser, name, seen["height"])
    assert not problems, f"{name}: {len(problems)} problem(s):\n" + "\n".join(problems)
    assert seen["text"].strip(), f"{name}: no text"


def test_the_book_holds_tables_and_figures(browser, html):
    """The chapters' tables and figures reach the reader as tables and images (a guard against
    a page that passes the checks above by showing nothing)."""
    counts = {}
    for name in toc_files():
        browser.get((html / f"{name}.html").as_uri())
        counts[name] = browser.execute_script(
            "const a = document.querySelector('article.bd-article');"
            "return [a.querySelectorAll('table').length, a.querySelectorAll('figure img, img').length];"
        )
    tables = sum(t for t, _ in counts.values())
    images = sum(i for _, i in counts.values())
    assert counts["book/mnist"][0] >= 5 and counts["book/mnist"][1] >= 2, counts["book/mnist"]
    assert counts["book/claims"][0] >= 7, counts["book/claims"]
    assert counts["book/soundness"][0] >= 4, counts["book/soundness"]
    assert tables >= 25 and images >= 15, counts


# The pages in each theme and at each width. The script sets the theme as the theme's own switch
# does (data-theme on <html>), waits for the page and MathJax, and returns what a reader would
# find wrong:
# - low: blocks of text (any element of the article with text of its own, outside code and
#   typeset maths) whose colour has a WCAG contrast below 4.5 with what is behind it (the first
#   ancestor with a background colour);
# - clipped: tables and images that reach beyond the box that shows them (the nearest ancestor
#   that clips, or the window), when that box does not scroll or shows no sign of scrolling;
#   wide: true forbids any table beyond its box (a laptop has the room);
# - cut: captions (and the notes under a table) that reach beyond that box, cut mid-word;
# - small: images shown below 90 % of their size (their 9 pt labels shrink with them).
# A box "shows that it scrolls" when it scrolls sideways and draws one of rddrs.css' cues: scroll
# shadows (a background attached to its content, "local", which hides the shadow at the edge the
# content has reached) or, for opaque figures, a mask that fades the edge with more beyond it
# (a scroll-driven animation).
LAYOUT = r"""
const theme = arguments[0], wide = arguments[1];
const done = arguments[arguments.length - 1];
document.documentElement.dataset.theme = theme;
document.documentElement.dataset.mode = theme;
const ready = new Promise(resolve => {
  const poll = () => (document.readyState === "complete" && document.querySelector("article.bd-article"))
      ? resolve() : setTimeout(poll, 50);
  poll();
});
ready.then(() => (window.MathJax && MathJax.startup && MathJax.startup.promise) || null).catch(e => null)
     .then(() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))).then(() => {
 try {
  const article = document.querySelector("article.bd-article");
  const W = document.documentElement.clientWidth;
  const skip = "pre, code, script, style, mjx-container, .MathJax, mjx-assistive-mml, svg, .headerlink";
  const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length)
                        && !el.closest("details:not([open])");
  const rgb = text => text.match(/[\d.]+/g).map(Number);
  const luminance = c => {
    const [r, g, b] = c.slice(0, 3).map(v => v / 255).map(v => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const behind = el => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c;
    }
    return rgb(getComputedStyle(document.body).backgroundColor);
  };
  const say = el => `${el.tagName.toLowerCase()}${el.className && typeof el.className === "string"
      ? "." + el.className.trim().split(/\s+/).join(".") : ""}: ${el.textContent.trim().slice(0, 50)}`;
  // contrast of every element that holds text of its own
  const low = [];
  for (const el of article.querySelectorAll("*")) {
    if (el.closest(skip) || !visible(el)) continue;
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!own) continue;
    const a = luminance(rgb(getComputedStyle(el).color)), b = luminance(behind(el));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) low.push(`${ratio.toFixed(1)} ${say(el)}`);
  }
  // the box that shows an element: its nearest clipping ancestor, within the window
  const box = el => {
    for (let a = el.parentElement; a && a !== document.documentElement; a = a.parentElement)
      if (getComputedStyle(a).overflowX !== "visible") return a;
    return null;
  };
  const edges = b => {
    const r = b ? b.getBoundingClientRect() : {left: 0, right: W};
    return [Math.max(r.left, 0), Math.min(r.right, W)];
  };
  const shows = b => {
    if (!b || b.scrollWidth <= b.clientWidth + 1) return false;
    const style = getComputedStyle(b);
    const shadows = /local/.test(style.backgroundAttachment) && style.backgroundImage !== "none";
    const fades = style.maskImage !== "none" && /scroll/.test(style.animationTimeline || "");
    return /auto|scroll/.test(style.overflowX) && (shadows || fades);
  };
  const clipped = [], cut = [], small = [];
  for (const table of article.querySelectorAll("table")) {
    if (!visible(table)) continue;
    const b = box(table), [left, right] = edges(b);
    const cells = [...table.rows].flatMap(tr => [...tr.cells]);
    const beyond = Math.max(...cells.map(c => c.getBoundingClientRect().right)) - right;
    if (beyond > 1 && (wide || !shows(b)))
      clipped.push(`table ${Math.round(beyond)} px beyond its box${wide ? "" : " without a visible scroll"}: `
                   + say(table));
    const notes = table.parentElement.querySelector(":scope > .rddrs-table-notes");
    for (const text of [table.caption, notes]) {
      if (!text || !text.textContent.trim()) continue;
      const r = text.getBoundingClientRect();
      if (r.right > right + 1 || r.left < left - 1)
        cut.push(`${Math.round(r.right - right)} px cut off: ${say(text)}`);
    }
  }
  for (const img of article.querySelectorAll("img")) {
    if (!visible(img) || !img.naturalWidth) continue;
    const intended = parseFloat(img.getAttribute("width") || img.style.width || "0") || img.naturalWidth;
    if (img.clientWidth < 0.9 * intended)
      small.push(`image shown at ${Math.round(100 * img.clientWidth / intended)} % of its ${intended} px: `
                 + img.src.slice(-60));
    const b = box(img), [, right] = edges(b), beyond = img.getBoundingClientRect().right - right;
    if (beyond > 1 && !shows(b))
      clipped.push(`image ${Math.round(beyond)} px beyond its box without a visible scroll: ${img.src.slice(-60)}`);
  }
  done({low, clipped, cut, small, pageWidth: document.documentElement.scrollWidth, width: W,
        height: document.documentElement.scrollHeight});
 } catch (e) { done({failure: String(e) + " " + (e.stack || "")}); }
});
"""

PHONE = 390, 844


@pytest.mark.parametrize("width", [WIDTH, PHONE[0]])
@pytest.mark.parametrize("theme", ["light", "dark"])
def test_pages_read_in_both_themes_and_on_a_phone(browser, html, theme, width):
    """Every page at this width and theme: text contrast, tables and figures within their box or
    visibly scrolling, captions whole; a full-page screenshot of each."""
    height = HEIGHT if width == WIDTH else PHONE[1]
    found = {}
    try:
        for name in toc_files():
            browser.set_window_size(width, height)
            browser.get((html / f"{name}.html").as_uri())
            seen = browser.execute_async_script(LAYOUT, theme, width >= 1000)
            assert "failure" not in seen, f"{name}: the page inspection failed: {seen.get('failure')}"
            problems = [f"contrast {t}" for t in seen["low"]] + seen["clipped"] + seen["cut"] + seen["small"]
            if seen["pageWidth"] > seen["width"]:
                problems.append(f"the page is {seen['pageWidth']} px wide in a {seen['width']} px window")
            if problems:
                found[name] = problems
            _screenshot(browser, f"{name}-{theme}-{width}", seen["height"], width)
    finally:
        browser.set_window_size(WIDTH, HEIGHT)
    assert not found, f"{theme} theme, {width} px: " + "\n".join(
        f"{name}: {len(p)} problem(s):\n  " + "\n  ".join(p[:8]) for name, p in found.items()
    )
