"""
How fast the code explorer (report.write_browser, the browser.html of analyze.py) filters and sorts a large
codebook, timed inside headless Chromium on a synthetic page; and the one way this project starts that browser
(tests/test_explorer.py uses `headless_chromium` too).

    python scripts/explorer_bench.py                          # one book of 10,000 codes, 512 x 128 tokens
    python scripts/explorer_bench.py --num_codes=10000 --books=6
    python scripts/explorer_bench.py --screenshot=out/analysis/browser.html   # -> assets/explorer.png

The page: `--books` books of `--num_codes` codes (k=1) on `--rows` sequences of `--T` tokens of 2,000 made-up
words, codes drawn with Zipf-like frequencies (a fifth of them dead), each used code with two concepts ("topic tN",
"mood mN"). Each operation is what the page does on a control's event (filter, sort, render the first 100 rows, the
browser's layout), timed in the page with performance.now(), the median of 7. Needs Chromium from the
distribution's packages (apt-get install chromium) and Playwright for Python (requirements-test.txt); no browser
download, no network: every request but the page itself is refused and counted.
"""

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing.configuration import ConfigError, parse_config, spec, validate  # noqa: E402
from plumbing.entry import cli  # noqa: E402
from plumbing.rundir import is_out_file  # noqa: E402

# Chromium's flags on machines without network: without them it tries the network at every start (Playwright adds
# --headless itself).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
INSTALL = "apt-get install chromium (or CODEBOOK_CHROMIUM=/path/to/chromium) and pip install playwright"


def chromium_path():
    """The system Chromium (CODEBOOK_CHROMIUM, else chromium or chromium-browser on PATH), or None."""
    named = os.environ.get("CODEBOOK_CHROMIUM")
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing():
    """None when a browser can be driven here, else one line saying what to install."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"no Playwright for Python: {INSTALL}"
    return None if chromium_path() else f"no Chromium found: {INSTALL}"


class Browser:
    """A headless Chromium with a fresh profile; `open` loads a file with every other request refused and counted."""

    def __init__(self, context):
        self.context, self.requests = context, []

    def open(self, path):
        """The page of the local file `path`, loaded; its requests other than the file itself go to self.requests."""
        url = "file://" + os.path.abspath(path)
        page = self.context.new_page()
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.on("request", lambda r: r.url != url and self.requests.append(r.url))
        page.goto(url)
        return page


@contextlib.contextmanager
def headless_chromium(width=1400, height=900):
    """Yield a Browser on the system Chromium (Playwright for Python, never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=chromium_path(), headless=True,
                                                   args=FLAGS, viewport={"width": width, "height": height})
        browser = Browser(ctx)
        ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
                  else route.abort())
        try:
            yield browser
        finally:
            ctx.close()


def synthetic_page(path, num_codes, books, rows, T, seed=0):
    """Write a synthetic explorer page (see the module docstring). Returns its size in bytes."""
    import torch

    import report
    from analyze import code_stats

    g = torch.Generator().manual_seed(seed)
    words = [f" w{i}" for i in range(2000)]
    tokens = torch.randint(len(words), (rows, T), generator=g, dtype=torch.int32)
    alive = int(num_codes * 0.8)
    p = 1 / (torch.arange(alive, dtype=torch.float64) + 10)  # Zipf-like: a few codes take most choices
    col, stats, concepts = {"tokens": tokens, "codes": {}, "books": []}, {}, {}
    for b in range(books):
        site = f"h.{b}.mlp"
        codes = torch.multinomial(p, rows * T, replacement=True, generator=g).view(rows, T, 1, 1)
        col["codes"][site] = codes[torch.randperm(rows, generator=g)].to(torch.int16)
        col["books"].append((site, site, 0, SimpleNamespace(num_codes=num_codes, k=1)))
        stats[site] = code_stats(col["codes"][site], num_codes)
        pr = torch.rand(alive, 4, generator=g).tolist()
        concepts[site] = {c: [(f"topic t{c % 50}", x[0], x[1]), (f"mood m{c % 7}", x[2], x[3])]
                          for c, x in enumerate(pr)}
    return report.write_browser(path, col, lambda row: [words[t] for t in row], stats, concepts, n_ctx=5,
                                title=f"synthetic: {books} x {num_codes} codes", html_mb=64)


