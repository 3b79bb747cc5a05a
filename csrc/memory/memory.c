/* memory.c - the memory interface: one handle, a table of operations per memory type,
 * construction, transactions over every part, the generic entry points.  Memory contexts are
 * in mctx.c, inspection in inspect.c, states and llama.cpp's envelopes in state/envelope.c. */
#include "memory/memory.h"

#include <stdio.h>
#include <stdlib.h>

/* ==========================================================================================
 * Construction
 * ======================================================================================== */

static char *dup_str(const char *s) {
    if (s == NULL) {
        return NULL;
    }
    size_t n = strlen(s);
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n + 1);
    }
    return d;
}

static void destroy_parts(pm_memory *m) {
    for (uint32_t p = 0; p < 2; ++p) {
        pmi_kv_destroy(m->kv[p]);
    }
    pmi_rec_destroy(m->rec);
    free(m->rec_tmp);
}

static pm_status compat(const pm_kv_params *a, const pm_kv_params *b, const pm_rec_params *r) {
    if (a && b && (a->n_seq_max != b->n_seq_max || (a->unified != 0) != (b->unified != 0))) {
        return pmi_fail(PM_E_INVALID_ARG, "the KV parts must agree on n_seq_max and unified");
    }
    if (a && r && a->n_seq_max != r->n_seq_max) {
        return pmi_fail(PM_E_INVALID_ARG, "attention n_seq_max %u != recurrent n_seq_max %u", a->n_seq_max,
                        r->n_seq_max);
    }
    if (a && r && a->n_layer_model != r->n_layer_model) {
        return pmi_fail(PM_E_INVALID_ARG, "attention and recurrent parts disagree on the model's layer count");
    }
    return PM_OK;
}

static pm_status make(int32_t kind, const pmi_mem_ops *ops, const pm_kv_params *k0, const pm_kv_params *k1,
                      const pm_rec_params *rp, pm_memory **out) {
    if (out == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "out is NULL");
    }
    *out = NULL;
    pm_status st = compat(k0, k1, rp);
    if (st != PM_OK) {
        return st;
    }
    pm_memory *m = calloc(1, sizeof(*m));
    if (m == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    m->ops = ops;
    m->kind = kind;
    const pm_kv_params *kp[2] = {k0, k1};
    for (uint32_t p = 0; p < 2 && st == PM_OK; ++p) {
        if (kp[p] != NULL) {
            st = pmi_kv_create(kp[p], &m->kv[p]);
            if (st != PM_OK) {
                pmi_fail_ctx(st, "%s", kind == PM_MEM_KV ? "KV cache" : p == 0 && k1 ? "base cache"
                                       : p == 1 ? "SWA cache" : "attention cache");
            }
            m->n_kv = p + 1;
        }
    }
    if (st == PM_OK && rp != NULL) {
        st = pmi_rec_create(rp, &m->rec);
        if (st == PM_OK) {
            m->rec_tmp = malloc((size_t)(pmi_rec_max_row(m->rec) * m->rec->size));
            if (m->rec_tmp == NULL) {
                st = pmi_fail(PM_E_NOMEM, "out of memory");
            }
        }
    }
    const char *arch = k0 ? k0->arch : rp ? rp->arch : NULL;
    if (st == PM_OK && arch != NULL && (m->arch = dup_str(arch)) == NULL) {
        st = pmi_fail(PM_E_NOMEM, "out of memory");
    }
    if (st != PM_OK) {
        destroy_parts(m);
        free(m->arch);
        free(m);
        return st;
    }
    m->n_seq_max = k0 ? k0->n_seq_max : rp->n_seq_max;
    m->n_pos_per_embd = k0 ? k0->n_pos_per_embd : 1;
    *out = m;
    return PM_OK;
}

pm_status pm_kv_new(const pm_kv_params *params, pm_memory **out) {
    if (params == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "params is NULL");
    }
    return make(PM_MEM_KV, &pmi_ops_kv, params, NULL, NULL, out);
}

