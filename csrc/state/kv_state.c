/* kv_state.c - the KV cache's state section (SPEC section 8.2), restore in three steps: parse
 * (validates a copy of the cell records, changes nothing), meta (cells and heads), data (K/V
 * rows).  The write is kv_state_write.c.
 */
#include "state/kv_state.h"

#include <stdio.h>
#include <stdlib.h>

/* ---- state: read ----------------------------------------------------------------------------- */

/* Read a little-endian value of `size` bytes (4 or 8) that must equal `want`.  False on a
 * truncation (the reader's message) or a mismatch: "<what>: <field> <got>, this cache has
 * <want><note> (offset N)" (count: "<what>: <got> <field>, ...").  Signed values are int32. */
static bool expect(pmi_reader *r, unsigned size, bool is_signed, uint64_t want, const char *what,
                   const char *field, const char *note, bool count) {
    uint64_t got;
    uint32_t g32;
    if (size == 8 ? !pmi_r_u64(r, &got, what) : !pmi_r_u32(r, &g32, what)) {
        return false;
    }
    if (size == 4) {
        got = g32;
    }
    if (got == want) {
        return true;
    }
    long long gv = is_signed ? (long long)(int32_t)(uint32_t)got : (long long)got;
    long long wv = is_signed ? (long long)(int32_t)(uint32_t)want : (long long)want;
    unsigned long long at = (unsigned long long)(r->off - size);
    if (is_signed) {
        pmi_fail(PM_E_FORMAT, "%s: %s %lld, this cache has %lld%s (offset %llu)", what, field, gv, wv, note, at);
    } else if (count) {
        pmi_fail(PM_E_FORMAT, "%s: %llu %s, this cache has %llu%s (offset %llu)", what,
                 (unsigned long long)got, field, (unsigned long long)want, note, at);
    } else {
        pmi_fail(PM_E_FORMAT, "%s: %s %llu, this cache has %llu%s (offset %llu)", what, field,
                 (unsigned long long)got, (unsigned long long)want, note, at);
    }
    return false;
}

static pm_status check_cell_header(uint32_t s, uint32_t i, int32_t pos, uint32_t nid, pm_seq_id seq,
                                   uint64_t at) {
    if (pos < 0) {
        return pmi_fail(PM_E_FORMAT, "KV stream %u cell %u: negative position %d (offset %llu)", s, i,
                        pos, (unsigned long long)at);
    }
    if (seq != -1 && nid != 1) {
        return pmi_fail(PM_E_FORMAT,
                        "KV stream %u cell %u: a sequence blob needs exactly 1 seq id per cell, not %u (offset %llu)",
                        s, i, nid, (unsigned long long)at);
    }
    return PM_OK;
}

/* The cell records of stream section s: copied (sec->copy, in bulk: the size they have with
 * one id per cell, more on demand) and validated from the copy; the apply step reads only the
 * copy, never the caller's buffer again. */
