/* composite.c - the operation table of each memory kind: how llama.cpp's memories combine
 * their parts (SPEC sections 2.5, 5, 6, 7).
 *
 *   kind          parts            seq_rm                pos min/max        batch split
 *   KV            kv0              kv0                   kv0                simple (1 stream) / equal(seq)
 *   iSWA          base, swa        base & swa            swa                simple, then equal(!unified)
 *   recurrent     rec              rec                   rec                equal(seq, tail) / seq
 *   hybrid        attn, rec        rec, then attn        max / min          equal(!unified, tail) / seq
 *   hybrid-iSWA   base, swa, rec   rec, then base & swa  max / min (swa)    equal(!unified, tail) / seq
 */
#include "memory/memory.h"

#include <stdlib.h>

/* ---- seq_rm ------------------------------------------------------------------------------------ */

static pm_status kv_parts_rm(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, bool *out) {
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        if (s != -1) {
            pm_status st = pmi_kv_check_seq(m->kv[p], s, "seq_rm");
            if (st != PM_OK) {
                return st;
            }
        }
    }
    bool res = true;
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        bool r = true;
        pm_status st = pmi_kv_seq_rm(m->kv[p], s, p0, p1, &r);
        if (st != PM_OK) {
            return st; /* unreachable: checked above */
        }
        res = res && r;
    }
    *out = res;
    return PM_OK;
}

static pm_status rec_rm(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, bool *out) {
    *out = pmi_rec_seq_rm(m->rec, s, p0, p1);
    return PM_OK;
}

static pm_status hybrid_rm(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, bool *out) {
    /* the recurrent part decides first: a refused partial removal changes neither part (an id
     * the recurrent part accepts is < n_seq_max, hence valid for the attention part too) */
    if (!pmi_rec_seq_rm(m->rec, s, p0, p1)) {
        *out = false;
        return PM_OK;
    }
    return kv_parts_rm(m, s, p0, p1, out);
}

/* ---- positions ------------------------------------------------------------------------------- */

static pm_status kv0_min(const pm_memory *m, pm_seq_id s, pm_pos *out) { return pmi_kv_seq_pos_min(m->kv[0], s, out); }
static pm_status kv0_max(const pm_memory *m, pm_seq_id s, pm_pos *out) { return pmi_kv_seq_pos_max(m->kv[0], s, out); }
/* iSWA: the SWA cache answers (the base cache is a superset) */
static pm_status swa_min(const pm_memory *m, pm_seq_id s, pm_pos *out) {
    pm_status st = pmi_kv_check_seq(m->kv[0], s, "seq_pos_min");
    return st == PM_OK ? pmi_kv_seq_pos_min(m->kv[1], s, out) : st;
}
static pm_status swa_max(const pm_memory *m, pm_seq_id s, pm_pos *out) {
    pm_status st = pmi_kv_check_seq(m->kv[0], s, "seq_pos_max");
    return st == PM_OK ? pmi_kv_seq_pos_max(m->kv[1], s, out) : st;
}
static pm_status rec_min(const pm_memory *m, pm_seq_id s, pm_pos *out) {
    *out = pmi_rec_seq_pos_min(m->rec, s);
    return PM_OK;
}
static pm_status rec_max(const pm_memory *m, pm_seq_id s, pm_pos *out) {
    *out = pmi_rec_seq_pos_max(m->rec, s);
    return PM_OK;
}
/* hybrid: max of the mins and min of the maxes (a part without s makes the max -1) */
static pm_status hybrid_min(const pm_memory *m, pm_seq_id s, pm_pos *out) {
    pm_pos a;
    pm_status st = m->n_kv == 2 ? swa_min(m, s, &a) : kv0_min(m, s, &a);
    if (st == PM_OK) {
        pm_pos b = pmi_rec_seq_pos_min(m->rec, s);
        *out = PMI_MAX(a, b);
    }
    return st;
}
static pm_status hybrid_max(const pm_memory *m, pm_seq_id s, pm_pos *out) {
    pm_pos a;
    pm_status st = m->n_kv == 2 ? swa_max(m, s, &a) : kv0_max(m, s, &a);
    if (st == PM_OK) {
        pm_pos b = pmi_rec_seq_pos_max(m->rec, s);
        *out = PMI_MIN(a, b);
    }
    return st;
}