pm_status pm_iswa_new(const pm_kv_params *base, const pm_kv_params *swa, pm_memory **out) {
    if (base == NULL || swa == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "params is NULL");
    }
    return make(PM_MEM_ISWA, &pmi_ops_iswa, base, swa, NULL, out);
}

pm_status pm_recurrent_new(const pm_rec_params *params, pm_memory **out) {
    if (params == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "params is NULL");
    }
    return make(PM_MEM_RECURRENT, &pmi_ops_rec, NULL, NULL, params, out);
}

pm_status pm_hybrid_new(const pm_kv_params *attn, const pm_rec_params *rec, pm_memory **out) {
    if (attn == NULL || rec == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "params is NULL");
    }
    return make(PM_MEM_HYBRID, &pmi_ops_hybrid, attn, NULL, rec, out);
}

pm_status pm_hybrid_iswa_new(const pm_kv_params *base, const pm_kv_params *swa, const pm_rec_params *rec,
                             pm_memory **out) {
    if (base == NULL || swa == NULL || rec == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "params is NULL");
    }
    return make(PM_MEM_HYBRID_ISWA, &pmi_ops_hybrid_iswa, base, swa, rec, out);
}

uint32_t pm_mem_breakdown(const pm_memory *m, pm_breakdown *out, uint32_t cap) {
    if (m == NULL) {
        return 0;
    }
    uint32_t n = 0;
    for (uint32_t p = 0; p < m->n_kv; ++p, ++n) {
        const pmi_kv *kv = m->kv[p];
        if (n < cap && out) {
            pm_breakdown *b = &out[n];
            memset(b, 0, sizeof(*b));
            b->part_kind = PM_MEM_KV;
            b->cells = kv->size;
            b->n_stream = kv->n_stream;
            b->n_layer = kv->n_layer;
            for (uint32_t l = 0; l < kv->n_layer; ++l) {
                b->bytes[0] += kv->layers[l].k_stream * kv->n_stream;
                b->bytes[1] += kv->layers[l].v_stream * kv->n_stream;
            }
            for (uint32_t s = 0; s < kv->n_stream; ++s) {
                b->bytes[2] += pmi_cells_nbytes(&kv->cells[s]);
            }
        }
    }
    if (m->rec) {
        if (n < cap && out) {
            const pmi_rec *r = m->rec;
            pm_breakdown *b = &out[n];
            memset(b, 0, sizeof(*b));
            b->part_kind = PM_MEM_RECURRENT;
            b->cells = r->size;
            b->n_stream = 1;
            b->n_layer = r->n_layer;
            for (uint32_t l = 0; l < r->n_layer; ++l) {
                b->bytes[0] += (r->layers[l].row[0] + r->layers[l].row[2]) * r->n_rows;
                b->bytes[1] += r->layers[l].row[1] * r->n_rows;
            }
            b->bytes[2] = (uint64_t)r->size * sizeof(pmi_rcell) + (uint64_t)r->n_seq_max * sizeof(uint32_t);
        }
        n++;
    }
    return n;
}

uint32_t pm_memory_n_kv(const pm_memory *m) { return m ? m->n_kv : 0; }
bool pm_memory_has_rec(const pm_memory *m) { return m && m->rec != NULL; }

/* ==========================================================================================
 * Transactions over every part
 * ======================================================================================== */

pm_status pmi_mem_tx_begin(pm_memory *m) {
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pm_status st = pmi_kv_tx_begin(m->kv[p]);
        if (st != PM_OK) {
            for (uint32_t q = 0; q < p; ++q) {
                pmi_kv_tx_commit(m->kv[q]);
            }
            return st;
        }
    }
    if (m->rec) {
        pmi_rec_tx_begin(m->rec);
    }
    return PM_OK;
}