static pm_status parse_cells(const pmi_kv *kv, pmi_reader *r, uint32_t s, pm_seq_id seq,
                             pmi_kv_section *sec) {
    char what[96];
    /* q: offset of the next record from m0 */
    pmi_copy *cp = &sec->copy;
    const uint32_t ext = kv->cell_ext ? 12 : 0;
    const uint64_t m0 = r->off, avail = r->len - m0;
    uint64_t q = 0;
    pm_status st = pmi_copy_window(r, m0, cp, PMI_MIN(avail, (uint64_t)sec->cc * (12 + ext)));
    if (st != PM_OK) {
        return st;
    }
    uint32_t i = 0;
    if (seq != -1) {
        /* the common records first: one id each (not checked for a sequence blob), inside the
         * copy; anything else goes to the loop below */
        const uint32_t rec = 12 + ext;
        for (; i < sec->cc && q + rec <= cp->n; ++i, q += rec) {
            const uint8_t *p = cp->buf + q;
            if (pmi_rd_i32(p) < 0 || pmi_rd_u32(p + 4) != 1) {
                break;
            }
        }
    } else {
        /* the common records first: one valid id each, inside the copy (ids counted by runs:
         * no chain of increments through memory); anything else goes to the loop below */
        const uint32_t rec = 12 + ext, n_seq_max = kv->n_seq_max;
        uint32_t run_id = 0, run_n = 0;
        for (; i < sec->cc && q + rec <= cp->n; ++i, q += rec) {
            const uint8_t *p = cp->buf + q;
            uint32_t id = pmi_rd_u32(p + 8 + ext);
            if (pmi_rd_i32(p) < 0 || pmi_rd_u32(p + 4) != 1 || id >= n_seq_max) {
                break;
            }
            if (id != run_id) {
                sec->ids[run_id] += run_n;
                run_id = id;
                run_n = 0;
            }
            run_n++;
        }
        sec->ids[run_id] += run_n;
    }
    for (; i < sec->cc; ++i) {
        uint64_t at = m0 + q;
        if (avail - q < 8 + ext) {
            /* a truncated record: the reader's messages (only the reads that fail remain) */
            r->off = at;
            snprintf(what, sizeof what, "KV stream %u cell %u", s, i);
            int32_t pos;
            uint32_t nid;
            const uint8_t *p;
            if (!pmi_r_i32(r, &pos, what) || !pmi_r_u32(r, &nid, what)) {
                return PM_E_FORMAT;
            }
            if ((st = check_cell_header(s, i, pos, nid, seq, at)) != PM_OK) {
                return st;
            }
            (void)pmi_r_span(r, ext, &p, what); /* fails: fewer than 8 + ext bytes were left */
            return PM_E_FORMAT;
        }
        if ((st = pmi_copy_need(r, m0, cp, q + 8 + ext)) != PM_OK) {
            return st;
        }
        const uint8_t *p = cp->buf + q;
        uint32_t nid = pmi_rd_u32(p + 4);
        if ((st = check_cell_header(s, i, pmi_rd_i32(p), nid, seq, at)) != PM_OK) {
            return st;
        }
        q += 8 + ext;
        if (nid > avail - q || (uint64_t)nid * 4 > avail - q) {
            snprintf(what, sizeof what, "KV stream %u cell %u", s, i);
            return pmi_fail(PM_E_FORMAT, "truncated state: %s lists %u seq ids at offset %llu", what,
                            nid, (unsigned long long)(m0 + q));
        }
        if ((st = pmi_copy_need(r, m0, cp, q + 4ull * nid)) != PM_OK) {
            return st;
        }
        if (seq == -1) {
            const uint8_t *ids = cp->buf + q;
            for (uint32_t k = 0; k < nid; ++k) {
                int32_t id = pmi_rd_i32(ids + 4ull * k);
                sec->ids[(uint32_t)id % PM_MAX_SEQ]++; /* only kept when every id is valid */
                if (id < 0 || (uint32_t)id >= kv->n_seq_max) {
                    snprintf(what, sizeof what, "KV stream %u cell %u", s, i);
                    return pmi_fail(PM_E_FORMAT, "%s: seq id %d is out of range [0, %u) (offset %llu)", what,
                                    id, kv->n_seq_max, (unsigned long long)(m0 + q + 4ull * k));
                }
            }
        }
        q += 4ull * nid;
    }
    r->off = m0 + q;
    sec->meta = cp->buf;
    sec->meta_len = q;
    return PM_OK;
}

/* a 12-byte layer header and cc rows of `row` bytes remain in r (no overflow) */
static bool span_ok(const pmi_reader *r, uint64_t head, uint64_t row, uint32_t cc) {
    uint64_t left = r->len - r->off;
    return left >= head && (row == 0 || (left - head) / row >= cc);
}

static uint64_t rd_u64(const uint8_t *p) {
    return (uint64_t)pmi_rd_u32(p) | ((uint64_t)pmi_rd_u32(p + 4) << 32);
}

