/* mctx.c - memory contexts: one batch split into ubatches with their placements (llama.cpp's
 * init_batch and memory context), applied in order; token data, cells, K/V and recurrent
 * rows, KQ mask of each applied ubatch.
 */
#include "memory/memory.h"

#include <stdio.h>
#include <stdlib.h>

/* ==========================================================================================
 * Batches and memory contexts
 * ======================================================================================== */

static void mctx_arrays_free(pm_mctx *ctx) {
    for (uint32_t p = 0; p < 2; ++p) {
        free(ctx->slots[p]);
        free(ctx->n_kv[p]);
        ctx->slots[p] = NULL;
        ctx->n_kv[p] = NULL;
    }
    free(ctx->rec_head);
    free(ctx->rec_n);
    ctx->rec_head = ctx->rec_n = NULL;
}

pm_status pmi_mctx_alloc(pm_mctx *ctx, uint32_t n_ubatch, uint32_t n_parts) {
    mctx_arrays_free(ctx);
    ctx->n_ubatch = n_ubatch;
    ctx->n_parts = n_parts;
    size_t n = n_ubatch ? n_ubatch : 1;
    bool ok = true;
    for (uint32_t p = 0; p < n_parts; ++p) {
        ctx->slots[p] = calloc(n, sizeof(pmi_slot));
        ctx->n_kv[p] = calloc(n, sizeof(uint32_t));
        ok = ok && ctx->slots[p] && ctx->n_kv[p];
    }
    ctx->rec_head = calloc(n, sizeof(uint32_t));
    ctx->rec_n = calloc(n, sizeof(uint32_t));
    if (!ok || !ctx->rec_head || !ctx->rec_n) {
        mctx_arrays_free(ctx);
        ctx->n_ubatch = 0;
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    return PM_OK;
}

void pm_mctx_free(pm_mctx *ctx) {
    if (ctx == NULL) {
        return;
    }
    for (uint32_t u = 0; u < ctx->n_ubatch; ++u) {
        if (ctx->ubs) {
            pmi_ubatch_free(&ctx->ubs[u]);
        }
        for (uint32_t p = 0; p < ctx->n_parts; ++p) {
            if (ctx->slots[p]) {
                pmi_slot_free(&ctx->slots[p][u]);
            }
        }
    }
    mctx_arrays_free(ctx);
    free(ctx->ubs);
    free(ctx);
}

/* Place ubatch i in every part, as llama.cpp's memory context apply() does. */
static pm_status ctx_apply(pm_memory *m, pm_mctx *ctx, uint32_t i) {
    pm_status st = PM_OK;
    bool tx = m->n_kv + (m->rec != NULL) > 1;
    if (tx && (st = pmi_mem_tx_begin(m)) != PM_OK) {
        return st;
    }
    for (uint32_t p = 0; p < m->n_kv && st == PM_OK; ++p) {
        st = pmi_kv_apply_ubatch(m->kv[p], &ctx->slots[p][i], &ctx->ubs[i]);
        if (st == PM_OK) {
            ctx->n_kv[p][i] = pmi_kv_n_kv(m->kv[p], &ctx->slots[p][i]);
        }
    }
    if (st == PM_OK && m->rec) {
        st = pmi_rec_find_slot(m->rec, &ctx->ubs[i]);
    }
    if (tx) {
        pmi_mem_tx_end(m, st == PM_OK);
    }
    if (st == PM_OK && m->rec) {
        ctx->rec_head[i] = m->rec->head;
        ctx->rec_n[i] = m->rec->n;
        pmi_rec_move_states(m->rec, m->rec_tmp);
    }
    return st;
}

pm_status pm_mem_init_batch(pm_memory *m, const pm_batch *batch, uint32_t n_ubatch, uint32_t n_vocab,
                            bool embd_all, pm_mctx **out) {
    PMI_CHECK_MEM(m);
    if (batch == NULL || out == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "batch or out is NULL");
    }
    *out = NULL;
    if (n_ubatch == 0) {
        return pmi_fail(PM_E_INVALID_ARG, "n_ubatch must be > 0");
    }
    if (pm_mem_update_pending(m)) {
        return pmi_fail(PM_E_STATE,
                        "a K-shift or stream copy is pending: call update() first (llama.cpp does before a decode)");
    }
    pmi_balloc ba;
    pm_status st = pmi_balloc_init(&ba, batch, m, m->n_seq_max, m->n_pos_per_embd, n_vocab, embd_all);
    if (st != PM_OK) {
        return st;
    }
    pm_mctx *ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL) {
        pmi_balloc_free(&ba);
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    ctx->mem = m;
    st = pmi_mem_tx_begin(m);
    if (st == PM_OK) {
        st = m->ops->init_batch(m, &ba, n_ubatch, embd_all, ctx);
        pmi_mem_tx_end(m, st == PM_OK);
    }
    pmi_balloc_free(&ba);
    if (st != PM_OK) {
        pm_mctx_free(ctx);
        return st;
    }
    m->gen++;
    ctx->gen = m->gen;
    *out = ctx;
    return PM_OK;
}