void pmi_mem_tx_end(pm_memory *m, bool ok) {
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        if (ok) {
            pmi_kv_tx_commit(m->kv[p]);
        } else {
            pmi_kv_tx_rollback(m->kv[p]);
        }
    }
    if (m->rec && !ok) {
        pmi_rec_tx_rollback(m->rec);
    }
}

/* ==========================================================================================
 * Generic entry points
 * ======================================================================================== */

void pm_memory_free(pm_memory *m) {
    if (m == NULL) {
        return;
    }
    destroy_parts(m);
    free(m->arch);
    free(m);
}

int32_t pm_memory_kind(const pm_memory *m) { return m ? m->kind : 0; }

uint64_t pm_memory_nbytes(const pm_memory *m) {
    if (m == NULL) {
        return 0;
    }
    uint64_t n = sizeof(*m);
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        n += pmi_kv_nbytes(m->kv[p]);
    }
    if (m->rec) {
        n += pmi_rec_nbytes(m->rec) + pmi_rec_max_row(m->rec) * m->rec->size;
    }
    return n;
}

pm_status pm_mem_clear(pm_memory *m, bool data) {
    PMI_CHECK_MEM(m);
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pmi_kv_clear(m->kv[p], data);
    }
    if (m->rec) {
        pmi_rec_clear(m->rec, data);
    }
    m->gen++;
    return PM_OK;
}

pm_status pm_mem_seq_rm(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, bool *out) {
    PMI_CHECK_MEM(m);
    bool res = false;
    pm_status st = m->ops->seq_rm(m, s, p0, p1, &res);
    if (st == PM_OK) {
        m->gen++;
        if (out) {
            *out = res;
        }
    }
    return st;
}

pm_status pm_mem_seq_cp(pm_memory *m, pm_seq_id a, pm_seq_id b, pm_pos p0, pm_pos p1) {
    PMI_CHECK_MEM(m);
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pm_status st = pmi_kv_seq_cp_prepare(m->kv[p], a, b, p0, p1);
        if (st != PM_OK) {
            return st;
        }
    }
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pmi_kv_seq_cp(m->kv[p], a, b, p0, p1);
    }
    if (m->rec) {
        pmi_rec_seq_cp(m->rec, a, b);
    }
    m->gen++;
    return PM_OK;
}

pm_status pm_mem_seq_keep(pm_memory *m, pm_seq_id s) {
    PMI_CHECK_MEM(m);
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pm_status st = pmi_kv_check_seq(m->kv[p], s, "seq_keep");
        if (st != PM_OK) {
            return st;
        }
    }
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pmi_kv_seq_keep(m->kv[p], s);
    }
    if (m->rec) {
        pmi_rec_seq_keep(m->rec, s);
    }
    m->gen++;
    return PM_OK;
}

/* seq_add (div = false) or seq_div (div = true): every part is checked before any changes */
static pm_status pos_op(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, int32_t v, bool div) {
    PMI_CHECK_MEM(m);
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pm_status st = div ? pmi_kv_seq_div_check(m->kv[p], s, p0, p1, v) : pmi_kv_seq_add_check(m->kv[p], s, p0, p1, v);
        if (st != PM_OK) {
            return st;
        }
    }
    if (m->rec) {
        pm_status st = div ? pmi_rec_seq_div(m->rec, s, p0, p1, v, true) : pmi_rec_seq_add(m->rec, s, p0, p1, v, true);
        if (st != PM_OK) {
            return st;
        }
    }
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        if (div) {
            pmi_kv_seq_div(m->kv[p], s, p0, p1, v);
        } else {
            pmi_kv_seq_add(m->kv[p], s, p0, p1, v);
        }
    }
    if (m->rec) {
        if (div) {
            pmi_rec_seq_div(m->rec, s, p0, p1, v, false);
        } else {
            pmi_rec_seq_add(m->rec, s, p0, p1, v, false);
        }
    }
    m->gen++;
    return PM_OK;
}