static pm_status parse_section(const pmi_kv *kv, pmi_reader *r, uint32_t s, pm_seq_id seq,
                               pmi_kv_section *sec) {
    char what[96];
    if (!pmi_r_u32(r, &sec->cc, "cell_count")) {
        return pmi_fail_ctx(PM_E_FORMAT, "KV stream %u", s);
    }
    if (sec->cc == 0) {
        return PM_OK;
    }
    if (sec->cc > kv->size) {
        return pmi_fail(PM_E_FORMAT, "KV stream %u: %u cells do not fit in %u (offset %llu)", s,
                        sec->cc, kv->size, (unsigned long long)(r->off - 4));
    }
    pm_status st = parse_cells(kv, r, s, seq, sec);
    if (st != PM_OK) {
        return st;
    }
    uint32_t v_trans, n_layer;
    snprintf(what, sizeof what, "KV stream %u data header", s);
    if (!pmi_r_u32(r, &v_trans, what) || !pmi_r_u32(r, &n_layer, what)) {
        return PM_E_FORMAT;
    }
    if (n_layer != kv->n_layer) {
        return pmi_fail(PM_E_FORMAT, "KV stream %u: %u layers, this cache has %u (offset %llu)", s,
                        n_layer, kv->n_layer, (unsigned long long)(r->off - 4));
    }
    if ((v_trans != 0) != kv->v_trans) { /* llama.cpp compares (bool) v_trans */
        return pmi_fail(PM_E_FORMAT, "KV stream %u: v_trans %u, this cache has %d (offset %llu)", s,
                        v_trans, kv->v_trans, (unsigned long long)(r->off - 8));
    }
    if (kv->format >= 11) {
        uint32_t k_rot, v_rot;
        if (!pmi_r_u32(r, &k_rot, what) || !pmi_r_u32(r, &v_rot, what)) {
            return PM_E_FORMAT;
        }
        if (k_rot != (uint32_t)kv->k_rot) {
            return pmi_fail(PM_E_FORMAT, "KV stream %u: key rotation %u, this cache has %d (offset %llu)",
                            s, k_rot, kv->k_rot, (unsigned long long)(r->off - 8));
        }
        if (v_rot != (uint32_t)kv->v_rot) {
            return pmi_fail(PM_E_FORMAT, "KV stream %u: value rotation %u, this cache has %d (offset %llu)",
                            s, v_rot, kv->v_rot, (unsigned long long)(r->off - 4));
        }
    }
    char note[40];
    snprintf(note, sizeof note, " (%s)", pm_type_name(kv->type_k));
    for (uint32_t l = 0; l < kv->n_layer; ++l) {
        const pmi_kv_layer *L = &kv->layers[l];
        if (span_ok(r, 12, L->k_row, sec->cc) && pmi_rd_i32(r->buf + r->off) == kv->type_k &&
            rd_u64(r->buf + r->off + 4) == L->k_row) {
            sec->k[l] = r->buf + r->off + 12; /* all as expected: no message to prepare */
            r->off += 12 + L->k_row * sec->cc;
            continue;
        }
        snprintf(what, sizeof what, "KV stream %u layer %u K", s, L->p.il);
        if (!expect(r, 4, true, (uint64_t)kv->type_k, what, "type", note, false) ||
            !expect(r, 8, false, L->k_row, what, "row size", "", false) ||
            !pmi_r_span(r, L->k_row * sec->cc, &sec->k[l], what)) {
            return PM_E_FORMAT;
        }
    }
    snprintf(note, sizeof note, " (%s)", pm_type_name(kv->type_v));
    for (uint32_t l = 0; l < kv->n_layer; ++l) {
        const pmi_kv_layer *L = &kv->layers[l];
        if (L->v == NULL) {
            continue;
        }
        const uint8_t *h = r->buf + r->off;
        if (kv->v_trans ? span_ok(r, 12, L->v_row * L->n_embd_v_gqa, sec->cc) && pmi_rd_i32(h) == kv->type_v &&
                              pmi_rd_u32(h + 4) == L->v_row && pmi_rd_u32(h + 8) == L->n_embd_v_gqa
                        : span_ok(r, 12, L->v_row, sec->cc) && pmi_rd_i32(h) == kv->type_v &&
                              rd_u64(h + 4) == L->v_row) {
            sec->v[l] = h + 12; /* all as expected: no message to prepare */
            r->off += 12 + (kv->v_trans ? L->v_row * L->n_embd_v_gqa : L->v_row) * sec->cc;
            continue;
        }
        snprintf(what, sizeof what, "KV stream %u layer %u V", s, L->p.il);
        if (!expect(r, 4, true, (uint64_t)kv->type_v, what, "type", note, false)) {
            return PM_E_FORMAT;
        }
        bool ok = kv->v_trans
                      ? expect(r, 4, false, L->v_row, what, "element size", "", false) &&
                            expect(r, 4, false, L->n_embd_v_gqa, what, "V rows", "", true) &&
                            pmi_r_span(r, L->v_row * L->n_embd_v_gqa * sec->cc, &sec->v[l], what)
                      : expect(r, 8, false, L->v_row, what, "row size", "", false) &&
                            pmi_r_span(r, L->v_row * sec->cc, &sec->v[l], what);
        if (!ok) {
            return PM_E_FORMAT;
        }
    }
    return PM_OK;
}

