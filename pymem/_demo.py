"""``pymem demo`` and ``pymem conformance``: the commands that run real llama.cpp next to pymem
(tiny models of every memory type, sessions, the prompt-cache store; the shipped conformance
vectors).  Split from :mod:`pymem.cli`, which wires them into the parser."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

from .cli import CLIError


def _demo_steps() -> list:
    """The mirror scenario: (description, function(mirror)) pairs."""

    def fill(seq: int, n: int, start: int = 0, tok: int = 0) -> Callable:
        return lambda m: m.decode([((tok + i) % 128, start + i, [seq]) for i in range(n)])

    return [
        ("decode a 24-token prompt into seq 0", fill(0, 24)),
        ("fork seq 0 into seq 1 (seq_cp)", lambda m: m.seq_cp(0, 1)),
        ("continue seq 1 with 6 tokens", fill(1, 6, start=24, tok=50)),
        ("drop seq 0 tokens 4..8 (seq_rm)", lambda m: m.seq_rm(0, 4, 8)),
        ("context shift of seq 1 (seq_rm + seq_add)", lambda m: (m.seq_rm(1, 0, 8), m.seq_add(1, 8, -1, -8))),
        ("decode after the shift (K re-rotated)", lambda m: m.decode(
            [((90 + i) % 128, m.mem.seq_pos_max(1) + 1 + i, [1]) for i in range(3)])),
        ("save seq 1, restore it as seq 2", lambda m: m.seq_restore(1, 2)),
        ("keep only seq 2 (seq_keep)", lambda m: m.seq_keep(2)),
        ("whole state through llama.cpp's bytes", lambda m: m.whole_restore(from_llama=True)),
        ("continue seq 2", lambda m: m.decode([((7 + i) % 128, m.mem.seq_pos_max(2) + 1 + i, [2])
                                               for i in range(4)])),
    ]


#: the saved-state part of the demo: (model, llama.cpp context arguments, edits); an edit is
#: (description, operations, structure path: edited without the model)
_STATE_DEMO = [
    ("llama", dict(kv_unified=True, flash_attn=False),
     [("move seq 1 to seq 2, drop seq 0 (no model)", [("seq_mv", 1, 2), ("seq_rm", 0)], True),
      ("context shift of seq 0: drop 4..8, shift 8.. by -4", [("seq_rm", 0, 4, 8), ("seq_add", 0, 8, -1, -4)], False),
      ("truncate the session to 12 tokens", [("truncate", 12)], False)]),
    ("gemma2", dict(kv_unified=False, flash_attn=True),
     [("move seq 1 to seq 2, drop seq 0", [("seq_mv", 1, 2), ("seq_rm", 0)], False),
      ("context shift of seq 0: drop 4..8, shift 8.. by -4", [("seq_rm", 0, 4, 8), ("seq_add", 0, 8, -1, -4)], False)]),
    ("mamba", dict(kv_unified=True, flash_attn=False),
     [("move seq 1 to seq 2, drop seq 0 (no model)", [("seq_mv", 1, 2), ("seq_rm", 0)], True),
      ("truncate to 12 tokens (both refuse)", [("truncate", 12)], False)]),
    ("jamba", dict(kv_unified=True, flash_attn=False),
     [("keep seq 1, shift it by +3", [("seq_keep", 1), ("seq_add", 1, 0, -1, 3)], False),
      ("drop seq 1 from position 10 (both refuse)", [("seq_rm", 1, 10, -1)], False)]),
    ("lfm2_swa", dict(kv_unified=True, flash_attn=True),
     [("move seq 1 to seq 2, drop seq 0", [("seq_mv", 1, 2), ("seq_rm", 0)], False),
      ("halve seq 1's positions 10.. (seq_div)", [("seq_div", 1, 10, -1, 2)], False)]),
]


def _demo_states(w: Any, paths: dict, rows: list) -> int:
    """Save sessions in llama.cpp, inspect them, edit them with pymem, load the edits back in
    llama.cpp and compare with llama.cpp doing the same operations itself."""
    import tempfile

    from . import state
    from ._oracle.verify import check_session_edit

    failures = 0
    n_seq_max = 4
    with tempfile.TemporaryDirectory(prefix="pymem-demo-") as tmp:
        for name, cfg, edits in _STATE_DEMO:
            kw = dict(n_ctx=256, n_seq_max=n_seq_max, swa_full=True, **cfg)

            def setup(c: Any) -> None:
                assert c.decode([(i % 128, i, [0]) for i in range(16)]) == 0
                c.seq_cp(0, 1)
                assert c.decode([((5 * i + 1) % 128, 16 + i, [1]) for i in range(4)]) == 0

            # save and inspect once
            ctx = w.context(paths[name], **kw)
            setup(ctx)
            f = os.path.join(tmp, f"{name}.session")
            ctx.state_save_file(f, list(range(16)))
            sess = state.Session.load(f, model=paths[name])
            want = {s: (ctx.pos_min(s), ctx.pos_max(s)) for s in range(n_seq_max)}
            ctx.close()
            got = {s: (max(x.pos_min for x in v), max(x.pos_max for x in v)) for s, v in sess.sequences().items()}
            with open(f, "rb") as fh:
                seen = all(got.get(s, (-1, -1)) == p for s, p in want.items()) and sess.dump() == fh.read()
            failures += not seen
            label = f"{name} ({sess.state.layout.kind}), {'unified' if cfg['kv_unified'] else 'per-seq streams'}"
            rows.append((label, "save a session, inspect it", sess.nbytes,
                         f"{'ok' if seen else 'MISMATCH'}: {sess.state.layout.describe()}, seqs "
                         + " ".join(f"{q}:{a}..{b}" for q, (a, b) in got.items())))
            for what, ops, structure in edits:
                r = check_session_edit(w, paths[name], kw, setup, ops, list(range(16)), next_seq=1,
                                       structure=structure, tmpdir=tmp)
                failures += not r.ok
                if not r.llama_ok:
                    status = "ok: both refuse" if r.refused else "MISMATCH: pymem did not refuse"
                elif r.refused:
                    status = "MISMATCH: pymem refused: " + r.refused[:60]
                else:
                    status = ("ok" if r.ok else "MISMATCH") + \
                        f": {r.path} path, state {'=' if r.state_equal else '!='}, " \
                        f"loaded {'yes' if r.loaded else 'NO'}, logits {'=' if r.logits_equal else '!='}, " \
                        f"next state {'=' if r.next_state_equal else '!='}"
                rows.append((label, what, r.edited_bytes or r.session_bytes, status))
    return failures


def _demo_builds(w: Any) -> list:
    """Every llama.cpp build installed: (name, worker, state format, mirror class). The
    llama-cpp-py-sync wheel (b11739) always; llama-cpp-python 0.3.36 (0c1e570) when found."""
    from ._oracle.mirror import Mirror

    builds = [("llama.cpp b11739 (llama-cpp-py-sync 0.11739, format 11)", w, 11, Mirror)]
    try:
        from ._oracle.lcp import LcpWorker
        from ._oracle.lcp_mirror import LcpMirror
        from .llama import _bridge_lcp as _lcp

        if _lcp.locate() is not None:
            lw = LcpWorker()
            lw.start()
            builds.append(("llama.cpp 0c1e570 (llama-cpp-python 0.3.36, format 10)", lw, 10, LcpMirror.for_memory))
        else:
            print(f"(llama-cpp-python {_lcp.ORACLE_VERSION} not found, its round is skipped: {_lcp.BUILD_HINT})")
    except Exception as exc:  # the second build is optional
        print(f"(llama-cpp-python round skipped: {exc})")
    return builds


def demo(args: argparse.Namespace) -> int:
    try:
        from ._oracle import OracleUnavailable, OracleWorker, tinymodels
    except ImportError as exc:  # pragma: no cover
        raise CLIError(f"the demo needs llama.cpp: {exc}", 2)
    import pymem

    configs = [
        ("llama", dict(kv_unified=True, flash_attn=False)),
        ("llama", dict(kv_unified=False, flash_attn=True)),
        ("gemma2", dict(kv_unified=True, flash_attn=False)),
        ("mamba", dict(kv_unified=True, flash_attn=False)),
        ("jamba", dict(kv_unified=False, flash_attn=False)),
        ("lfm2_swa", dict(kv_unified=True, flash_attn=True)),
    ]
    if getattr(args, "keep", None):
        from . import _demo_keep

        _demo_keep.check_dir(args.keep)   # before any work
    t0 = time.perf_counter()
    try:
        w = OracleWorker()
        w.start()
    except OracleUnavailable as exc:
        raise CLIError(f"the demo needs real llama.cpp: {exc}", 2)
    failures = 0
    rows = []
    srows: list = []
    builds = _demo_builds(w)
    with w:
        paths = w.ensure_models(sorted({name for name, _ in configs} | {n for n, _, _ in _STATE_DEMO}))
        for build, bw, fmt, mirror in builds:
          for name, cfg in configs:
            layout = tinymodels.layout(name)
            n_seq_max = 3
            ctx = bw.context(paths[name], n_ctx=256, n_seq_max=n_seq_max, swa_full=True, **cfg)
            mem = pymem.from_gguf(paths[name], 256, n_seq_max=n_seq_max, unified=cfg["kv_unified"],
                                  flash_attn=cfg["flash_attn"], swa_full=True, format=fmt)
            m = mirror(ctx, mem, n_ubatch=ctx.n_ubatch(), n_vocab=layout["n_vocab"], n_seq_max=n_seq_max)
            label = f"{build}: {name} ({mem.kind}), {'unified' if cfg['kv_unified'] else 'per-seq streams'}, " \
                    f"{'flash attn' if cfg['flash_attn'] else 'V transposed'}"
            for what, fn in _demo_steps():
                skipped = sum(v for k, v in m.stats.items() if "skipped" in k)
                try:
                    fn(m)
                    bad = m.compare()
                except AssertionError as exc:
                    bad = [str(exc)]
                ok = not bad
                failures += not ok
                whole = len(m.mem.state_write(envelope="llama"))
                note = " (skipped on both: this build aborts on it)" \
                    if sum(v for k, v in m.stats.items() if "skipped" in k) > skipped else ""
                rows.append((label, what, whole,
                             "match" + note if ok else "MISMATCH: " + "; ".join(map(str, bad))[:120]))
            ctx.close()
        for _b, bw, _f, _m in builds[1:]:
            bw.close()
        t1 = time.perf_counter()
        sfail = _demo_states(w, paths, srows)
        failures += sfail
        kept = None
        if getattr(args, "keep", None):
            from . import _demo_keep

            kept = _demo_keep.write(w, w.ensure_models(_demo_keep.KEEP_MODELS), args.keep)
    print("Part 1: the same operations in llama.cpp and in pymem, states compared byte for byte")
    _table(rows, "state bytes", "result")
    n = len(rows)
    print(f"\n{n - sum(1 for r in rows if not r[3].startswith('match'))}/{n} steps byte-identical to "
          f"{' and '.join(b for b, _, _, _ in builds)} "
          f"(positions, whole state and every sequence state), {t1 - t0:.1f} s")
    print("\nPart 2: sessions saved by llama.cpp, inspected and edited offline by pymem, loaded back into "
          "llama.cpp;\ncompared with llama.cpp doing the same operations itself (state after its next update, "
          "logits and state\nof a 3-token continuation)")
    _table(srows, "file bytes", "result")
    ns = len(srows)
    print(f"\n{ns - sum(1 for r in srows if not r[3].startswith('ok'))}/{ns} session checks passed, "
          f"{time.perf_counter() - t1:.1f} s; total {time.perf_counter() - t0:.1f} s")
    failures += _demo_store(paths)
    if kept:
        print(f"\nkept {len(kept)} files in {args.keep} (see {os.path.join(args.keep, 'README.txt')}); try:\n"
              f"  cd {args.keep}\n  pymem inspect chat.session --model model.gguf\n"
              "  pymem edit chat.session -m model.gguf --seq-rm 0:4:12 --seq-add 0:12::-8 -o shifted.session")
    return 1 if failures else 0


def _conformance(args: argparse.Namespace) -> int:
    from . import conformance as K
    from .llama import OracleUnavailable

    try:
        return _conformance_run(K, args)
    except OracleUnavailable as exc:
        raise CLIError(f"conformance needs the llama.cpp build {args.llama!r}: {exc}", 2)


def _conformance_run(K: Any, args: argparse.Namespace) -> int:
    if args.record:
        try:
            out = K.record(args.llama, args.record, progress=lambda n: print(f"recording {n}", file=sys.stderr))
        except RuntimeError as exc:
            raise CLIError(str(exc), 1)
        print(f"wrote {out}")
        return 0
    rows = K.run(args.llama, args.vectors or None)
    if args.json:
        for r in rows:
            print(json.dumps(r.as_dict()))
    else:
        label = K.BUILDS[args.llama][0]
        print(f"conformance vectors replayed in {label} and pymem (state format {K.BUILDS[args.llama][1]})")
        w = max(len(r.vector) for r in rows)
        print(f"{'vector':{w}s}  {'memory':11s} {'steps':>5s}  {'recorded':8s}  build vs recording | pymem vs build")
        for r in rows:
            print(f"{r.vector:{w}s}  {r.memory:11s} {r.steps:5d}  {r.recorded_by:8s}  {r.build} | {r.pymem}"
                  + (f"  [{'; '.join(r.notes)}]" if r.notes else ""))
        same = sum(1 for r in rows if r.build == "identical")
        ok = sum(1 for r in rows if r.pymem == "identical")
        print(f"\n{same}/{len(rows)} recordings reproduced by the build; pymem identical to the build in "
              f"{ok}/{len(rows)}")
    return 0 if all(r.pymem == "identical" for r in rows) else 1


def _demo_store(paths: dict) -> int:
    """Part 3: the prompt cache, prefilled in one process and restored in a new one."""
    from .store.demo import run as store_round

    t = time.perf_counter()
    rows, failures = store_round(paths)
    print("\nPart 3: the prompt cache (pymem.store): prefill P in one process, then P + 9 tokens in a new "
          "process\nfrom the same embedded store; next-token logits compared with a full decode")
    _table(rows, "stored bytes", "result")
    print(f"\n{len(rows) - failures}/{len(rows)} store steps passed, {time.perf_counter() - t:.1f} s")
    return failures


def _table(rows: list, size_head: str, result_head: str) -> None:
    width = max(len(r[1]) for r in rows)
    current = None
    for label, what, size, status in rows:
        if label != current:
            print(f"\n{label}")
            print(f"  {'step':{width}s}  {size_head:>11s}  {result_head}")
            current = label
        print(f"  {what:{width}s}  {size:11d}  {status}")
