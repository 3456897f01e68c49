"""The code explorer (report.write_browser, analyze.py's browser.html): its data against codes.pt and analyze.py's
numbers in Python, its options' bad values, and the page itself in headless Chromium (the distribution's package,
driven by Playwright; skipped with one line when either is missing): no network request, search by code, concept
and regex giving Python's codes, sorting, filtering, a code's contexts against codes.pt."""

import importlib.util
import json
import os
import re
import shutil

import pytest
import torch
from conftest import write_lm_dataset
from test_analyze import save_ckpt, tiny

import analyze
import report
from fsm import TokFSM
from plumbing.configuration import ConfigError
from plumbing.entry import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("explorer_bench", os.path.join(ROOT, "scripts", "explorer_bench.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
STORY = "Once upon a time there was a dragon. The dragon saw a king in a castle. A baby had a flower. " * 16


def page_data(path):
    """The JSON data inlined in an explorer page."""
    text = open(path, encoding="utf-8").read()
    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S).group(1))


def decode(o):
    import base64

    import numpy as np

    return torch.from_numpy(np.frombuffer(base64.b64decode(o["b64"]), dtype=o["dtype"]).copy())


@pytest.fixture(scope="module")
def fsm_run(tmp_path_factory):
    """A tiny TokFSM run analysed (k=2, heads and MLPs, 2 layers): (run dir, analysis dir)."""
    d = tmp_path_factory.mktemp("fsm")
    torch.manual_seed(0)
    save_ckpt(tiny(k=2), d / "run", num_states=20, num_edges=3)
    analyze.main([f"--out_dir={d / 'run'}", f"--save_dir={d / 'an'}", "--num_seqs=64", "--device=cpu"])
    return d / "run", d / "an"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny language-model run analysed with --regex=" dragon" (k=2 head codes): (run dir, analysis dir)."""
    d = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    data = write_lm_dataset(d / "data", STORY)
    save_ckpt(tiny(k=2, sites="attn_heads,mlp", vocab=384, layers=1), d / "run", dataset=str(data))
    analyze.main([f"--out_dir={d / 'run'}", f"--save_dir={d / 'an'}", "--regex= dragon", "--device=cpu"])
    return d / "run", d / "an"


def python_side(run, an):
    """(model, col with books, row strings function) of an analysed run, read back as analyze.py reads them."""
    from model import load_run
    from plumbing.tokens import load_tokenizer, vocab_strings

    ckpt, model = load_run(str(run), "cpu")
    col = torch.load(an / "codes.pt", weights_only=True)
    col["books"] = model.books()
    tc = ckpt["train_config"]
    if tc.get("dataset", "fsm") == "fsm":
        return model, col, report.fsm_strs(TokFSM(tc["num_states"], tc["num_edges"], tc["fsm_seed"]))
    tok = vocab_strings(load_tokenizer(tc["dataset"])[0])
    return model, col, lambda row: [tok(t) for t in row]


# ---------------------------------------------------------------------------------------------- the data, in Python
def test_page_data_is_codes_pt_and_the_stats(fsm_run):
    run, an = fsm_run
    _, col, strs = python_side(run, an)
    data, stats = page_data(an / "browser.html"), json.loads((an / "stats.json").read_text())["books"]
    assert data["rows"] == data["n"] == 64 and data["T"] == 16
    text = decode(data["text"]).view(64, 16)
    for r in (0, 17, 63):
        assert [data["strs"][i] for i in text[r].tolist()] == strs(col["tokens"][r].tolist())
    for entry, (book, site, g, cb) in zip(data["books"], col["books"]):
        assert entry["name"] == book and entry["M"] == cb.num_codes and entry["k"] == 2
        assert torch.equal(decode(entry["codes"]).view(64, 16, 2), col["codes"][site][:, :, g])
        counts = decode(entry["counts"])
        assert torch.equal(counts, analyze.code_stats(col["codes"][site][:, :, g], cb.num_codes)["counts"].int())
        assert entry["dead_pct"] == pytest.approx(stats[book]["dead_pct"])
    text = open(an / "browser.html", encoding="utf-8").read()
    assert not re.search(r"\s(src|href)=|https?:|url\(|@import|fetch\(|XMLHttpRequest", text)  # nothing to load


def test_token_concepts_are_precision_recall_over_the_strings():
    """Each code's best string by F1 equals analyze.precision_recall with the strings as labels (exact)."""
    g = torch.Generator().manual_seed(0)
    text, codes = torch.randint(5, (300,), generator=g), torch.randint(-1, 7, (300, 2), generator=g)
    codes[:, 1] = torch.where(codes[:, 1] == codes[:, 0], -1, codes[:, 1])  # a code fires once per position
    strs = ["a", " b", "c", "d\n", "e"]
    found = report.token_concepts(text, codes, 7, strs)
    counts, P, R = analyze.precision_recall(codes, text, 5, 7)
    for c in range(7):
        if counts[:, c].sum() == 0:
            assert c not in found
            continue
        f = analyze.f1(P[:, c], R[:, c])
        (name, p, r), = found[c]
        s = strs.index(json.loads(name[len("token "):]))
        assert f[s] == f.max() and p == pytest.approx(P[s, c].item()) and r == pytest.approx(R[s, c].item())