static pm_status sections_alloc(const pmi_kv *kv, pm_seq_id seq, pmi_kv_section **out) {
    pmi_kv_section *secs = calloc(kv->n_stream, sizeof(pmi_kv_section));
    const uint8_t **ptrs = calloc((size_t)kv->n_stream * 2 * (kv->n_layer ? kv->n_layer : 1),
                                  sizeof(uint8_t *));
    uint32_t *ids = seq == -1 ? calloc((size_t)kv->n_stream * PM_MAX_SEQ, sizeof(uint32_t)) : NULL;
    if (secs == NULL || ptrs == NULL || (seq == -1 && ids == NULL)) {
        free(secs);
        free(ptrs);
        free(ids);
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    uint32_t nl = kv->n_layer ? kv->n_layer : 1;
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        secs[s].k = ptrs + (size_t)s * 2 * nl;
        secs[s].v = ptrs + (size_t)s * 2 * nl + nl;
        secs[s].ids = ids ? ids + (size_t)s * PM_MAX_SEQ : NULL;
    }
    *out = secs;
    return PM_OK;
}

static void sections_free(pmi_kv_section *secs, uint32_t n) {
    if (secs) {
        for (uint32_t s = 0; s < n; ++s) {
            pmi_copy_free(&secs[s].copy);
        }
        free((void *)secs[0].k);
        free(secs[0].ids);
        free(secs);
    }
}

static pm_status parse_all(const pmi_kv *kv, pmi_reader *r, pm_seq_id seq, pmi_kv_section *secs) {
    uint32_t n;
    if (!pmi_r_u32(r, &n, "KV n_stream")) {
        return PM_E_FORMAT;
    }
    if (n != kv->n_stream) {
        return pmi_fail(PM_E_FORMAT, "KV n_stream %u, this cache has %u (offset %llu)", n, kv->n_stream,
                        (unsigned long long)(r->off - 4));
    }
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        pm_status st = parse_section(kv, r, s, seq, &secs[s]);
        if (st != PM_OK) {
            return st;
        }
    }
    return PM_OK;
}

static pm_status check_read_seq(const pmi_kv *kv, pm_seq_id seq) {
    if (seq != -1 && !pmi_kv_seq_valid(kv, seq)) {
        return pmi_fail(PM_E_INVALID_ARG, "state_read: seq_id %d is not -1 or in [0, %u)", seq,
                        kv->seq_to_stream_len);
    }
    return PM_OK;
}

pm_status pmi_kv_state_parse(const pmi_kv *kv, pmi_reader *r, pm_seq_id seq, uint32_t flags,
                             pmi_kv_plan *plan) {
    memset(plan, 0, sizeof(*plan));
    plan->seq = seq;
    plan->n_stream = kv->n_stream;
    pm_status st = check_read_seq(kv, seq);
    if (st == PM_OK && pmi_kv_partial_skips(kv, flags)) {
        plan->skip = true;
        return PM_OK;
    }
    if (st == PM_OK) {
        st = sections_alloc(kv, seq, &plan->secs);
    }
    if (st == PM_OK) {
        plan->slots = calloc(kv->n_stream, sizeof(uint32_t *));
        if (plan->slots == NULL) {
            st = pmi_fail(PM_E_NOMEM, "out of memory");
        }
    }
    if (st == PM_OK) {
        st = parse_all(kv, r, seq, plan->secs);
    }
    if (st != PM_OK) {
        pmi_kv_plan_free(plan);
    }
    return st;
}

