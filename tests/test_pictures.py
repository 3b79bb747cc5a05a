"""Pictures (issue 14, point 5): cell occupancy by position per stream (own and shared cells,
each sequence's range, holes) in the terminal, as HTML and as PNG; inspect --model shows the
tokens as text; estimate --sweep tables memory against context length and cache types and
draws a chart."""
from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

import pymem
from pymem import cli, picture
from pymem.state import Session
from test_state import filled, meta  # noqa: F401  (fixture)

try:  # PNG output is the optional `plot` extra; the installed-wheel CI run has no matplotlib
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="matplotlib (the pymem[plot] extra) is not installed")


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def holed(meta, tmp_path):  # noqa: F811
    """seq 0 at 0..15, seq 1 a fork + 16..19, seq 2 at 0..6 (own cells); then positions 4..7 of
    every sequence removed: a hole."""
    s = Session.from_memory(filled(meta["llama"]), list(range(16)))
    s = s.edit([("seq_rm", -1, 4, 8)])
    p = tmp_path / "holed.session"
    s.save(p)
    return p, s


def _expected(s):
    """Independently from the JSON cell list: per sequence {pos: shared?}."""
    cells = s.summary(cells=True)["memory"]["sections"][0]["streams"][0]["cell_list"]
    want = {}
    for pos, ids in ((c[0], c[1]) for c in cells):
        for q in ids:
            want.setdefault(q, {})[pos] = len(ids) > 1
    return want, cells


def test_occupancy_model(holed):
    _, s = holed
    want, cells = _expected(s)
    occ = picture.occupancy(s)
    assert len(occ) == 1 and occ[0].n_cells == len(cells)
    o = occ[0]
    for q, held in want.items():
        for p in range(o.pos_max + 1):
            exp = picture.NONE if p not in held else picture.SHARED if held[p] else picture.OWN
            assert o.state(q, p) == exp, (q, p)
    assert o.n_holes == 4 and o.hole_runs() == [(4, 4)] and o.hole_ranges() == "4..7"
    assert o.ranges(1) == "0..3, 8..19" and o.ranges(2) == "0..3"


def test_inspect_picture_html(holed, tmp_path, capsys):
    p, s = holed
    html = tmp_path / "o.html"
    rc, out, err = run(capsys, "inspect", p, "--html", html)
    assert rc == 0 and f"wrote {html}" in err
    pic = out[out.index("occupancy by position"):]
    assert "seq 1 |====....========####| 0..3, 8..19" in pic and "seq 0 |====....========....| 0..3, 8..15" in pic
    assert "seq 2 |####................| 0..3" in pic and "holes |    oooo            | 4 positions without a cell: 4..7" in pic
    # HTML: well formed, one row per sequence and the holes, a titled cell per position
    spans = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "span" and dict(attrs).get("title"):
                spans.append(dict(attrs)["title"])

    P().feed(html.read_text())
    assert "seq 1, pos 17: own cell" in spans and "seq 0, pos 0: shared cell" in spans
    assert "seq 2, pos 5: not held" in spans and sum(t.startswith("seq 0,") for t in spans) == 20


@needs_mpl
def test_inspect_picture_png(holed, tmp_path, capsys):
    p, _ = holed
    png = tmp_path / "o.png"
    rc, _, err = run(capsys, "inspect", p, "--png", png)
    assert rc == 0 and f"wrote {png}" in err
    # a real image of a sensible size
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))
    assert img.shape[0] > 200 and img.shape[1] > 600
    rc, out, _ = run(capsys, "inspect", p, "--json")
    occ = json.loads(out)["occupancy"][0]
    assert occ["holes"] == 4 and occ["hole_ranges"] == "4..7" and occ["sequences"]["1"] == "0..3, 8..19"
    # a narrow terminal picture groups positions
    rc, out, _ = run(capsys, "inspect", p, "--width", "10")
    assert "1 column ~ 2.0 positions" in out


