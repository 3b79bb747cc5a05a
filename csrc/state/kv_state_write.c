/* kv_state_write.c - the KV cache's state section (SPEC section 8.2), write: whole or one
 * sequence, and the size query (kv_state.c restores).
 */
#include "state/kv_state.h"

/* Cells of stream st selected for a write, ascending; returns the count (kv->work). */
static uint32_t select_cells(const pmi_kv *kv, uint32_t st, pm_seq_id seq, uint32_t *out) {
    const pmi_cells *c = &kv->cells[st];
    uint32_t n = 0;
    if (seq == -1) {
        for (uint32_t w = 0; w < c->nwords; ++w) {
            uint64_t bits = c->used_bits[w];
            while (bits) {
                out[n++] = w * 64 + (uint32_t)__builtin_ctzll(bits);
                bits &= bits - 1;
            }
        }
        return n;
    }
    uint32_t m = pmi_cells_seq_all(c, seq, out);
    if (kv->swa_type != PM_SWA_NONE && m > 0) {
        pm_pos pmax = pmi_cells_seq_pos_max(c, seq);
        for (uint32_t k = 0; k < m; ++k) {
            if (!pmi_is_masked_swa(kv->n_swa, kv->swa_type, c->pos[out[k]], pmax)) {
                out[n++] = out[k];
            }
        }
    } else {
        n = m;
    }
    uint32_t k = 1;
    while (k < n && out[k] > out[k - 1]) {
        ++k;
    }
    if (k >= n) {
        return n; /* positions follow the cells: already ascending */
    }
    /* ascending cell order through a bitmap (cheaper than sorting) */
    uint64_t *bm = kv->bits;
    memset(bm, 0, sizeof(uint64_t) * c->nwords);
    for (uint32_t k = 0; k < n; ++k) {
        bm[out[k] >> 6] |= 1ULL << (out[k] & 63);
    }
    uint32_t o = 0;
    for (uint32_t wi = 0; wi < c->nwords; ++wi) {
        uint64_t bits = bm[wi];
        while (bits) {
            out[o++] = wi * 64 + (uint32_t)__builtin_ctzll(bits);
            bits &= bits - 1;
        }
    }
    return n;
}

/* runs of consecutive cells: (first cell, length) pairs; returns the count */
uint32_t pmi_kv_make_runs(const uint32_t *cells, uint32_t n, uint32_t *runs) {
    uint32_t nr = 0, k = 0;
    while (k < n) {
        uint32_t e = k + 1;
        while (e < n && cells[e] == cells[e - 1] + 1) {
            ++e;
        }
        runs[2 * nr] = cells[k];
        runs[2 * nr + 1] = e - k;
        nr++;
        k = e;
    }
    return nr;
}

static void write_rows(pmi_writer *w, const uint8_t *base, uint64_t row, const uint32_t *runs,
                       uint32_t nr, uint32_t n) {
    uint8_t *dst = pmi_w_reserve(w, row * n);
    if (dst == NULL) {
        return;
    }
    for (uint32_t r = 0; r < nr; ++r) {
        pmi_copy_big(dst, base + runs[2 * r] * row, (size_t)(row * runs[2 * r + 1]));
        dst += row * runs[2 * r + 1];
    }
}

