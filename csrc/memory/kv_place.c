/* kv_place.c - where a ubatch goes in the KV cache and what it writes there (SPEC sections
 * 4.3-4.9): slot search, placement (apply), dry-run placement (prepare), n_kv, K/V rows, the
 * KQ mask.
 */
#include "memory/kv_cache.h"
#include "kernels/kernels.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* ---- slot search and placement ------------------------------------------------------------- */

void pmi_slot_free(pmi_slot *si) {
    free(si->idxs);
    si->idxs = NULL;
    si->n_stream = si->n_per = 0;
}

pm_status pmi_kv_find_slot(const pmi_kv *kv, const pmi_ubatch *ub, pmi_slot *out) {
    uint32_t n_tokens = ub->n_tokens, n_seqs = 1;
    out->idxs = NULL;
    out->n_stream = out->n_per = 0;
    if (kv->n_stream > 1) {
        if (ub->n_seqs_unq == 0 || n_tokens % ub->n_seqs_unq != 0) {
            return pmi_fail(PM_E_INVALID_ARG, "a multi-stream cache needs an equal split ubatch");
        }
        n_seqs = ub->n_seqs_unq;
        n_tokens /= n_seqs;
    }
    if (n_tokens > kv->size) {
        return pmi_fail(PM_E_NO_SLOT, "%u tokens do not fit in %u cells", n_tokens, kv->size);
    }
    out->idxs = malloc(sizeof(uint32_t) * (size_t)n_seqs * n_tokens + 1);
    if (out->idxs == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    out->n_stream = n_seqs;
    out->n_per = n_tokens;
    for (uint32_t s = 0; s < n_seqs; ++s) {
        pm_seq_id seq = ub->seq_id_unq[s];
        if (kv->n_stream > 1) {
            uint32_t t0 = s * n_tokens;
            if (pmi_ub_n_seq_id(ub, t0) != 1 || pmi_ub_primary(ub, t0) != seq) {
                pmi_slot_free(out);
                return pmi_fail(PM_E_INVALID_ARG, "ubatch sequence set %u is not the single sequence %d", s, seq);
            }
        }
        if (!pmi_kv_seq_valid(kv, seq)) {
            pmi_slot_free(out);
            return pmi_fail(PM_E_INVALID_ARG, "seq_id %d out of range", seq);
        }
        uint32_t st = pmi_kv_stream(kv, seq);
        out->strm[s] = st;
        const pmi_cells *c = &kv->cells[st];
        uint32_t *dst = out->idxs + (size_t)s * n_tokens;
        uint32_t n_found = 0;
        uint32_t head = kv->head[st];
        if (head > c->used + 2 * n_tokens) {
            head = 0;
        }
        uint32_t n_tested = 0;
        for (;;) {
            if (head + 1 > c->size) {
                n_tested += c->size - head;
                head = 0;
                continue;
            }
            uint32_t idx = head++;
            n_tested++;
            bool can_use = c->pos[idx] == -1;
            if (!can_use && kv->swa_type != PM_SWA_NONE && pmi_cells_seq_count(c, idx) == 1) {
                pm_seq_id owner = pmi_cells_seq_get(c, idx);
                can_use = pmi_is_masked_swa(kv->n_swa, kv->swa_type, c->pos[idx],
                                        pmi_wrap_i32((int64_t)pmi_cells_seq_pos_max(c, owner) + 1));
            }
            if (can_use) {
                dst[n_found++] = idx;
                if (n_found == n_tokens) {
                    break;
                }
            }
            if (n_tested >= c->size) {
                break;
            }
        }
        if (n_found < n_tokens) {
            pmi_slot_free(out);
            return pmi_fail(PM_E_NO_SLOT, "no room for %u tokens of seq %d in stream %u (%u/%u cells used)",
                            n_tokens, seq, st, c->used, c->size);
        }
    }
    return PM_OK;
}

static pm_status reserve_for(pmi_kv *kv, const pmi_slot *si, const pmi_ubatch *ub) {
    for (uint32_t g = 0; g < si->n_stream; ++g) {
        uint64_t need = 0;
        for (uint32_t ii = 0; ii < si->n_per; ++ii) {
            need += pmi_ub_n_seq_id(ub, g * si->n_per + ii);
        }
        pm_status st = pmi_cells_reserve(&kv->cells[si->strm[g]], need);
        if (st != PM_OK) {
            return st;
        }
    }
    return PM_OK;
}

pm_status pmi_kv_apply_ubatch(pmi_kv *kv, const pmi_slot *si, const pmi_ubatch *ub) {
    pm_status st = reserve_for(kv, si, ub);
    if (st != PM_OK) {
        return st;
    }
    pm_pos rm_max[PM_MAX_SEQ];
    bool any_rm = false;
    for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
        rm_max[s] = -1;
    }
    bool is_2d = ub->n_pos >= 3;
    bool set_ext = is_2d || ub->has_token;
    for (uint32_t g = 0; g < si->n_stream; ++g) {
        pmi_cells *c = &kv->cells[si->strm[g]];
        /* tokens of one sequence in a row join its index in bulk (kv->work holds their cells) */
        pm_seq_id run_s = -1;
        uint32_t run_n = 0;
        for (uint32_t ii = 0; ii < si->n_per; ++ii) {
            uint32_t t = g * si->n_per + ii;
            uint32_t idx = si->idxs[(size_t)g * si->n_per + ii];
            if (c->pos[idx] != -1) {
                pm_seq_id owner = pmi_cells_seq_get(c, idx);
                if (owner >= 0) {
                    rm_max[owner] = PMI_MAX(rm_max[owner], c->pos[idx]);
                    any_rm = true;
                }
                pmi_cells_rm(c, idx);
            }
            pmi_cells_pos_set(c, idx, ub->pos[t]);
            if (set_ext) {
                pmi_ext e = {0, 0, -1};
                if (is_2d) {
                    e.x = ub->pos[t + 2 * ub->n_tokens];
                    e.y = ub->pos[t + ub->n_tokens];
                }
                if (ub->has_token) {
                    e.tok = ub->token[t];
                }
                pmi_cells_ext_set(c, idx, e);
            }
            uint32_t k0 = ub->seq_off[t], k1 = ub->seq_off[t + 1];
            if (k1 - k0 == 1 && (ub->seq_id[k0] == run_s || run_n == 0)) {
                run_s = ub->seq_id[k0];
                kv->work[run_n++] = idx;
                continue;
            }
            if (run_n > 0) {
                pmi_cells_seq_add_many(c, run_s, kv->work, run_n);
                run_n = 0;
            }
            if (k1 - k0 == 1) {
                run_s = ub->seq_id[k0];
                kv->work[run_n++] = idx;
                continue;
            }
            for (uint32_t k = k0; k < k1; ++k) {
                pmi_cells_seq_add(c, idx, ub->seq_id[k]);
            }
        }
        if (run_n > 0) {
            pmi_cells_seq_add_many(c, run_s, kv->work, run_n);
        }
    }
    if (any_rm) {
        for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
            if (rm_max[s] == -1) {
                continue;
            }
            if ((uint32_t)s >= kv->seq_to_stream_len) {
                continue; /* llama.cpp asserts; unreachable for cells placed by batches */
            }
            const pmi_cells *c = &kv->cells[pmi_kv_stream(kv, (pm_seq_id)s)];
            pm_pos pmin = pmi_cells_seq_pos_min(c, (pm_seq_id)s);
            if (pmin <= rm_max[s]) {
                pmi_kv_seq_remove(kv, (pm_seq_id)s, pmin, rm_max[s] + 1);
            }
        }
    }
    for (uint32_t g = 0; g < si->n_stream; ++g) {
        kv->head[si->strm[g]] = si->idxs[(size_t)g * si->n_per + si->n_per - 1] + 1;
    }
    return PM_OK;
}

