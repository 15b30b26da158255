"""The documentation site (docs/): it builds with warnings as errors (``python docs/build.py``), no
internal link or image of it is broken, its pages render in headless Chromium, and search finds
pages (the index and, in the browser, the search page's result list).

Needs the ``docs`` extra (``pip install -e ".[docs]"``); the browser checks also need Chromium
(Debian: ``apt-get install chromium``; ``$PVAE_CHROMIUM`` names another binary). Without them the
tests are skipped, saying which is missing. The site is built once, into a temporary folder, for
all the tests of this module.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

_missing = [name for name in ("sphinx", "myst_nb", "furo") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"the docs extra is not installed ({', '.join(_missing)} missing): "
                           'pip install -e ".[docs]"')


def _find_chromium():
    named = os.environ.get("PVAE_CHROMIUM")
    if named:
        return shutil.which(named) or (named if Path(named).is_file() else None)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = _find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found (apt-get install chromium, or set $PVAE_CHROMIUM)")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``python docs/build.py --out DIR``, once for this module: its exit status, log and folder."""
    out = tmp_path_factory.mktemp("site") / "html"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "build.py"), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    return SimpleNamespace(out=out, returncode=done.returncode, log=done.stdout + done.stderr,
                           seconds=time.perf_counter() - start)


def _pages(site):
    if not (site.out / "index.html").is_file():
        pytest.fail(f"the build wrote no site (exit status {site.returncode}):\n{site.log[-5000:]}")
    return sorted(site.out.rglob("*.html"))


