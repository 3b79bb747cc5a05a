#!/usr/bin/env python3
"""Mutation check of the C core: plant one-line bugs, rebuild, run the fast suite, and report
which tests catch each one -- with the tests of this tree ("after") and with those of an
older commit ("before", default: the merge base with main), on the same mutated C core.

Each mutation is a list of (snippet, replacement) pairs.  A snippet is searched in every
file under csrc/ and must occur exactly once in the whole directory, so mutations do not
depend on how the C sources are split into files.  Nothing is edited in place: the trees
are copied to a scratch folder (``--work``), each gets its own scratch virtualenv (its
site-packages first, then the running interpreter's for the dependencies), and the mutated
copy is rebuilt there (pip install of the copy for the extension, an incremental cmake build
for the C tests).

The fast suite: the C tests (ctest), then pytest on FAST_TESTS (plus the tree's
tests/test_pinned_*.py), with short random traces under a fixed hypothesis seed and without
hypothesis' shrink phase (a mutant's failing trace would otherwise be minimised for minutes).

    python tools/mutants.py --list
    python tools/mutants.py [--only NAME ...] [--before REV] [--work DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutation:
    name: str
    what: str
    edits: Sequence[Tuple[str, str]]


MUTATIONS: List[Mutation] = [
    Mutation("mrope-xy-write", "state write: cell ext x and y swapped", [
        ("pmi_wr_u32(p + 8, (uint32_t)c->ext[i].x);", "pmi_wr_u32(p + 8, (uint32_t)c->ext[i].y);"),
        ("pmi_wr_u32(p + 12, (uint32_t)c->ext[i].y);", "pmi_wr_u32(p + 12, (uint32_t)c->ext[i].x);")]),
    Mutation("mrope-xy-apply", "apply_ubatch: ext x taken from the y section and y from x", [
        ("e.x = ub->pos[t + 2 * ub->n_tokens];", "e.x = ub->pos[t + ub->n_tokens];"),
        ("e.y = ub->pos[t + ub->n_tokens];", "e.y = ub->pos[t + 2 * ub->n_tokens];")]),
    Mutation("mask-2d-rule", "KQ mask, M-RoPE same position: compares (x, y) instead of (y, x)", [
        ("if (e->y > p1y || (e->y == p1y && e->x > p1x)) {",
         "if (e->x > p1x || (e->x == p1x && e->y > p1y)) {")]),
    Mutation("mask-swa-window", "KQ mask: sliding window one wider (all kernels)", [
        ("c->nswa = pmk_wrap_i32(r->n_swa);", "c->nswa = pmk_wrap_i32(r->n_swa + 1);")]),
    Mutation("rec-seq_cp-empty-src", "recurrent seq_cp: an empty source leaves the destination", [
        ("if (tb->tail >= 0) {", "if (tb->tail >= 0 && ta->tail >= 0) {")]),
    Mutation("hybrid-iswa-can_shift", "hybrid-iSWA can_shift: plain KV rule (first cache only)", [
        ("pmi_ops_hybrid_iswa = {hybrid_rm, hybrid_min, hybrid_max, iswa_shift, hybrid_init};",
         "pmi_ops_hybrid_iswa = {hybrid_rm, hybrid_min, hybrid_max, kv0_shift, hybrid_init};")]),
    Mutation("split-seq-gap", "sequential equal split: any increasing primary ids (gap allowed)", [
        ("add = add && (n_seqs == 0 || prim == last + 1);", "add = add && (n_seqs == 0 || prim > last);")]),
    Mutation("split-equal-n_ubatch", "equal split: stops at n_ubatch sets instead of n_ubatch + 1", [
        ("if (n_seqs > n_ubatch) {", "if (n_seqs >= n_ubatch) {")]),
    Mutation("rollback-bound", "recurrent rollback: at most n_rs_seq - 1 tokens", [
        ("rollback >= 1 && rollback <= (int64_t)r->n_rs_seq", "rollback >= 1 && rollback < (int64_t)r->n_rs_seq")]),
    Mutation("kv-seq_rm-p1", "KV seq_rm of one sequence: p1 inclusive", [
        ("    detach(c, s, p0, p1, &lo, &mid, &hi);\n    uint32_t n = pmi_tr_collect(c, mid, c->tmp, 0);",
         "    detach(c, s, p0, p1 == INT32_MAX ? p1 : p1 + 1, &lo, &mid, &hi);\n"
         "    uint32_t n = pmi_tr_collect(c, mid, c->tmp, 0);")]),
    Mutation("rec-seq_rm-p1", "recurrent seq_rm: p1 inclusive", [
        ("if (c->pos >= p0 && c->pos < p1 && rc_has(c, s)) {", "if (c->pos >= p0 && c->pos <= p1 && rc_has(c, s)) {")]),
    Mutation("swa-reuse-bound", "find_slot SWA reuse: tested against pos_max instead of pos_max + 1", [
        ("pmi_wrap_i32((int64_t)pmi_cells_seq_pos_max(c, owner) + 1));",
         "pmi_wrap_i32((int64_t)pmi_cells_seq_pos_max(c, owner)));")]),
    Mutation("seq-blob-swa-select", "per-sequence state of an SWA cache: selection against pos_max + 1", [
        ("pmi_is_masked_swa(kv->n_swa, kv->swa_type, c->pos[out[k]], pmax)",
         "pmi_is_masked_swa(kv->n_swa, kv->swa_type, c->pos[out[k]], pmax + 1)")]),
    Mutation("rec-head-reset", "recurrent find_slot: head reset at used + 2*n_seqs (>= instead of >)", [
        ("if (r->head > r->used + 2 * n_seqs) {", "if (r->head >= r->used + 2 * n_seqs) {")]),
    Mutation("kv-head-reset", "KV find_slot: head reset at used + 2*n_tokens (>= instead of >)", [
        ("if (head > c->used + 2 * n_tokens) {", "if (head >= c->used + 2 * n_tokens) {")]),
    Mutation("seq_add-sign", "KV seq_add: wrong sign of the shift", [
        ("pmi_cells_seq_shift_range(&kv->cells[strm], s, p0, p1, d, 0);",
         "pmi_cells_seq_shift_range(&kv->cells[strm], s, p0, p1, -d, 0);")]),
    Mutation("ext-tok-write", "state write: ext.tok written in the x field's place (field swap)", [
        ("pmi_wr_u32(p + 16, (uint32_t)c->ext[i].tok);", "pmi_wr_u32(p + 16, (uint32_t)c->ext[i].x);")]),
]

#: the old tests of the fast suite (each a few seconds; the random traces run short)
FAST_TESTS = ["tests/test_kv_unit.py", "tests/test_kv_oracle.py", "tests/test_state.py",
              "tests/test_state_oracle.py", "tests/test_vectors.py", "tests/test_types_oracle.py",
              "tests/test_bridge.py", "tests/test_traces.py"]
FAST_ENV = {"PYMEM_TRACES": "30", "PYMEM_TRACES_TYPE": "8"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: Sequence[str], cwd: Optional[str] = None, env: Optional[dict] = None,
        check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


# ---- trees ------------------------------------------------------------------------------------
def copy_tree(dst: str, rev: Optional[str]) -> None:
    """The working tree (tracked + untracked, not ignored files) or a commit, into dst."""
    if os.path.exists(dst):
        return
    os.makedirs(dst)
    if rev is None:
        files = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout.split("\0")
        for f in filter(None, files):
            src = os.path.join(ROOT, f)
            if os.path.isfile(src):
                os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
                shutil.copy2(src, os.path.join(dst, f))
    else:
        arch = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", dst], input=arch, check=True)


def csrc_files(tree: str) -> List[str]:
    return sorted(p for p in glob.glob(os.path.join(tree, "csrc", "**", "*"), recursive=True)
                  if os.path.isfile(p) and p.endswith((".c", ".h")))


def locate(tree: str, snippet: str) -> str:
    hits = []
    for p in csrc_files(tree):
        n = open(p, encoding="utf-8").read().count(snippet)
        hits += [p] * n
    if len(hits) != 1:
        raise RuntimeError(f"snippet found {len(hits)} times under csrc/ (must be once): {snippet!r}")
    return hits[0]


def apply(tree: str, m: Mutation) -> Dict[str, str]:
    """Apply m to tree; returns {path: original text} for restore()."""
    originals: Dict[str, str] = {}
    for snippet, repl in m.edits:
        p = locate(tree, snippet)
        text = originals.get(p) or open(p, encoding="utf-8").read()
        originals.setdefault(p, text)
        cur = open(p, encoding="utf-8").read()
        open(p, "w", encoding="utf-8").write(cur.replace(snippet, repl, 1))
    return originals


def restore(originals: Dict[str, str]) -> None:
    for p, text in originals.items():
        open(p, "w", encoding="utf-8").write(text)


# ---- builds -------------------------------------------------------------------------------------
def make_venv(path: str) -> str:
    py = os.path.join(path, "bin", "python")
    if not os.path.exists(py):
        run([sys.executable, "-m", "venv", "--without-pip", path])
        site = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
        with open(os.path.join(site, "zz_base_site.pth"), "w") as f:  # dependencies after our own
            f.write(sysconfig.get_paths()["purelib"] + "\n")
    return py


def install(tree: str, py: str) -> None:
    """The tree's package into the scratch venv (incremental: the build dir lives in the tree)."""
    site = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--force-reinstall", "--target", site, "--upgrade", tree], timeout=1800)