TIMER = """(ops) => {
  const $ = id => document.getElementById(id), out = {};
  const fire = (id, v, ev) => { const e = $(id); if (e.type === "checkbox") e.checked = v; else e.value = v;
                                e.dispatchEvent(new Event(ev)); };
  for (const [name, steps] of ops) {
    const xs = [];
    for (let i = 0; i < 7; i++) {
      fire("concept", "", "input"); fire("group", "", "change"); fire("alive", "", "change");
      fire("minc", "0", "input"); fire("sort", "count", "change"); fire("regex", "", "input"); explorer.search();
      const t0 = performance.now();
      for (const [id, v, ev] of steps)
        if (id === "search") explorer.search(); else if (id === "open") explorer.openCode(0, 0); else fire(id, v, ev);
      document.body.offsetHeight;  // the layout of what changed
      xs.push(performance.now() - t0);
    }
    xs.sort((a, b) => a - b);
    out[name] = [xs[3], explorer.results().length];
  }
  return out;
}"""
OPS = [
    ("sort by precision", [("sort", "p", "change")]),
    ("sort by recall", [("sort", "r", "change")]),
    ("sort by frequency, ascending", [("desc", False, "change")]),
    ("filter: dead codes", [("alive", "dead", "change")]),
    ("filter: count >= 100", [("minc", "100", "input")]),
    ("filter: concept 'topic t7', P >= 0.5", [("minp", "0.5", "input"), ("concept", "topic t7", "input")]),
    ("filter: concept kind 'mood', sorted by recall", [("group", "mood", "change"), ("sort", "r", "change")]),
    ("regex search ' w1[0-9](?![0-9])', P >= 0.5", [("regex", " w1[0-9](?![0-9])", "input"), ("search", None, None)]),
    ("read the most frequent code (contexts, examples, positions)", [("open", None, None)]),
]


def screenshot(page_path, png):
    """The README's picture: the page at 1280 x 800, the codes of the first concept kind (state, else topic, else
    any) at precision >= 0.9 (every code when none is) sorted by recall, the first one open."""
    with headless_chromium(1280, 800) as browser:
        page = browser.open(page_path)
        kinds = page.eval_on_selector_all("#group option", "os => os.map(o => o.value)")
        kind = next((k for k in ("state", "topic") if k in kinds), "")
        page.select_option("#group", kind)
        if page.query_selector("#list tr") is None:  # no code of that kind at precision >= 0.9: every code
            page.select_option("#group", "")
        page.select_option("#sort", "r")
        if page.query_selector("#list tr") is not None:
            page.click("#list tr:first-child")
        page.screenshot(path=png)
        assert not page.errors and not browser.requests, (page.errors, browser.requests)
    print(f"wrote {png} ({os.path.getsize(png) / 1024:.0f} KB)")


@dataclass
class ExplorerBenchConfig:
    """The synthetic page's size; or, with screenshot, the README's picture of a page analyze.py wrote."""

    num_codes: int = spec(10_000, ">= 1")  # codes per book
    books: int = spec(1, ">= 1")  # books (one codebook each)
    rows: int = spec(512, ">= 1")  # sequences whose token positions are in the page
    T: int = spec(128, ">= 1")  # tokens per sequence
    screenshot: str = ""  # instead of timing: a PNG of this page (analyze.py's browser.html), as in the README
    png: str = spec(os.path.join(ROOT, "assets", "explorer.png"), check=is_out_file)  # where the screenshot goes

    def __post_init__(self):
        validate(self)
        if self.screenshot and not os.path.isfile(self.screenshot):
            raise ConfigError(f"--screenshot={self.screenshot}: no such page; run analyze.py first")


def main(argv):
    cfg = parse_config(argv, ExplorerBenchConfig)
    if missing():
        raise ConfigError(missing())
    if cfg.screenshot:
        return screenshot(cfg.screenshot, cfg.png)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "page.html")
        t0 = time.perf_counter()
        size = synthetic_page(path, cfg.num_codes, cfg.books, cfg.rows, cfg.T)
        written = time.perf_counter() - t0
        with headless_chromium() as browser:
            loads = []
            for _ in range(3):
                page = browser.open(path)
                loads.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
                page.close()
            page = browser.open(path)
            res = page.evaluate(TIMER, [[n, [list(s) for s in steps]] for n, steps in OPS])
            assert not page.errors and not browser.requests, (page.errors, browser.requests)
    print(f"page: {cfg.books} book(s) x {cfg.num_codes:,} codes, {cfg.rows} x {cfg.T} tokens: {size / 2**20:.1f} MiB, "
          f"written in {written:.1f} s; loaded (parsed, decoded, first list drawn) in "
          f"{statistics.median(loads):.0f} ms (median of 3); 0 network requests")
    print("| operation | ms (median of 7) | codes listed |\n|---|---|---|")
    for name, (ms, n) in res.items():
        print(f"| {name} | {ms:.1f} | {n:,} |")


if __name__ == "__main__":
    cli(main)