pm_status pm_mem_seq_add(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d) {
    return pos_op(m, s, p0, p1, d, false);
}

pm_status pm_mem_seq_div(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, int32_t d) {
    return pos_op(m, s, p0, p1, d, true);
}

pm_status pm_mem_seq_pos_min(const pm_memory *m, pm_seq_id s, pm_pos *out) {
    PMI_CHECK_MEM(m);
    pm_pos v = -1;
    pm_status st = m->ops->seq_pos_min(m, s, &v);
    if (st == PM_OK && out) {
        *out = v;
    }
    return st;
}

pm_status pm_mem_seq_pos_max(const pm_memory *m, pm_seq_id s, pm_pos *out) {
    PMI_CHECK_MEM(m);
    pm_pos v = -1;
    pm_status st = m->ops->seq_pos_max(m, s, &v);
    if (st == PM_OK && out) {
        *out = v;
    }
    return st;
}

bool pm_mem_can_shift(const pm_memory *m) { return m ? m->ops->can_shift(m) : false; }

bool pm_mem_update_pending(const pm_memory *m) {
    if (m == NULL) {
        return false;
    }
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        if (pmi_kv_update_pending(m->kv[p])) {
            return true;
        }
    }
    return false;
}

pm_status pm_mem_update(pm_memory *m, bool *did) {
    PMI_CHECK_MEM(m);
    if (did) {
        *did = false;
    }
    if (!pm_mem_update_pending(m)) {
        return PM_OK;
    }
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pm_status st = pmi_kv_update_check(m->kv[p]);
        if (st != PM_OK) {
            return st;
        }
    }
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pmi_kv_update(m->kv[p]);
    }
    m->gen++;
    if (did) {
        *did = true;
    }
    return PM_OK;
}

/* The first tensor of m that [p, p + n) overlaps: its name in `what`; false if none.  A state
 * read from (or written into) the memory's own tensors would change its source while
 * copying: refused. */
bool pmi_mem_overlaps(const pm_memory *m, const void *p, uint64_t n, char *what, size_t cap) {
    if (p == NULL || n == 0) {
        return false;
    }
    uintptr_t a0 = (uintptr_t)p, a1 = a0 + (uintptr_t)n;
    for (uint32_t k = 0; k < m->n_kv; ++k) {
        const pmi_kv *kv = m->kv[k];
        for (uint32_t l = 0; l < kv->n_layer; ++l) {
            const pmi_kv_layer *L = &kv->layers[l];
            const uint8_t *t[2] = {[PMI_KV_K] = L->k, [PMI_KV_V] = L->v};
            uint64_t tn[2] = {L->k_stream * kv->n_stream, L->v_stream * kv->n_stream};
            for (int j = 0; j < 2; ++j) {
                uintptr_t b0 = (uintptr_t)t[j];
                if (t[j] != NULL && tn[j] > 0 && a0 < b0 + (uintptr_t)tn[j] && b0 < a1) {
                    if (what) {
                        snprintf(what, cap, "%s of layer %u", j ? "V" : "K", L->p.il);
                    }
                    return true;
                }
            }
        }
    }
    if (m->rec) {
        const pmi_rec *r = m->rec;
        for (uint32_t l = 0; l < r->n_layer; ++l) {
            const pmi_rec_layer *L = &r->layers[l];
            for (int j = 0; j < PMI_REC_NROW; ++j) {
                uintptr_t b0 = (uintptr_t)L->data[j];
                uint64_t bn = L->row[j] * r->n_rows;
                if (L->data[j] != NULL && bn > 0 && a0 < b0 + (uintptr_t)bn && b0 < a1) {
                    if (what) {
                        snprintf(what, cap, "recurrent %c of layer %u", "rsp"[j], L->il);
                    }
                    return true;
                }
            }
        }
    }
    return false;
}