static void write_stream(const pmi_kv *kv, pmi_writer *w, uint32_t st, pm_seq_id seq,
                         const uint32_t *cells, uint32_t n) {
    const pmi_cells *c = &kv->cells[st];
    pmi_w_u32(w, n);
    if (n == 0) {
        return;
    }
    /* cell metadata: one reservation, then plain stores (ids >= n_seq_max are not written) */
    uint64_t nids = 0;
    uint64_t wmask[PMI_SEQ_WORDS];
    for (uint32_t wq = 0; wq < PMI_SEQ_WORDS; ++wq) { /* the ids < n_seq_max */
        uint32_t lo = wq * 64;
        wmask[wq] = kv->n_seq_max >= lo + 64 ? UINT64_MAX
                    : kv->n_seq_max > lo     ? (1ULL << (kv->n_seq_max - lo)) - 1
                                             : 0;
    }
    if (seq == -1) {
        for (uint32_t k = 0; k < n; ++k) {
            const uint64_t *bw = c->seq + (size_t)cells[k] * PMI_SEQ_WORDS;
            for (uint32_t wq = 0; wq < PMI_SEQ_WORDS; ++wq) {
                nids += pmi_popcount64(bw[wq] & wmask[wq]);
            }
        }
    } else if ((uint32_t)seq < kv->n_seq_max) {
        nids = n;
    }
    const uint32_t ext = kv->cell_ext ? 12 : 0;
    uint8_t *p = pmi_w_reserve(w, (uint64_t)n * (8 + ext) + 4 * nids);
    for (uint32_t k = 0; k < n && p != NULL; ++k) {
        uint32_t i = cells[k];
        pmi_wr_u32(p, (uint32_t)c->pos[i]);
        uint8_t *ids = p + 8 + ext;
        if (seq == -1) {
            const uint64_t *bw = c->seq + (size_t)i * PMI_SEQ_WORDS;
            for (uint32_t wq = 0; wq < PMI_SEQ_WORDS; ++wq) {
                for (uint64_t b = bw[wq] & wmask[wq]; b; b &= b - 1) {
                    pmi_wr_u32(ids, wq * 64 + (uint32_t)__builtin_ctzll(b));
                    ids += 4;
                }
            }
        } else if ((uint32_t)seq < kv->n_seq_max) {
            pmi_wr_u32(ids, (uint32_t)seq);
            ids += 4;
        }
        pmi_wr_u32(p + 4, (uint32_t)((ids - (p + 8 + ext)) / 4));
        if (ext) {
            pmi_wr_u32(p + 8, (uint32_t)c->ext[i].x);
            pmi_wr_u32(p + 12, (uint32_t)c->ext[i].y);
            pmi_wr_u32(p + 16, (uint32_t)c->ext[i].tok);
        }
        p = ids;
    }
    uint32_t *runs = kv->runs;
    uint32_t nr = pmi_kv_make_runs(cells, n, runs);
    pmi_w_u32(w, kv->v_trans ? 1 : 0);
    pmi_w_u32(w, kv->n_layer);
    if (kv->format >= 11) {
        pmi_w_u32(w, (uint32_t)kv->k_rot);
        pmi_w_u32(w, (uint32_t)kv->v_rot);
    }
    for (uint32_t l = 0; l < kv->n_layer; ++l) {
        const pmi_kv_layer *L = &kv->layers[l];
        pmi_w_i32(w, kv->type_k);
        pmi_w_u64(w, L->k_row);
        write_rows(w, L->k + st * L->k_stream, L->k_row, runs, nr, n);
    }
    for (uint32_t l = 0; l < kv->n_layer; ++l) {
        const pmi_kv_layer *L = &kv->layers[l];
        if (L->v == NULL) {
            continue;
        }
        const uint8_t *vb = L->v + st * L->v_stream;
        pmi_w_i32(w, kv->type_v);
        if (!kv->v_trans) {
            pmi_w_u64(w, L->v_row);
            write_rows(w, vb, L->v_row, runs, nr, n);
        } else {
            pmi_w_u32(w, (uint32_t)L->v_row);
            pmi_w_u32(w, L->n_embd_v_gqa);
            for (uint32_t j = 0; j < L->n_embd_v_gqa; ++j) {
                write_rows(w, vb + (uint64_t)j * kv->size * L->v_row, L->v_row, runs, nr, n);
            }
        }
    }
}

/* bytes write_stream writes for n cells carrying nids sequence ids in all */
static uint64_t stream_bytes(const pmi_kv *kv, uint64_t n, uint64_t nids) {
    if (n == 0) {
        return 4;
    }
    uint64_t b = 4 + n * (8 + (kv->cell_ext ? 12 : 0)) + 4 * nids + 8 + (kv->format >= 11 ? 8 : 0);
    for (uint32_t l = 0; l < kv->n_layer; ++l) {
        const pmi_kv_layer *L = &kv->layers[l];
        b += 12 + L->k_row * n;
        if (L->v != NULL) {
            b += kv->v_trans ? 12 + (uint64_t)L->n_embd_v_gqa * L->v_row * n : 12 + L->v_row * n;
        }
    }
    return b;
}

/* A size query (count-only writer) from the counters alone, without visiting cells; not for
 * one sequence of a sliding-window cache, whose masked cells are left out. */
static bool count_only(const pmi_kv *kv, pmi_writer *w, pm_seq_id seq) {
    if (w->buf != NULL || (seq != -1 && kv->swa_type != PM_SWA_NONE)) {
        return false;
    }
    uint64_t b = 4;
    for (uint32_t st = 0; st < kv->n_stream; ++st) {
        const pmi_cells *c = &kv->cells[st];
        uint64_t n, nids = 0;
        if (seq == -1) {
            n = c->used;
            for (uint32_t q = 0; q < kv->n_seq_max; ++q) {
                nids += c->cnt[q];
            }
        } else {
            n = c->cnt[seq];
            nids = (uint32_t)seq < kv->n_seq_max ? n : 0;
        }
        b += stream_bytes(kv, n, nids);
    }
    pmi_w_reserve(w, b);
    return true;
}

bool pmi_kv_partial_skips(const pmi_kv *kv, uint32_t flags) {
    return (flags & PM_STATE_PARTIAL_ONLY) && kv->swa_type == PM_SWA_NONE;
}

pm_status pmi_kv_state_write(const pmi_kv *kv, pmi_writer *w, pm_seq_id seq, uint32_t flags) {
    if (seq < -1 || seq >= PM_MAX_SEQ) {
        return pmi_fail(PM_E_INVALID_ARG, "state_write: seq_id %d is not -1 or in [0, %d)", seq,
                        PM_MAX_SEQ);
    }
    if (pmi_kv_partial_skips(kv, flags) || count_only(kv, w, seq)) {
        return PM_OK;
    }
    uint32_t *cells = kv->work; /* scratch owned by the cache: a write allocates nothing */
    pmi_w_u32(w, kv->n_stream);
    for (uint32_t st = 0; st < kv->n_stream; ++st) {
        uint32_t n = select_cells(kv, st, seq, cells);
        write_stream(kv, w, st, seq, cells, n);
    }
    return PM_OK;
}