pm_status pm_mem_check_batch(const pm_memory *m, const pm_batch *batch, uint32_t n_vocab, bool embd_all) {
    PMI_CHECK_MEM(m);
    if (batch == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "batch is NULL");
    }
    pmi_balloc ba;
    pm_status st = pmi_balloc_init(&ba, batch, m, m->n_seq_max, m->n_pos_per_embd, n_vocab, embd_all);
    if (st == PM_OK) {
        pmi_balloc_free(&ba);
    }
    return st;
}

uint32_t pm_mctx_n_ubatch(const pm_mctx *ctx) { return ctx ? ctx->n_ubatch : 0; }

pm_status pmi_mctx_check_ub(const pm_mctx *ctx, uint32_t i) {
    if (ctx == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "context is NULL");
    }
    if (i >= ctx->n_ubatch) {
        return pmi_fail(PM_E_INVALID_ARG, "ubatch %u of %u", i, ctx->n_ubatch);
    }
    return PM_OK;
}

/* the latest applied ubatch, with nothing else changed in the memory since */
pm_status pmi_mctx_check_current(const pm_mctx *ctx, uint32_t i, const char *what) {
    pm_status st = pmi_mctx_check_ub(ctx, i);
    if (st != PM_OK) {
        return st;
    }
    if (ctx->next == 0 || i != ctx->next - 1) {
        return pmi_fail(PM_E_STATE, "%s: ubatch %u is not the latest applied one", what, i);
    }
    if (ctx->gen != ctx->mem->gen) {
        return pmi_fail(PM_E_STATE, "%s: the memory changed since ubatch %u was applied", what, i);
    }
    return PM_OK;
}

pm_status pm_mctx_ubatch_info(const pm_mctx *ctx, uint32_t i, pm_ubatch_info *out) {
    pm_status st = pmi_mctx_check_ub(ctx, i);
    if (st != PM_OK) {
        return st;
    }
    const pmi_ubatch *ub = &ctx->ubs[i];
    memset(out, 0, sizeof(*out));
    out->n_tokens = ub->n_tokens;
    out->n_seq_tokens = ub->n_seq_tokens;
    out->n_seqs = ub->n_seqs;
    out->n_seqs_unq = ub->n_seqs_unq;
    out->equal_seqs = ub->equal_seqs;
    out->n_stream = ctx->n_parts > 0 ? ctx->slots[0][i].n_stream : 0;
    out->applied = i < ctx->next;
    out->n_kv = out->applied && ctx->n_parts > 0 ? ctx->n_kv[0][i] : 0;
    return PM_OK;
}

pm_status pm_mctx_ubatch_tokens(const pm_mctx *ctx, uint32_t i, uint32_t *batch_idx, pm_pos *pos,
                                pm_seq_id *seq, int8_t *output) {
    pm_status st = pmi_mctx_check_ub(ctx, i);
    if (st != PM_OK) {
        return st;
    }
    const pmi_ubatch *ub = &ctx->ubs[i];
    for (uint32_t t = 0; t < ub->n_tokens; ++t) {
        if (batch_idx) {
            batch_idx[t] = ub->idx[t];
        }
        if (pos) {
            pos[t] = ub->pos[t];
        }
        if (seq) {
            seq[t] = pmi_ub_primary(ub, t);
        }
        if (output) {
            output[t] = ub->output[t];
        }
    }
    return PM_OK;
}