@pytest.mark.parametrize("sites,groups", [("attn_heads", 1), ("mlp", 1), ("attn", 2)])
def test_logit_effect_is_the_code_written_into_the_residual_then_unembedded(sites, groups):
    """For each site, the code's vector placed where the forward puts it (a head's slice before attn.c_proj, a
    group's slice of n_embd), then LayerNorm's centring and gain and lm_head: the top and bottom tokens agree."""
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=50, codebook_sites=sites,
                          num_codes=16, codebook_groups=groups)).eval()
    torch.nn.init.normal_(model.transformer.ln_f.weight)
    for book, site, g, cb in model.books():
        ids = torch.tensor([0, 5, 11])
        ti, tv, bi, bv = report.logit_effects(model, site, g, cb, ids, n=4, chunk=2)
        d = cb.codes.shape[-1]
        y = torch.zeros(3, 32)
        y[:, g * d:(g + 1) * d] = cb.codes[g, ids].detach()
        if site.endswith("attn_heads"):
            y = y @ model.transformer.h[int(site.split(".")[1])].attn.c_proj.weight.detach().T
        y = (y - y.mean(-1, keepdim=True)) * model.transformer.ln_f.weight.detach()
        want = model.lm_head(y).detach()  # (3, V)
        assert torch.equal(ti, want.topk(4).indices) and torch.allclose(tv, want.topk(4).values, atol=1e-5)
        assert torch.equal(bi, want.topk(4, largest=False).indices)


def test_page_size_cap_embeds_fewer_rows(tmp_path, fsm_run):
    """--html_mb: the page stays under the cap by embedding fewer sequences' positions; counts stay those of all."""
    run, an = fsm_run
    model, col, strs = python_side(run, an)
    stats = {b: analyze.code_stats(col["codes"][n][:, :, g], cb.num_codes) for b, n, g, cb in col["books"]}
    size = report.write_browser(str(tmp_path / "p.html"), col, strs, stats, model=model, html_mb=0.2)
    data = page_data(tmp_path / "p.html")
    assert size == os.path.getsize(tmp_path / "p.html") <= 0.2 * 2**20 and 1 <= data["rows"] < 64
    assert decode(data["books"][0]["counts"]).sum() == 64 * 16 * 2
    one = report.write_browser(str(tmp_path / "q.html"), col, strs, stats, html_mb=8, books="h.1.mlp,h.0.attn_heads")
    assert [b["name"] for b in page_data(tmp_path / "q.html")["books"]] == ["h.0.attn_heads:0", "h.0.attn_heads:1",
                                                                            "h.1.mlp"] and one < size * 2


@pytest.mark.parametrize("flag,needles", [("--html_books=h.9.mlp", ["--html_books", "'h.9.mlp'", "h.0.mlp"]),
                                          ("--html_books=h.0.attn_heads:7", ["'h.0.attn_heads:7'", "SITE:HEAD"]),
                                          ("--html_mb=0", ["html_mb=0", "> 0"]),
                                          ("--html_mb=big", ["html_mb=big", "float"]),
                                          ("--html_codes=-1", ["html_codes=-1", ">= 0"])])