def ctest(tree: str, build: str) -> List[str]:
    """Build the C tests (incrementally) and run them; the names of the failing ones."""
    if not os.path.exists(os.path.join(build, "CMakeCache.txt")):
        run(["cmake", "-S", tree, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DPYMEM_BUILD_TESTS=ON"])
    b = run(["cmake", "--build", build, "-j2"], check=False)
    if b.returncode != 0:
        return ["C build failed"]
    env = dict(os.environ, PYMEM_VECTORS_DIR=os.path.join(tree, "tests", "vectors"))
    r = run(["ctest", "--test-dir", build], env=env, check=False)
    if r.returncode == 0:
        return []
    tail = r.stdout.split("The following tests FAILED:")[-1]
    return sorted(f"ctest:{name}" for name in re.findall(r"^\s*\d+ - (\S+) \(", tail, re.M)) or ["ctest:?"]


#: a pytest plugin: after the tests' own hypothesis profile is loaded (conftest), the same
#: profile without the shrink phase (a failing trace is reported as found, not minimised)
_PLUGIN = """
def pytest_sessionstart(session):
    try:
        from hypothesis import Phase, settings
    except ImportError:
        return
    settings.register_profile("mutants", parent=settings(),
                              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.load_profile("mutants")
"""


def pytest_run(tree: str, py: str, tests: Sequence[str], cache: str) -> Tuple[List[str], int, float]:
    """Failing test ids, number of tests run, seconds."""
    shutil.rmtree(os.path.join(tree, ".hypothesis"), ignore_errors=True)  # no replay of old failures
    xml = os.path.join(tree, "junit.xml")
    plugdir = os.path.join(os.path.dirname(tree), "plugin")
    os.makedirs(plugdir, exist_ok=True)
    with open(os.path.join(plugdir, "pymem_mutants_plugin.py"), "w") as f:
        f.write(_PLUGIN)
    env = dict(os.environ, PYMEM_CACHE_DIR=cache, PYTHONPATH=plugdir, **FAST_ENV)
    t0 = time.time()
    run([py, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pymem_mutants_plugin",
         "--hypothesis-seed=0", f"--junitxml={xml}", *tests], cwd=tree, env=env, check=False, timeout=3600)
    dt = time.time() - t0
    failed, n = [], 0
    for case in ET.parse(xml).getroot().iter("testcase"):
        n += 1
        if case.find("failure") is not None or case.find("error") is not None:
            name = case.get("classname", "").split(".")[-1] + "::" + case.get("name", "")
            failed.append(name)
    return failed, n, dt


# ---- report -------------------------------------------------------------------------------------
def short(names: Sequence[str], limit: int = 4) -> str:
    if not names:
        return "-"
    uniq = sorted({re.sub(r"\[.*\]$", "", n) for n in names})
    more = f" (+{len(uniq) - limit} more)" if len(uniq) > limit else ""
    return ", ".join(uniq[:limit]) + more + f" [{len(names)} failing]"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--check", action="store_true", help="only check that every snippet is found once")
    ap.add_argument("--only", nargs="*", help="run only these mutations")
    ap.add_argument("--before", default=None,
                    help="commit whose tests give the 'before' column (default: merge-base HEAD main; "
                         "'none' skips it)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder)")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--quick", action="store_true",
                    help="only the pinned tests of this tree (no C tests, no 'before' column)")
    a = ap.parse_args(argv)
    if a.list:
        for m in MUTATIONS:
            print(f"{m.name:24s} {m.what}")
        return 0
    if a.check:
        for m in MUTATIONS:
            for snippet, _ in m.edits:
                print(f"{m.name:24s} {os.path.relpath(locate(ROOT, snippet), ROOT)}")
        return 0
    muts = [m for m in MUTATIONS if not a.only or m.name in a.only]
    work = a.work or tempfile.mkdtemp(prefix="pymem-mutants-")
    os.makedirs(work, exist_ok=True)
    before = a.before
    if a.quick:
        before = "none"
    if before is None:
        before = run(["git", "merge-base", "HEAD", "main"], cwd=ROOT).stdout.strip()
    trees = {"after": (os.path.join(work, "after"), None)}
    if before != "none":
        trees["before"] = (os.path.join(work, "before"), before)
    cache = os.path.join(work, "cache")
    pys, suites = {}, {}
    for key, (tree, rev) in trees.items():
        copy_tree(tree, rev)
        for m in muts:  # the snippets must be there in both trees
            for snippet, _ in m.edits:
                locate(tree, snippet)
        pys[key] = make_venv(os.path.join(work, f"venv-{key}"))
        pinned = sorted(os.path.relpath(p, tree) for p in glob.glob(os.path.join(tree, "tests", "test_pinned_*.py")))
        suites[key] = ([] if a.quick else [t for t in FAST_TESTS if os.path.exists(os.path.join(tree, t))]) + pinned
    log(f"work folder {work}; before = {before}; suites: " +
        "; ".join(f"{k}: {' '.join(v)}" for k, v in suites.items()))
    rows = []
    plan = ([] if a.no_baseline else [Mutation("(none)", "baseline: unmutated", [])]) + muts
    for m in plan:
        res = {}
        c_fail: List[str] = []
        for key, (tree, _) in trees.items():
            orig = apply(tree, m)
            try:
                install(tree, pys[key])
                if key == "after" and not a.quick:
                    c_fail = ctest(tree, os.path.join(work, "ctest-build"))
                res[key] = pytest_run(tree, pys[key], suites[key], cache)
            finally:
                restore(orig)
        af, an, adt = res["after"]
        bf = res["before"][0] if "before" in res else None
        pinned = [f for f in af if f.startswith("test_pinned_")]
        caught_after = bool(c_fail or af)
        caught_before = None if bf is None else bool(c_fail or bf)
        rows.append((m, c_fail, pinned, [f for f in af if not f.startswith("test_pinned_")], bf,
                     caught_after, caught_before))
        log(f"{m.name}: after {'CAUGHT' if caught_after else 'missed'} "
            f"({len(c_fail)} C, {len(af)} pytest of {an}, {adt:.0f} s)"
            + ("" if bf is None else f"; before {'CAUGHT' if caught_before else 'missed'} "
                                     f"({len(bf)} pytest of {res['before'][1]}, {res['before'][2]:.0f} s)"))
    lines = ["| mutation | what | caught by (C tests; pinned tests; other tests) | caught after | caught before |",
             "|---|---|---|---|---|"]
    for m, c_fail, pinned, other, bf, ca, cb in rows:
        by = "; ".join(x for x in (short(c_fail), short(pinned), short(other)))
        before_txt = "n/a" if cb is None else ("yes" if cb else "no") + (f" ({short(bf, 3)})" if bf else "")
        if m.name == "(none)":
            ca_txt = "FAILS (the suite must pass unmutated)" if ca else "passes"
            before_txt = "n/a" if cb is None else ("FAILS" if cb else "passes")
        else:
            ca_txt = "yes" if ca else "NO"
        lines.append(f"| {m.name} | {m.what} | {by} | {ca_txt} | {before_txt} |")
    n = [r for r in rows if r[0].name != "(none)"]
    lines.append("")
    lines.append(f"caught after: {sum(r[5] for r in n)}/{len(n)}; caught before: "
                 + ("n/a" if not n or n[0][6] is None else f"{sum(bool(r[6]) for r in n)}/{len(n)}"))
    lines.append(f"fast suite (after): C tests + {' '.join(suites['after'])}; env {FAST_ENV}, --hypothesis-seed=0")
    if "before" in suites:
        lines.append(f"fast suite (before, tests of {before[:12]}): C tests + {' '.join(suites['before'])}")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    base = [r for r in rows if r[0].name == "(none)"]
    return 1 if base and base[0][5] else 0


if __name__ == "__main__":
    raise SystemExit(main())