pm_status pm_mctx_apply(pm_mctx *ctx, uint32_t i) {
    pm_status st = pmi_mctx_check_ub(ctx, i);
    if (st != PM_OK) {
        return st;
    }
    if (i != ctx->next) {
        return pmi_fail(PM_E_STATE, "ubatches must be applied in order: expected %u, got %u", ctx->next, i);
    }
    if (ctx->gen != ctx->mem->gen) {
        return pmi_fail(PM_E_STATE, "the memory changed since init_batch: this context is stale");
    }
    st = ctx_apply(ctx->mem, ctx, i);
    if (st != PM_OK) {
        return st;
    }
    ctx->next++;
    ctx->mem->gen++;
    ctx->gen = ctx->mem->gen;
    return PM_OK;
}

pm_status pm_mctx_cells(const pm_mctx *ctx, uint32_t i, uint32_t part, uint32_t *streams,
                        uint32_t *cells) {
    pm_status st = pmi_mctx_check_ub(ctx, i);
    if (st != PM_OK) {
        return st;
    }
    if (part >= ctx->n_parts) {
        return pmi_fail(PM_E_INVALID_ARG, "part %u of %u", part, ctx->n_parts);
    }
    const pmi_slot *si = &ctx->slots[part][i];
    if (streams) {
        memcpy(streams, si->strm, sizeof(uint32_t) * si->n_stream);
    }
    if (cells) {
        memcpy(cells, si->idxs, sizeof(uint32_t) * (size_t)si->n_stream * si->n_per);
    }
    return PM_OK;
}

pm_status pm_mctx_store(pm_mctx *ctx, uint32_t i, uint32_t il, const void *k, uint64_t k_len,
                        const void *v, uint64_t v_len, bool is_f32) {
    pm_status st = pmi_mctx_check_current(ctx, i, "store");
    if (st != PM_OK) {
        return st;
    }
    const pmi_ubatch *ub = &ctx->ubs[i];
    for (uint32_t part = 0; part < ctx->n_parts; ++part) {
        pmi_kv *kv = ctx->mem->kv[part];
        for (uint32_t l = 0; l < kv->n_layer; ++l) {
            const pmi_kv_layer *L = &kv->layers[l];
            if (L->p.il != il) {
                continue;
            }
            uint64_t kn = is_f32 ? (uint64_t)ub->n_tokens * L->n_embd_k_gqa * 4 : ub->n_tokens * L->k_row;
            uint64_t vr = kv->v_trans ? L->v_row * L->n_embd_v_gqa : L->v_row;
            uint64_t vn = is_f32 ? (uint64_t)ub->n_tokens * L->n_embd_v_gqa * 4 : ub->n_tokens * vr;
            if (k != NULL && k_len != kn) {
                return pmi_fail(PM_E_INVALID_ARG, "layer %u: K needs %llu bytes for %u tokens, got %llu", il,
                                (unsigned long long)kn, ub->n_tokens, (unsigned long long)k_len);
            }
            if (v != NULL && v_len != vn) {
                return pmi_fail(PM_E_INVALID_ARG, "layer %u: V needs %llu bytes for %u tokens, got %llu", il,
                                (unsigned long long)vn, ub->n_tokens, (unsigned long long)v_len);
            }
            /* rows taken from this memory's own tensors (numpy views) are copied first: the
             * store must not read what it is overwriting */
            void *kc = NULL, *vc = NULL;
            if (k != NULL && kn > 0 && pmi_mem_overlaps(ctx->mem, k, kn, NULL, 0)) {
                if ((kc = malloc((size_t)kn)) == NULL) {
                    return pmi_fail(PM_E_NOMEM, "out of memory");
                }
                k = memcpy(kc, k, (size_t)kn);
            }
            if (v != NULL && vn > 0 && pmi_mem_overlaps(ctx->mem, v, vn, NULL, 0)) {
                if ((vc = malloc((size_t)vn)) == NULL) {
                    free(kc);
                    return pmi_fail(PM_E_NOMEM, "out of memory");
                }
                v = memcpy(vc, v, (size_t)vn);
            }
            st = pmi_kv_store(kv, &ctx->slots[part][i], l, k, v, is_f32, ub->n_tokens);
            free(kc);
            free(vc);
            return st;
        }
    }
    return pmi_fail(PM_E_INVALID_ARG, "model layer %u is not held by this memory's KV cache", il);
}