def test_bad_explorer_options_stop_with_one_line_and_keep_the_analysis(flag, needles, fsm_run, tmp_path, capsys):
    run, an = fsm_run
    keep = tmp_path / "an"
    shutil.copytree(an, keep)
    before = {p.name: p.read_bytes() for p in keep.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(analyze.main, [f"--out_dir={run}", f"--save_dir={keep}", "--num_seqs=64", "--device=cpu", flag])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg and capsys.readouterr().err == ""
    assert all(n in msg for n in needles), msg
    assert {p.name: p.read_bytes() for p in keep.iterdir()} == before


def test_explorer_books_selects_books_and_codebooks():
    books = tiny().books()  # h.0.attn_heads:0, :1, h.0.mlp, h.1...
    assert report.explorer_books("", books) == books
    assert [b[0] for b in report.explorer_books("h.1.attn_heads:1, h.0.mlp", books)] == ["h.0.mlp", "h.1.attn_heads:1"]
    with pytest.raises(ConfigError, match="no book or codebook 'mlp'"):
        report.explorer_books("mlp", books)


# ---------------------------------------------------------------------------------------------- in the browser
@pytest.fixture(scope="module")
def browser():
    why = bench.missing()
    if why:
        pytest.skip(f"browser tests: {why}")
    with bench.headless_chromium() as b:
        yield b
        assert b.requests == [], f"the page asked the network for {b.requests}"


def fill(page, sel, value, event="input"):
    page.eval_on_selector(sel, "(e, [v, ev]) => { if (e.type === 'checkbox') e.checked = v; else e.value = v; "
                               "e.dispatchEvent(new Event(ev)); }", [value, event])


def listed(page):
    return [tuple(x) for x in page.evaluate("explorer.results()")]


@pytest.mark.slow
def test_browser_finds_a_code_and_its_contexts_are_codes_pt(browser, fsm_run):
    run, an = fsm_run
    _, col, strs = python_side(run, an)
    page = browser.open(an / "browser.html")
    assert page.errors == [] and browser.requests == []
    book, site, g = "h.1.attn_heads:0", "h.1.attn_heads", 0
    code = int(analyze.code_stats(col["codes"][site][:, :, g], 16)["counts"].argmax())  # its most frequent code
    page.fill("#find", f"{book}:{code}")
    page.press("#find", "Enter")
    assert [r[:2] for r in listed(page)] == [(book, code)]
    assert page.text_content("#d-name") == f"{book}:{code}"
    ctxs = page.query_selector_all("#d-contexts .ctx")
    assert len(ctxs) == 5
    for el in ctxs:
        r, t = int(el.get_attribute("data-row")), int(el.get_attribute("data-pos"))
        assert code in col["codes"][site][r, t, g].tolist()  # it fires there
        want = strs(col["tokens"][r].tolist())[t]
        assert el.query_selector("mark").text_content() == want.lstrip()
        assert el.text_content().endswith("".join(strs(col["tokens"][r].tolist())[t:t + 4]).replace("\n", "\u21b5"))
    cmds = [e.text_content() for e in page.query_selector_all("#detail pre.cmd")]
    assert cmds == [f"python steer.py --out_dir={run} --task=generate --force={book}:{code}",
                    f"python steer.py --out_dir={run} --task=ablate --ablate={book}:{code} --ablate_to=zero"]
    hist = [float(d.get_attribute("title").split(": ")[1]) for d in page.query_selector_all("#d-positions div")]
    want = torch.bincount(((col["codes"][site][:, :, g] == code).any(-1)).nonzero()[:, 1], minlength=16)
    assert hist == want.tolist()
    assert page.query_selector("#d-logits tr") is not None  # a used code of a head: its logit effect
    fill(page, "#find", "h.0.attn_heads")  # a codebook: both heads of layer 0
    assert {r[0] for r in listed(page)} == {"h.0.attn_heads:0", "h.0.attn_heads:1"} and len(listed(page)) == 32


@pytest.mark.slow
def test_browser_concept_search_gives_pythons_codes(browser, fsm_run):
    run, an = fsm_run
    model, col, _ = python_side(run, an)
    _, _, concepts = analyze.fsm_analysis(col, TokFSM(20, 3))
    page = browser.open(an / "browser.html")
    found = [(n, p) for per in concepts.values() for f in per.values() for n, p, _ in f]
    state = max({n for n, _ in found if "+" not in n}, key=lambda n: sum(m == n for m, _ in found))
    digit = max({n for n, _ in found if "+" in n}, key=lambda n: sum(m == n for m, _ in found))
    ps = sorted({round(p, 4) for n, p in found if n == state})  # the page holds 4 decimals
    mid = (ps[len(ps) // 2 - 1] + ps[len(ps) // 2]) / 2 if len(ps) > 1 else 0.0  # between two codes' precisions
    for name, minp in ((state, 0.0), (state, mid), (digit, 0.0)):
        fill(page, "#minp", str(minp))
        fill(page, "#concept", name)
        want = {(b, c) for b, per in concepts.items() for c, found in per.items()
                for n, p, r in found if n == name and round(p, 4) >= minp}
        got = listed(page)
        assert {r[:2] for r in got} == want and want, name
        for b, c, p, r, _ in got:
            (pp, rr), = [(x[1], x[2]) for x in concepts[b][c] if x[0] == name]
            assert p == pytest.approx(pp, abs=1e-4) and r == pytest.approx(rr, abs=1e-4)
    fill(page, "#concept", "")
    fill(page, "#minp", "0.2")
    fill(page, "#group", "token", "change")  # every code with a "token ..." concept at P >= 0.2
    tokens = {(b, c) for b, per in page_data(an / "browser.html")["concepts"].items() for c, found in per.items()
              if any(n.startswith("token ") and p >= 0.2 for n, p, _ in found)}
    assert {(b, int(c)) for b, c in tokens} == {r[:2] for r in listed(page)} and tokens


@pytest.mark.slow
def test_browser_regex_search_is_analyze_regex(browser, lm_run):
    """The page's regex search gives, for every code, the precision, recall and count that analyze.py computes for
    the same regex (every sequence is in the page), and its best codes are concepts.json's."""
    run, an = lm_run
    model, col, strs = python_side(run, an)
    tok = lambda t: strs([t])[0]  # noqa: E731
    page = browser.open(an / "browser.html")
    assert page_data(an / "browser.html")["rows"] == col["tokens"].shape[0]
    for regex, median in ((" dragon", False), ("c[a-z]+e|king", False), ("c[a-z]+e|king", True), ("a\\b", True)):
        target = analyze.regex_mask(col["tokens"], tok, regex)
        every = {}
        for book, site, g, cb in col["books"]:
            counts, P, R = analyze.precision_recall(col["codes"][site][:, :, g].reshape(-1, cb.k),
                                                    target.reshape(-1).long(), 2, cb.num_codes)
            for c in (counts.sum(0) > 0).nonzero().flatten().tolist():
                every[(book, c)] = (P[1, c].item(), R[1, c].item(), int(counts[:, c].sum()))
        ps = sorted({p for p, _, _ in every.values()})
        minp = (ps[len(ps) // 2 - 1] + ps[len(ps) // 2]) / 2 if median else 0.0  # between two codes' precisions
        want = {key: v for key, v in every.items() if v[0] >= minp}
        fill(page, "#minp", str(minp))
        fill(page, "#regex", regex)
        page.click("#regex-go")
        got = {(b, c): (p, r, n) for b, c, p, r, n in listed(page)}
        assert got.keys() == want.keys() and want, regex
        for key, (p, r, n) in got.items():
            assert p == pytest.approx(want[key][0], abs=1e-6) and r == pytest.approx(want[key][1], abs=1e-6)
            assert n == want[key][2]
    fill(page, "#minp", "0")
    fill(page, "#regex", " dragon")
    page.click("#regex-go")
    fill(page, "#sort", "f1", "change")
    best = listed(page)[:5]
    found = json.loads((an / "concepts.json").read_text())["tokens"]
    f1 = lambda p, r: 2 * p * r / (p + r)  # noqa: E731
    assert [f1(p, r) for _, _, p, r, _ in best] == pytest.approx([f1(p, r) for _, _, p, r, _ in found], abs=1e-6)
    for b, c, p, r, n in found:
        assert {(x[0], x[1]): x[2:] for x in listed(page)}[(b, c)] == pytest.approx([p, r, n], abs=1e-6)
    names = {n for per in page_data(an / "browser.html")["concepts"].values() for f in per.values() for n, _, _ in f}
    assert 'regex " dragon"' in names  # analyze's regex concept, named by its kind


@pytest.mark.slow
def test_browser_sorts_and_filters(browser, fsm_run):
    run, an = fsm_run
    _, col, _ = python_side(run, an)
    page = browser.open(an / "browser.html")
    counts = {b: analyze.code_stats(col["codes"][s][:, :, g], cb.num_codes)["counts"] for b, s, g, cb in col["books"]}
    every = sorted((-int(n), b, c) for b, cs in counts.items() for c, n in enumerate(cs.tolist()))
    assert [r[4] for r in listed(page)] == [-n for n, _, _ in every]  # by frequency, descending
    fill(page, "#desc", False, "change")
    assert [r[4] for r in listed(page)] == sorted(-n for n, _, _ in every)
    fill(page, "#sort", "p", "change")
    ps = [r[2] for r in listed(page)]
    assert ps == sorted(ps) and len(ps) == len(every)
    fill(page, "#desc", True, "change")
    fill(page, "#sort", "r", "change")
    rs = [r[3] for r in listed(page)]
    assert rs == sorted(rs, reverse=True)
    fill(page, "#alive", "dead", "change")
    assert {r[:2] for r in listed(page)} == {(b, c) for n, b, c in every if n == 0}
    fill(page, "#alive", "alive", "change")
    fill(page, "#layer", "1", "change")
    assert {r[:2] for r in listed(page)} == {(b, c) for n, b, c in every if n < 0 and b.startswith("h.1.")}
    fill(page, "#layer", "", "change")
    fill(page, "#book", "s:h.0.mlp", "change")
    fill(page, "#minc", "10")
    assert {r[:2] for r in listed(page)} == {(b, c) for n, b, c in every if n <= -10 and b == "h.0.mlp"}
    rows = page.query_selector_all("#list tr")
    assert len(rows) == min(100, len(listed(page)))
    rows[0].click()
    assert page.text_content("#d-name") == "{}:{}".format(*listed(page)[0][:2])
    page.click("#tab-usage")
    usage = {tr.get_attribute("data-book"): tr.query_selector_all("td")[4].text_content()
             for tr in page.query_selector_all("#usage tr")}
    assert usage == {b: f"{100 * (cs == 0).float().mean().item():.1f}" for b, cs in counts.items()}
    page.click("#usage-head th[data-col='4']")  # sorted by dead %, most first
    dead = [float(tr.query_selector_all("td")[4].text_content()) for tr in page.query_selector_all("#usage tr")]
    assert dead == sorted(dead, reverse=True)
    page.click("#tab-heatmap")  # the concept map: clicking a cell opens its code
    box = page.query_selector("#hm").bounding_box()
    book, left, cw, rh, row, code = page.evaluate("(h => [explorer.BOOKS[h.bi].name, h.left, h.cw, h.rh, "
                                                  "h.cols[0].row, h.cols[0].c])(explorer.heat())")
    page.mouse.click(box["x"] + left + cw / 2, box["y"] + row * rh + rh / 2)
    assert page.is_visible("#sec-codes") and page.text_content("#d-name") == f"{book}:{code}"
    assert page.errors == [] and browser.requests == []


@pytest.mark.slow
def test_browser_concepts_of_any_kind(browser, fsm_run, tmp_path):
    """Concepts that another analysis names "kind name" (a story language's "topic dragon", "mood happy") are
    searched, grouped by their kind and mapped without any change to the page."""
    run, an = fsm_run
    model, col, strs = python_side(run, an)
    stats = {b: analyze.code_stats(col["codes"][n][:, :, g], cb.num_codes) for b, n, g, cb in col["books"]}
    concepts = {"h.0.mlp": {1: [("topic dragon", 0.95, 0.5), ("mood happy", 0.3, 0.2)], 2: [("topic castle", 0.91, 0.8)],
                            3: [("mood happy", 0.97, 0.4)]}, "h.1.mlp": {4: [("topic dragon", 0.5, 0.9)]}}
    report.write_browser(str(tmp_path / "s.html"), col, strs, stats, concepts, model=model)
    page = browser.open(tmp_path / "s.html")
    assert {"topic", "mood", "token"} <= set(page.eval_on_selector_all("#group option", "os => os.map(o => o.value)"))
    fill(page, "#group", "topic", "change")  # precision >= 0.9, the default
    assert {r[:4] for r in listed(page)} == {("h.0.mlp", 1, 0.95, 0.5), ("h.0.mlp", 2, 0.91, 0.8)}
    fill(page, "#group", "mood", "change")
    assert [r[:2] for r in listed(page)] == [("h.0.mlp", 3)]
    fill(page, "#group", "", "change")
    fill(page, "#minp", "0.4")
    fill(page, "#concept", "dragon")  # a part of a name: every name that holds it
    assert {r[:2] for r in listed(page)} == {("h.0.mlp", 1), ("h.1.mlp", 4)}
    page.click("#tab-heatmap")
    page.select_option("#hm-book", label="h.0.mlp")
    assert {"topic", "mood"} <= set(page.eval_on_selector_all("#hm-family option", "os => os.map(o => o.value)"))
    page.select_option("#hm-family", "topic")
    assert page.evaluate("explorer.heat().names.length") == 2 and page.evaluate("explorer.heat().cols.length") == 2
    assert page.errors == [] and browser.requests == []