/* ---- can_shift -------------------------------------------------------------------------------- */

static bool kv0_shift(const pm_memory *m) { return pmi_kv_can_shift(m->kv[0]); }
static bool iswa_shift(const pm_memory *m) {
    return pmi_kv_can_shift(m->kv[0]) && pmi_kv_can_shift(m->kv[1]) && m->kv[0]->size == m->kv[1]->size;
}
static bool rec_shift(const pm_memory *m) {
    (void)m;
    return true;
}

/* ---- batches ------------------------------------------------------------------------------------ */

typedef enum { SPLIT_SIMPLE, SPLIT_EQUAL, SPLIT_SEQ } split_kind;

/* Split a validated batch until it runs dry.  PM_E_NO_SLOT if tokens remain (llama.cpp's
 * FAILED_PREPARE, decode returns 1). */
static pm_status split_all(pmi_balloc *ba, uint32_t n_ubatch, split_kind kind, bool sequential,
                           uint32_t n_keep_tail, pmi_ubatch **out, uint32_t *n_out) {
    uint32_t cap = 4, n = 0;
    pmi_ubatch *ubs = malloc(sizeof(pmi_ubatch) * cap);
    if (ubs == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    pmi_balloc_reset(ba);
    pm_status st = PM_OK;
    for (;;) {
        if (n == cap) {
            pmi_ubatch *g = realloc(ubs, sizeof(pmi_ubatch) * cap * 2);
            if (g == NULL) {
                st = pmi_fail(PM_E_NOMEM, "out of memory");
                break;
            }
            ubs = g;
            cap *= 2;
        }
        pmi_ubatch ub;
        switch (kind) {
        case SPLIT_SIMPLE:
            st = pmi_split_simple(ba, n_ubatch, &ub);
            break;
        case SPLIT_EQUAL:
            st = pmi_split_equal(ba, n_ubatch, sequential, n_keep_tail, &ub);
            break;
        default:
            st = pmi_split_seq(ba, n_ubatch, &ub);
            break;
        }
        if (st != PM_OK || ub.n_tokens == 0) {
            pmi_ubatch_free(&ub);
            break;
        }
        ubs[n++] = ub;
    }
    if (st == PM_OK && ba->n_used != ba->n_tokens) {
        st = pmi_fail(PM_E_NO_SLOT,
                      ba->has_cpl && kind == SPLIT_EQUAL && sequential
                          ? "tokens shared by several sequences cannot be split sequentially (llama.cpp returns 1)"
                          : "the batch could not be split into ubatches (llama.cpp returns 1)");
    }
    if (st != PM_OK) {
        for (uint32_t u = 0; u < n; ++u) {
            pmi_ubatch_free(&ubs[u]);
        }
        free(ubs);
        return st;
    }
    *out = ubs;
    *n_out = n;
    return PM_OK;
}

static void free_ubs(pmi_ubatch *ubs, uint32_t n) {
    for (uint32_t u = 0; u < n; ++u) {
        pmi_ubatch_free(&ubs[u]);
    }
    free(ubs);
}

/* Dry-run placement of the ubatches in every part; on failure the slots are freed (the
 * caller's transaction undoes llama.cpp's side effects). */
static pm_status prepare_parts(pm_memory *m, pm_mctx *ctx) {
    pm_status st = PM_OK;
    if (m->rec != NULL) {
        st = pmi_rec_prepare(m->rec, ctx->ubs, ctx->n_ubatch);
        if (st != PM_OK) {
            return pmi_fail_ctx(st, "recurrent");
        }
    }
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        st = pmi_kv_prepare(m->kv[p], ctx->ubs, ctx->n_ubatch, ctx->slots[p]);
        if (st != PM_OK) {
            for (uint32_t q = 0; q < p; ++q) {
                for (uint32_t u = 0; u < ctx->n_ubatch; ++u) {
                    pmi_slot_free(&ctx->slots[q][u]);
                }
            }
            return st;
        }
    }
    return PM_OK;
}