pm_status pmi_kv_prepare(pmi_kv *kv, const pmi_ubatch *ubs, uint32_t n, pmi_slot *slots) {
    /* llama.cpp: place each ubatch for real, then undo in reverse order by restoring the
     * slot cells and the heads saved before each placement */
    uint32_t **heads = calloc(n ? n : 1, sizeof(uint32_t *));
    pmi_cellsnap **snaps = calloc(n ? n : 1, sizeof(pmi_cellsnap *));
    pm_status st = PM_OK;
    uint32_t done = 0;
    if (heads == NULL || snaps == NULL) {
        free(heads);
        free(snaps);
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    for (uint32_t u = 0; u < n; ++u) {
        st = pmi_kv_find_slot(kv, &ubs[u], &slots[u]);
        if (st != PM_OK) {
            break;
        }
        size_t ncell = (size_t)slots[u].n_stream * slots[u].n_per;
        heads[u] = malloc(sizeof(uint32_t) * kv->n_stream);
        snaps[u] = malloc(sizeof(pmi_cellsnap) * (ncell ? ncell : 1));
        if (heads[u] == NULL || snaps[u] == NULL) {
            free(heads[u]);
            free(snaps[u]);
            pmi_slot_free(&slots[u]);
            st = pmi_fail(PM_E_NOMEM, "out of memory");
            break;
        }
        memcpy(heads[u], kv->head, sizeof(uint32_t) * kv->n_stream);
        for (uint32_t g = 0; g < slots[u].n_stream; ++g) {
            pmi_cells_snap(&kv->cells[slots[u].strm[g]], slots[u].idxs + (size_t)g * slots[u].n_per,
                           slots[u].n_per, snaps[u] + (size_t)g * slots[u].n_per);
        }
        done = u + 1;
        st = pmi_kv_apply_ubatch(kv, &slots[u], &ubs[u]);
        if (st != PM_OK) {
            break;
        }
    }
    for (uint32_t u = done; u-- > 0;) {
        for (uint32_t g = 0; g < slots[u].n_stream; ++g) {
            uint32_t strm = slots[u].strm[g];
            pmi_cells_set(&kv->cells[strm], slots[u].idxs + (size_t)g * slots[u].n_per,
                          slots[u].n_per, snaps[u] + (size_t)g * slots[u].n_per);
            kv->head[strm] = heads[u][strm];
        }
        free(heads[u]);
        free(snaps[u]);
    }
    free(heads);
    free(snaps);
    if (st != PM_OK) {
        for (uint32_t u = 0; u < done; ++u) {
            pmi_slot_free(&slots[u]);
        }
    }
    return st;
}

uint32_t pmi_kv_n_kv(const pmi_kv *kv, const pmi_slot *si) {
    const uint32_t n_pad = 256;
    uint32_t res = 0;
    for (uint32_t g = 0; g < si->n_stream; ++g) {
        uint32_t used_p1 = pmi_cells_used_max_p1(&kv->cells[si->strm[g]]);
        uint32_t padded = ((used_p1 + n_pad - 1) / n_pad) * n_pad;
        uint32_t v = PMI_MIN(kv->size, PMI_MAX(n_pad, padded));
        res = PMI_MAX(res, v);
    }
    return res;
}

/* ---- K/V rows ---------------------------------------------------------------------------- */

pm_status pmi_kv_store(pmi_kv *kv, const pmi_slot *si, uint32_t layer, const void *k,
                       const void *v, bool is_f32, uint32_t n_tokens) {
    pmi_kv_layer *L = &kv->layers[layer];
    if (v != NULL && L->v == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "layer %u has no V tensor", L->p.il);
    }
    if (is_f32) {
        int32_t types[2] = {kv->type_k, kv->type_v};
        for (int w = 0; w < 2; ++w) {
            int32_t t = types[w];
            if ((w == 0 ? k : v) != NULL && t != PM_TYPE_F32 && t != PM_TYPE_F16 &&
                t != PM_TYPE_BF16 && t != PM_TYPE_Q8_0) {
                return pmi_fail(PM_E_UNSUPPORTED,
                                "float32 rows convert to f32/f16/bf16/q8_0 only; pass raw %s rows",
                                pm_type_name(t));
            }
        }
    }
    float *tmp = NULL;
    if (is_f32 && v != NULL && kv->v_trans && kv->type_v != PM_TYPE_F32) {
        tmp = malloc(sizeof(uint16_t) * (L->n_embd_v_gqa ? L->n_embd_v_gqa : 1));
        if (tmp == NULL) {
            return pmi_fail(PM_E_NOMEM, "out of memory");
        }
    }
    (void)n_tokens;
    for (uint32_t g = 0; g < si->n_stream; ++g) {
        uint32_t strm = si->strm[g];
        uint8_t *kb = L->k + strm * L->k_stream;
        uint8_t *vb = L->v ? L->v + strm * L->v_stream : NULL;
        for (uint32_t ii = 0; ii < si->n_per; ++ii) {
            uint32_t t = g * si->n_per + ii;
            uint32_t cell = si->idxs[(size_t)g * si->n_per + ii];
            if (k != NULL) {
                uint8_t *dst = kb + cell * L->k_row;
                if (is_f32) {
                    pm_type_from_float(kv->type_k, (const float *)k + (size_t)t * L->n_embd_k_gqa, dst,
                                       L->n_embd_k_gqa);
                } else {
                    memcpy(dst, (const uint8_t *)k + (size_t)t * L->k_row, (size_t)L->k_row);
                }
            }
            if (v != NULL) {
                if (!kv->v_trans) {
                    uint8_t *dst = vb + cell * L->v_row;
                    if (is_f32) {
                        pm_type_from_float(kv->type_v, (const float *)v + (size_t)t * L->n_embd_v_gqa,
                                           dst, L->n_embd_v_gqa);
                    } else {
                        memcpy(dst, (const uint8_t *)v + (size_t)t * L->v_row,
                               (size_t)(L->v_row));
                    }
                } else {
                    /* scatter one row into column `cell` of the transposed tensor */
                    uint64_t el = L->v_row;
                    const uint8_t *src;
                    if (is_f32 && kv->type_v != PM_TYPE_F32) {
                        pm_type_from_float(kv->type_v, (const float *)v + (size_t)t * L->n_embd_v_gqa,
                                           tmp, L->n_embd_v_gqa);
                        src = (const uint8_t *)tmp;
                    } else if (is_f32) {
                        src = (const uint8_t *)((const float *)v + (size_t)t * L->n_embd_v_gqa);
                    } else {
                        src = (const uint8_t *)v + (size_t)t * L->n_embd_v_gqa * el;
                    }
                    for (uint32_t j = 0; j < L->n_embd_v_gqa; ++j) {
                        memcpy(vb + ((uint64_t)j * kv->size + cell) * el, src + j * el, (size_t)el);
                    }
                }
            }
        }
    }
    free(tmp);
    return PM_OK;
}