pm_status pm_mctx_kq_mask(const pm_mctx *ctx, uint32_t i, uint32_t part, bool causal, int32_t non_causal,
                          bool alibi, float *out, uint64_t cap, uint32_t *n_kv) {
    pm_status st = pmi_mctx_check_current(ctx, i, "kq_mask");
    if (st != PM_OK) {
        return st;
    }
    if (part >= ctx->n_parts) {
        return pmi_fail(PM_E_INVALID_ARG, "part %u of %u", part, ctx->n_parts);
    }
    pmi_kv *kv = ctx->mem->kv[part];
    uint32_t nk = ctx->n_kv[part][i];
    const pmi_ubatch *ub = &ctx->ubs[i];
    if (n_kv) {
        *n_kv = nk;
    }
    uint64_t need = (uint64_t)ub->n_tokens * nk;
    if (out == NULL || cap < need) {
        return pmi_fail(PM_E_BUFFER_SMALL, "the mask needs %llu floats", (unsigned long long)need);
    }
    return pmi_kv_kq_mask(kv, &ctx->slots[part][i], ub, causal, non_causal, alibi, out, nk);
}

pm_status pm_mctx_rec_range(const pm_mctx *ctx, uint32_t i, uint32_t *head, uint32_t *n) {
    pm_status st = pmi_mctx_check_ub(ctx, i);
    if (st != PM_OK) {
        return st;
    }
    if (ctx->mem->rec == NULL || i >= ctx->next) {
        return pmi_fail(PM_E_STATE, "ubatch %u has no applied recurrent range", i);
    }
    if (head) {
        *head = ctx->rec_head[i];
    }
    if (n) {
        *n = ctx->rec_n[i];
    }
    return PM_OK;
}

pm_status pm_mctx_store_rs(pm_mctx *ctx, uint32_t i, uint32_t il, const void *rr, uint64_t r_len,
                           const void *ss, uint64_t s_len) {
    pm_status st = pmi_mctx_check_current(ctx, i, "store_rs");
    if (st != PM_OK) {
        return st;
    }
    pmi_rec *r = ctx->mem->rec;
    if (r == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "this memory has no recurrent part");
    }
    uint32_t n_seqs = ctx->ubs[i].n_seqs;
    for (uint32_t l = 0; l < r->n_layer; ++l) {
        pmi_rec_layer *L = &r->layers[l];
        if (L->il != il) {
            continue;
        }
        const void *src[2] = {rr, ss};
        uint64_t len[2] = {r_len, s_len};
        for (int t = 0; t < 2; ++t) {
            if (src[t] != NULL && len[t] != L->row[t] * n_seqs) {
                return pmi_fail(PM_E_INVALID_ARG, "layer %u: %s needs %llu bytes for %u sequences, got %llu", il,
                                t ? "s" : "r", (unsigned long long)(L->row[t] * n_seqs), n_seqs,
                                (unsigned long long)len[t]);
            }
        }
        for (int t = 0; t < 2; ++t) {
            if (src[t] != NULL && len[t] > 0) {
                /* memmove: the rows may come from this memory's own tensor (a numpy view) */
                memmove(L->data[t] + (uint64_t)ctx->rec_head[i] * L->row[t], src[t], (size_t)len[t]);
            }
        }
        return PM_OK;
    }
    return pmi_fail(PM_E_INVALID_ARG, "model layer %u is not a recurrent layer of this memory", il);
}