def test_site_builds_with_warnings_as_errors(site):
    warnings = [line for line in site.log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert site.returncode == 0, (
        f"python docs/build.py failed (exit status {site.returncode}, warnings are errors):\n"
        + "\n".join(warnings[:50]) + f"\n--- end of the log ---\n{site.log[-3000:]}")
    expected = ["index.html", "search.html", "searchindex.js", "reference.html", "api/pvae.html",
                "api/pvae.inference.html", "tutorials/index.html", "guide/estimators.html",
                "guide/own-program.html", "guide/own-data.html", "guide/scaling-out.html",
                "guide/reproducing.html", "guide/families.html"]
    expected += [f"tutorials/notebooks/{notebook.stem}.html" for notebook in NOTEBOOKS]
    missing = [name for name in expected if not (site.out / name).is_file()]
    assert not missing, f"pages missing from the site: {missing}"


class _Links(HTMLParser):
    """Every href/src of a page, and the ids it defines."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.links.append((tag, name, value))
            elif name in ("id", "name") and value:
                self.ids.add(value)


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def broken_links(root: Path) -> list:
    """Relative links and image/script sources of every page under ``root`` whose target file is
    missing (or outside the site), and links whose ``#fragment`` names no id of the target page.
    External (``http:``, ``mailto:``, ...) links are not followed; a bare ``#`` is the page itself."""
    root = root.resolve()
    parsed = {}

    def page(path):
        if path not in parsed:
            parsed[path] = _parse(path)
        return parsed[path]

    broken = []
    for source in sorted(root.rglob("*.html")):
        for tag, attr, value in page(source).links:
            url = urlsplit(value.strip())
            if url.scheme or url.netloc or value.startswith("//"):
                continue
            where = f"{source.relative_to(root)}: <{tag} {attr}={value!r}>"
            target = (source.parent / unquote(url.path)).resolve() if url.path else source
            if target.is_dir():
                target = target / "index.html"
            if root not in target.parents and target != root:
                broken.append(f"{where} leaves the site")
            elif not target.is_file():
                broken.append(f"{where}: no file {target.relative_to(root)}")
            elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in page(target).ids:
                broken.append(f"{where}: no id {url.fragment!r} in {target.relative_to(root)}")
    return broken


def test_no_broken_internal_links(site):
    pages = _pages(site)
    assert len(pages) > 20
    broken = broken_links(site.out)
    assert not broken, f"{len(broken)} broken links:\n" + "\n".join(broken[:40])


def test_every_public_name_links_to_its_documentation(site):
    """api/pvae.html's table lists ``pvae.__all__``, each name linked to the page that documents it
    (the link test checks that the anchor exists there)."""
    import pvae

    _pages(site)
    text = (site.out / "api" / "pvae.html").read_text(encoding="utf-8")
    table = text[text.index("<table"):text.index("</table>")]
    linked = {re.sub(r"<[^>]+>", "", label): href for href, label in
              re.findall(r'<a class="reference internal" href="([^"]+)"[^>]*>(.*?)</a>', table, re.S)}
    missing = [name for name in pvae.__all__ if name not in linked or "#" not in linked[name]]
    assert not missing, f"names of pvae.__all__ without a link to their documentation: {missing}"


def test_search_index_maps_terms_to_pages(site):
    _pages(site)
    text = (site.out / "searchindex.js").read_text(encoding="utf-8")
    index = json.loads(text[text.index("(") + 1:text.rindex(")")])
    assert {"docnames", "terms", "titleterms", "objects"} <= set(index), f"not a Sphinx search index: {text[:200]}"
    docnames = index["docnames"]
    for term, page in [("vampprior", "guide/families"), ("psis", "guide/estimators"),
                       ("torchrun", "guide/scaling-out"), ("reparametr", "tutorials/notebooks/01_elbo_and_aevb")]:
        found = set()
        for kind in ("terms", "titleterms"):  # body text, section titles: document numbers
            numbers = index[kind].get(term, [])
            found.update([numbers] if isinstance(numbers, int) else numbers)
        assert found, f"the search index has no term {term!r}"
        assert page in [docnames[i] for i in found], (term, sorted(docnames[i] for i in found))
    objects = json.dumps(index["objects"])
    assert "VampPrior" in objects and "ModelGuidePair" in objects


def _chromium(*args, user_data_dir, timeout=120):
    # no network: external scripts (MathJax from its CDN) fail at once instead of stalling the page
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={user_data_dir}",
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def non_blank_fraction(png: Path) -> float:
    """The fraction of pixels that differ from the image's most common colour."""
    from PIL import Image

    with Image.open(png) as image:
        rgb = image.convert("RGB")
        counts = rgb.getcolors(maxcolors=rgb.width * rgb.height)
    return 1 - max(count for count, _ in counts) / (rgb.width * rgb.height)


def screenshot(url: str, png: Path, user_data_dir: Path) -> float:
    done = _chromium(f"--screenshot={png}", "--window-size=1200,900", url, user_data_dir=user_data_dir)
    assert png.is_file(), f"Chromium wrote no screenshot of {url} (exit status {done.returncode}):\n{done.stderr[-2000:]}"
    return non_blank_fraction(png)


@needs_chromium
def test_pages_render_in_headless_chromium(site, tmp_path):
    _pages(site)
    notebook = f"tutorials/notebooks/{NOTEBOOKS[0].stem}.html" if NOTEBOOKS else "tutorials/index.html"
    for name in ["index.html", "api/pvae.inference.html", notebook, "guide/estimators.html"]:
        page = site.out / name
        assert page.is_file(), name
        png = tmp_path / (name.replace("/", "_") + ".png")
        fraction = screenshot(page.as_uri(), png, tmp_path / "chromium")
        assert fraction > 0.01, f"{name} renders blank in Chromium ({fraction:.2%} of pixels differ from the background)"


class _SearchResults(HTMLParser):
    """The links inside Sphinx's search result list, ``<ul class="search">``."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth, self.lists, self.links = 0, 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "ul":
            if self.depth or "search" in (attrs.get("class") or "").split():
                self.depth += 1
                self.lists += self.depth == 1
        elif tag == "a" and self.depth and attrs.get("href"):
            self.links.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "ul" and self.depth:
            self.depth -= 1


@needs_chromium
def test_search_finds_pages_in_headless_chromium(site, tmp_path):
    _pages(site)
    url = (site.out / "search.html").as_uri() + "?q=VampPrior"
    done = _chromium("--virtual-time-budget=10000", "--dump-dom", url, user_data_dir=tmp_path / "chromium")
    results = _SearchResults()
    results.feed(done.stdout)
    assert results.lists == 1, f"no search result list in the DOM of {url}:\n{done.stdout[-2000:]}{done.stderr[-1000:]}"
    assert results.links, f"the search for VampPrior found nothing:\n{done.stdout[-2000:]}"
    pages = {urlsplit(link).path for link in results.links}
    assert "api/pvae.parts.html" in pages and "guide/families.html" in pages, pages
    for path in pages:
        assert (site.out / unquote(path)).is_file(), path