/* ---- KQ mask ------------------------------------------------------------------------------ */

pm_status pmi_kv_kq_mask(const pmi_kv *kv, const pmi_slot *si, const pmi_ubatch *ub,
                         bool causal, int32_t non_causal, bool alibi, float *out, uint32_t n_kv) {
    const pmk_table *K = pmk_get();
    if (!causal && non_causal == PM_NON_CAUSAL_SWA_ONLY) {
        causal = kv->swa_type == PM_SWA_NONE;
    }
    pm_pos seq_min[PM_MAX_SEQ];
    for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
        seq_min[s] = INT32_MAX;
    }
    for (uint32_t t = 0; t < ub->n_tokens; ++t) {
        pm_seq_id q = pmi_ub_primary(ub, t);
        seq_min[q] = PMI_MIN(seq_min[q], ub->pos[t]);
    }
    uint32_t nw = (n_kv + 63) / 64;
    uint64_t *member = calloc(nw ? nw : 1, sizeof(uint64_t));
    if (member == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    bool is_2d = ub->n_pos >= 3;
    pm_seq_id cur = -1;
    uint32_t cur_strm = PMI_NONE;
    for (uint32_t t = 0; t < ub->n_tokens; ++t) {
        pm_seq_id q = pmi_ub_primary(ub, t);
        uint32_t strm = pmi_kv_stream(kv, q);
        const pmi_cells *c = &kv->cells[strm];
        if (q != cur || strm != cur_strm) {
            memset(member, 0, sizeof(uint64_t) * nw);
            for (uint32_t j = 0; j < n_kv; ++j) {
                if (pmi_cells_seq_has(c, j, q)) {
                    member[j >> 6] |= 1ULL << (j & 63);
                }
            }
            cur = q;
            cur_strm = strm;
        }
        pmk_mask_row r;
        r.p1 = ub->pos[t];
        r.causal = causal;
        r.swa_type = kv->swa_type;
        r.n_swa = kv->n_swa;
        r.span_min = (!causal && non_causal == PM_NON_CAUSAL_SWA_FULL) ? seq_min[q] : INT32_MAX;
        r.alibi = alibi;
        float *row = out + (size_t)t * n_kv;
        K->mask_row(row, c->pos, member, n_kv, &r);
        if (causal && is_2d) {
            pm_pos p1x = ub->pos[t + 2 * ub->n_tokens], p1y = ub->pos[t + ub->n_tokens];
            for (uint32_t j = 0; j < n_kv; ++j) {
                if (c->pos[j] == r.p1 && ((member[j >> 6] >> (j & 63)) & 1)) {
                    const pmi_ext *e = &c->ext[j];
                    if (e->y > p1y || (e->y == p1y && e->x > p1x)) {
                        row[j] = -INFINITY;
                    }
                }
            }
        }
    }
    (void)si;
    free(member);
    return PM_OK;
}