/* One attempt: split, then prepare every part.  The context keeps the ubatches on success. */
static pm_status attempt(pm_memory *m, pmi_balloc *ba, uint32_t n_ubatch, split_kind kind, bool sequential,
                         uint32_t tail, pm_mctx *ctx) {
    pmi_ubatch *ubs = NULL;
    uint32_t n = 0;
    pm_status st = split_all(ba, n_ubatch, kind, sequential, tail, &ubs, &n);
    if (st != PM_OK) {
        return st;
    }
    st = pmi_mctx_alloc(ctx, n, m->n_kv);
    if (st == PM_OK) {
        ctx->ubs = ubs;
        st = prepare_parts(m, ctx);
        if (st != PM_OK) {
            ctx->ubs = NULL;
        }
    }
    if (st != PM_OK) {
        free_ubs(ubs, n);
        ctx->n_ubatch = 0;
    }
    return st;
}

static uint32_t keep_tail(const pm_memory *m) {
    return m->rec && m->rec->n_rs_seq > 0 ? m->rec->n_rs_seq + 1 : 0;
}

static pm_status kv_init(pm_memory *m, pmi_balloc *ba, uint32_t n_ubatch, bool embd_all, pm_mctx *ctx) {
    (void)embd_all;
    bool one = m->kv[0]->n_stream == 1;
    return attempt(m, ba, n_ubatch, one ? SPLIT_SIMPLE : SPLIT_EQUAL, true, 0, ctx);
}

static pm_status iswa_init(pm_memory *m, pmi_balloc *ba, uint32_t n_ubatch, bool embd_all, pm_mctx *ctx) {
    (void)embd_all;
    bool unified = m->kv[0]->unified;
    if (unified) {
        /* attempt 1: simple split; its SWA purges stay even when attempt 2 succeeds */
        pm_status st = attempt(m, ba, n_ubatch, SPLIT_SIMPLE, false, 0, ctx);
        if (st != PM_E_NO_SLOT) {
            return st; /* placed, or a hard error */
        }
    }
    return attempt(m, ba, n_ubatch, SPLIT_EQUAL, !unified, 0, ctx);
}

static pm_status rec_init(pm_memory *m, pmi_balloc *ba, uint32_t n_ubatch, bool embd_all, pm_mctx *ctx) {
    if (embd_all) {
        return attempt(m, ba, n_ubatch, SPLIT_SEQ, false, 0, ctx);
    }
    return attempt(m, ba, n_ubatch, SPLIT_EQUAL, true, keep_tail(m), ctx);
}

static pm_status hybrid_init(pm_memory *m, pmi_balloc *ba, uint32_t n_ubatch, bool embd_all, pm_mctx *ctx) {
    if (embd_all) {
        return attempt(m, ba, n_ubatch, SPLIT_SEQ, false, 0, ctx);
    }
    return attempt(m, ba, n_ubatch, SPLIT_EQUAL, m->kv[0]->n_stream != 1, keep_tail(m), ctx);
}

const pmi_mem_ops pmi_ops_kv = {kv_parts_rm, kv0_min, kv0_max, kv0_shift, kv_init};
const pmi_mem_ops pmi_ops_iswa = {kv_parts_rm, swa_min, swa_max, iswa_shift, iswa_init};
const pmi_mem_ops pmi_ops_rec = {rec_rm, rec_min, rec_max, rec_shift, rec_init};
const pmi_mem_ops pmi_ops_hybrid = {hybrid_rm, hybrid_min, hybrid_max, kv0_shift, hybrid_init};
const pmi_mem_ops pmi_ops_hybrid_iswa = {hybrid_rm, hybrid_min, hybrid_max, iswa_shift, hybrid_init};