void pmi_kv_plan_free(pmi_kv_plan *plan) {
    if (plan->slots) {
        for (uint32_t s = 0; s < plan->n_stream; ++s) {
            free(plan->slots[s]);
        }
    }
    free(plan->slots);
    sections_free(plan->secs, plan->n_stream);
    memset(plan, 0, sizeof(*plan));
}

static void read_runs(uint8_t *base, uint64_t row, const uint32_t *runs, uint32_t nr,
                      const uint8_t *src) {
    for (uint32_t r = 0; r < nr; ++r) {
        pmi_copy_big(base + runs[2 * r] * row, src, (size_t)(row * runs[2 * r + 1]));
        src += row * runs[2 * r + 1];
    }
}

static void apply_data(pmi_kv *kv, uint32_t st, const pmi_kv_section *sec, const uint32_t *idx) {
    if (sec->cc == 0) {
        return; /* no rows; sec->k / sec->v are NULL (no arithmetic on them: UB) */
    }
    uint32_t *runs = kv->runs;
    uint32_t nr = pmi_kv_make_runs(idx, sec->cc, runs);
    for (uint32_t l = 0; l < kv->n_layer; ++l) {
        pmi_kv_layer *L = &kv->layers[l];
        read_runs(L->k + st * L->k_stream, L->k_row, runs, nr, sec->k[l]);
        if (L->v == NULL) {
            continue;
        }
        uint8_t *vb = L->v + st * L->v_stream;
        if (!kv->v_trans) {
            read_runs(vb, L->v_row, runs, nr, sec->v[l]);
        } else {
            for (uint32_t j = 0; j < L->n_embd_v_gqa; ++j) {
                read_runs(vb + (uint64_t)j * kv->size * L->v_row, L->v_row, runs, nr,
                          sec->v[l] + (uint64_t)j * sec->cc * L->v_row);
            }
        }
    }
}

/* ids of the cell records of a whole restore (8 or 20 bytes each, then 4 per id) */
static uint64_t section_ids(const pmi_kv *kv, const pmi_kv_section *sec) {
    return (sec->meta_len - (uint64_t)sec->cc * (kv->cell_ext ? 20 : 8)) / 4;
}

/* Whole restore inside a transaction: clear, then every membership through the journaled
 * seq_add (each indexed on its own). */
static pm_status meta_whole_journaled(pmi_kv *kv, const pmi_kv_section *secs) {
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        pm_status st = pmi_cells_reserve(&kv->cells[s], section_ids(kv, &secs[s]));
        if (st != PM_OK) {
            return st;
        }
    }
    pmi_kv_clear(kv, false);
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        pmi_cells *c = &kv->cells[s];
        const uint8_t *p = secs[s].meta;
        for (uint32_t i = 0; i < secs[s].cc; ++i) {
            pmi_cells_pos_set(c, i, pmi_rd_i32(p));
            uint32_t nid = pmi_rd_u32(p + 4);
            p += 8;
            if (kv->cell_ext) {
                pmi_ext e = {pmi_rd_i32(p), pmi_rd_i32(p + 4), pmi_rd_i32(p + 8)};
                pmi_cells_ext_set(c, i, e);
                p += 12;
            }
            for (uint32_t q = 0; q < nid; ++q) {
                pmi_cells_seq_add(c, i, pmi_rd_i32(p + 4ull * q));
            }
            p += 4ull * nid;
        }
        kv->head[s] = 0;
    }
    return PM_OK;
}

/* Whole restore outside a transaction: reserve and allocate first (a failure changes
 * nothing), then each stream is reset around its cells packed at 0..cc-1, every cell is
 * written once from its record and joins the sequence index while it is in L1 (built in
 * bulk, linear time). */