def test_far_positions_cost_nothing(meta, tmp_path, capsys):  # noqa: F811
    """A (corrupt or real) position near 2**31 must not make the picture allocate per position."""
    import time

    mem = pymem.from_gguf(meta["llama"], 256, n_seq_max=2)
    mem.decode(pymem.Batch(tokens=[1, 2], pos=[0, 2 ** 31 - 100], seq_ids=[[0], [1]]))
    f = tmp_path / "far.session"
    Session.from_memory(mem, []).save(f)
    t0 = time.perf_counter()
    for fmt in ([], ["--json"]):
        rc, out, _ = run(capsys, "inspect", f, *fmt, "--html", tmp_path / "far.html")
        assert rc == 0
    assert time.perf_counter() - t0 < 10
    assert json.loads(out)["occupancy"][0]["holes"] == 2 ** 31 - 100 - 1


def test_png_without_matplotlib_says_how(holed, tmp_path, capsys, monkeypatch):
    import sys

    p, _ = holed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, _, err = run(capsys, "inspect", p, "--png", tmp_path / "x.png")
    assert rc == 1 and "pymem[plot]" in err and not (tmp_path / "x.png").exists()


def test_tokens_as_text(meta, tmp_path, capsys):  # noqa: F811
    f = tmp_path / "t.session"
    Session.from_memory(filled(meta["llama"]), [5, 6, 7]).save(f)
    rc, out, _ = run(capsys, "inspect", f, "--model", meta["llama"])
    assert rc == 0 and "tokens as text: 'tok_5tok_6tok_7'" in out
    rc, out, _ = run(capsys, "inspect", f)
    assert "tokens as text" not in out
    rc, out, _ = run(capsys, "inspect", f, "--model", meta["llama"], "--json")
    assert json.loads(out)["tokens_text"] == "'tok_5tok_6tok_7'"


def test_sweep(meta, tmp_path, capsys):  # noqa: F811
    hp = pymem.gguf.read_hparams(meta["llama"])
    rc, out, _ = run(capsys, "estimate", meta["llama"], "--sweep", "--json")
    d = json.loads(out)
    assert d["n_ctx"][-1] == hp.n_ctx_train and d["types"] == ["f16", "q8_0", "q4_0"] and d["grows_with_context"]
    for t in d["types"]:
        assert d["bytes"][t] == [pymem.estimate(meta["llama"], n, type_k=t, type_v=t, flash_attn="auto").total
                                 for n in d["n_ctx"]]
    assert d["bytes"]["q4_0"][-1] < d["bytes"]["q8_0"][-1] < d["bytes"]["f16"][-1]
    rc, out, _ = run(capsys, "estimate", meta["llama"], "--sweep", "--sweep-ctx", "512,1024", "--flash-attn", "off",
                     "--sweep-types", "f16,q8_0")
    assert rc == 0 and "llama.cpp refuses" in out and "      512" in out
    png = tmp_path / "s.png"
    rc, out, err = run(capsys, "estimate", meta["llama"], "--sweep", "--plot", png)
    if HAVE_MPL:
        assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"
    else:
        assert rc == 1 and "pymem[plot]" in err and not png.exists()
        png.write_bytes(b"\x89PNG not really")  # the --html check below needs an existing file
    rc, out, _ = run(capsys, "estimate", meta["mamba"], "--sweep")
    assert "does not grow with n_ctx" in out
    with pytest.raises(SystemExit):
        cli.main(["estimate", meta["llama"], "--sweep", "--sweep-types", "q9_9"])
    assert "unknown cache type" in capsys.readouterr().err
    rc, _, err = run(capsys, "estimate", meta["llama"], "--plot", png)
    assert rc == 2 and "--plot needs --sweep" in err
    rc, _, err = run(capsys, "estimate", meta["llama"], "--sweep", "--sweep-ctx", "1024,99999999999")
    assert rc == 1 and "--sweep-ctx 99999999999: " in err, err
    with pytest.raises(SystemExit):
        cli.main(["inspect", str(png), "--html", str(tmp_path / "nofolder" / "x.html")])
    assert "does not exist" in capsys.readouterr().err