static pm_status meta_whole_bulk(pmi_kv *kv, const pmi_kv_section *secs) {
    pm_status st = PM_OK;
    uint64_t most = 0; /* the largest stacks that do not fit in their stream's scratch */
    for (uint32_t s = 0; s < kv->n_stream && st == PM_OK; ++s) {
        uint64_t len = pmi_cells_bulk_stack_len(secs[s].ids);
        most = len > pmi_cells_scratch_u64(&kv->cells[s]) ? PMI_MAX(most, len) : most;
        st = pmi_cells_reserve(&kv->cells[s], section_ids(kv, &secs[s]));
    }
    uint64_t *stack = NULL;
    if (st == PM_OK && most >= UINT32_MAX) { /* the stacks are indexed by uint32_t */
        st = pmi_fail(PM_E_NOMEM, "sequence index cannot grow to %llu entries", (unsigned long long)most);
    }
    if (st == PM_OK && most > 0 && (stack = malloc(sizeof(uint64_t) * most)) == NULL) {
        st = pmi_fail(PM_E_NOMEM, "out of memory");
    }
    if (st != PM_OK) {
        return st;
    }
    pmi_bulk bulk;
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        pmi_cells *c = &kv->cells[s];
        const uint32_t cc = secs[s].cc;
        const uint8_t *p = secs[s].meta;
        pmi_cells_reset_packed(c, cc);
        /* the stacks in the stream's scratch when they fit (with one id per cell they do, but
         * in a tiny cache of many sequences) */
        bool own = pmi_cells_bulk_stack_len(secs[s].ids) <= pmi_cells_scratch_u64(c);
        pmi_cells_bulk_start(c, &bulk, secs[s].ids, own ? (uint64_t *)c->tmp : stack);
        for (uint32_t i0 = 0; i0 < cc; i0 += 512) {
            uint32_t i1 = PMI_MIN(cc, i0 + 512), run_s = PMI_NONE, run_i = i0;
            for (uint32_t i = i0; i < i1; ++i) {
                pm_pos pos = pmi_rd_i32(p);
                uint32_t nid = pmi_rd_u32(p + 4);
                pmi_ext e, *ep = NULL;
                p += 8;
                if (kv->cell_ext) {
                    e = (pmi_ext){pmi_rd_i32(p), pmi_rd_i32(p + 4), pmi_rd_i32(p + 8)};
                    ep = &e;
                    p += 12;
                }
                /* the sequence words in registers (a blob may repeat an id: bits, not counts;
                 * no array indexed by id: its stores would not forward to the copy's loads) */
                uint64_t w0 = 0, w1 = 0, w2 = 0, w3 = 0;
                for (uint32_t q = 0; q < nid; ++q) {
                    uint32_t id = pmi_rd_u32(p + 4ull * q); /* parse checked: < n_seq_max */
                    uint64_t bit = 1ULL << (id & 63);
                    w0 |= (id >> 6) == 0 ? bit : 0;
                    w1 |= (id >> 6) == 1 ? bit : 0;
                    w2 |= (id >> 6) == 2 ? bit : 0;
                    w3 |= (id >> 6) == 3 ? bit : 0;
                }
                pmi_cells_load(c, i, pos, ep, w0, w1, w2, w3);
                /* into the index (cells still in L1): runs of cells of one sequence alone in
                 * bulk, any other cell on its own, in cell order */
                uint32_t id1 = nid == 1 ? pmi_rd_u32(p) : PMI_NONE;
                if (id1 != run_s || nid != 1) {
                    if (run_s != PMI_NONE) {
                        pmi_cells_bulk_run(c, &bulk, run_s, run_i, i);
                    }
                    run_s = id1;
                    run_i = i;
                    if (nid > 1) {
                        pmi_cells_bulk_cells(c, &bulk, i, i + 1);
                        run_s = PMI_NONE;
                    }
                }
                p += 4ull * nid;
            }
            if (run_s != PMI_NONE) {
                pmi_cells_bulk_run(c, &bulk, run_s, run_i, i1);
            }
        }
        pmi_cells_load_end();
        pmi_cells_bulk_finish(c, &bulk);
        kv->head[s] = 0;
    }
    free(stack);
    return PM_OK;
}

pm_status pmi_kv_state_meta(pmi_kv *kv, pmi_kv_plan *plan) {
    pmi_kv_section *secs = plan->secs;
    pm_status st = PM_OK;
    if (plan->skip) {
        return PM_OK;
    }
    if (plan->seq == -1) {
        return kv->tx_on ? meta_whole_journaled(kv, secs) : meta_whole_bulk(kv, secs);
    }
    /* per-sequence restore into stream(seq), section by section: seq_rm, find_slot,
     * apply_ubatch (the data follows in pmi_kv_state_data, after every part placed) */
    pm_seq_id seq = plan->seq;
    pmi_cells *c = &kv->cells[pmi_kv_stream(kv, seq)];
    pmi_ubatch ub;
    for (uint32_t s = 0; s < kv->n_stream && st == PM_OK; ++s) {
        const pmi_kv_section *sec = &secs[s];
        if (sec->cc == 0) {
            continue;
        }
        pmi_kv_seq_remove(kv, seq, -1, -1);
        st = pmi_ubatch_reserve(&ub, sec->cc, kv->n_pos_per_embd, seq);
        if (st != PM_OK) {
            break;
        }
        const uint8_t *p = sec->meta;
        for (uint32_t i = 0; i < sec->cc; ++i) {
            ub.pos[i] = pmi_rd_i32(p);
            p += 8;
            if (kv->cell_ext) {
                ub.token[i] = pmi_rd_i32(p + 8);
                if (kv->n_pos_per_embd > 1) {
                    ub.pos[i + sec->cc] = pmi_rd_i32(p + 4);
                    ub.pos[i + 2 * sec->cc] = pmi_rd_i32(p);
                }
                p += 12;
            }
            p += 4;
        }
        pmi_slot slot;
        st = pmi_kv_find_slot(kv, &ub, &slot);
        if (st == PM_OK) {
            st = pmi_kv_apply_ubatch(kv, &slot, &ub);
            if (st != PM_OK) {
                pmi_slot_free(&slot);
            }
        }
        pmi_ubatch_free(&ub);
        if (st != PM_OK) {
            break;
        }
        if (kv->cell_ext) {
            p = sec->meta;
            for (uint32_t i = 0; i < sec->cc; ++i) {
                pmi_ext e = {pmi_rd_i32(p + 8), pmi_rd_i32(p + 12), pmi_rd_i32(p + 16)};
                pmi_cells_ext_set(c, slot.idxs[i], e);
                p += 24;
            }
        }
        free(plan->slots[s]);
        plan->slots[s] = slot.idxs;
    }
    return st;
}

void pmi_kv_state_data(pmi_kv *kv, const pmi_kv_plan *plan) {
    if (plan->skip) {
        return;
    }
    if (plan->seq == -1) {
        /* cells 0..cc-1 of each stream get the rows, the rest zeros: every byte written once
         * (no memset of the whole tensors first) */
        for (uint32_t s = 0; s < kv->n_stream; ++s) {
            const pmi_kv_section *sec = &plan->secs[s];
            const uint64_t cc = sec->cc, rest = kv->size - cc;
            for (uint32_t l = 0; l < kv->n_layer; ++l) {
                pmi_kv_layer *L = &kv->layers[l];
                uint8_t *kb = L->k + s * L->k_stream;
                if (cc) {
                    pmi_copy_big(kb, sec->k[l], (size_t)(L->k_row * cc));
                }
                memset(kb + L->k_row * cc, 0, (size_t)(L->k_row * rest));
                if (L->v == NULL) {
                    continue;
                }
                uint8_t *vb = L->v + s * L->v_stream;
                uint32_t n_rows = kv->v_trans ? L->n_embd_v_gqa : 1;
                const uint64_t el = L->v_row; /* transposed: element size; else row size */
                for (uint32_t j = 0; j < n_rows; ++j) {
                    uint8_t *dst = vb + (uint64_t)j * kv->size * el;
                    if (cc) {
                        pmi_copy_big(dst, sec->v[l] + (uint64_t)j * cc * el, (size_t)(el * cc));
                    }
                    memset(dst + el * cc, 0, (size_t)(el * rest));
                }
            }
        }
        return;
    }
    uint32_t strm = pmi_kv_stream(kv, plan->seq);
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        if (plan->slots[s] != NULL) {
            apply_data(kv, strm, &plan->secs[s], plan->slots[s]);
        }
    }
}
