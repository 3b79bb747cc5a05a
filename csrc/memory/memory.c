/* memory.c - the memory interface: one handle, a table of operations per memory type,
 * llama.cpp's API envelopes, memory contexts (ubatch iteration). */
#include "mem_internal.h"

#include <stdio.h>
#include <stdlib.h>

#define IO_MAGIC 0xAF143CD8u

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

static pm_status tx_begin(pm_memory *m) {
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

static void tx_end(pm_memory *m, bool ok) {
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

#define CHECK_MEM(m)                                                                           \
    do {                                                                                       \
        if ((m) == NULL) {                                                                     \
            return pmi_fail(PM_E_INVALID_ARG, "memory is NULL");                              \
        }                                                                                      \
    } while (0)

pm_status pm_mem_clear(pm_memory *m, bool data) {
    CHECK_MEM(m);
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
    CHECK_MEM(m);
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
    CHECK_MEM(m);
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
    CHECK_MEM(m);
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
    CHECK_MEM(m);
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
    CHECK_MEM(m);
    pm_pos v = -1;
    pm_status st = m->ops->seq_pos_min(m, s, &v);
    if (st == PM_OK && out) {
        *out = v;
    }
    return st;
}

pm_status pm_mem_seq_pos_max(const pm_memory *m, pm_seq_id s, pm_pos *out) {
    CHECK_MEM(m);
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
    CHECK_MEM(m);
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

/* ---- state and envelopes -------------------------------------------------------------------- */

/* The first tensor of m that [p, p + n) overlaps: its name in `what`; false if none.  A state
 * read from (or written into) the memory's own tensors would change its source while
 * copying: refused. */
static bool overlaps_tensors(const pm_memory *m, const uint8_t *p, uint64_t n, char *what, size_t cap) {
    if (p == NULL || n == 0) {
        return false;
    }
    uintptr_t a0 = (uintptr_t)p, a1 = a0 + (uintptr_t)n;
    for (uint32_t k = 0; k < m->n_kv; ++k) {
        const pmi_kv *kv = m->kv[k];
        for (uint32_t l = 0; l < kv->n_layer; ++l) {
            const pmi_kv_layer *L = &kv->layers[l];
            const uint8_t *t[2] = {L->k, L->v};
            uint64_t tn[2] = {L->k_stream * kv->n_stream, L->v_stream * kv->n_stream};
            for (int j = 0; j < 2; ++j) {
                uintptr_t b0 = (uintptr_t)t[j];
                if (t[j] != NULL && tn[j] > 0 && a0 < b0 + (uintptr_t)tn[j] && b0 < a1) {
                    snprintf(what, cap, "%s of layer %u", j ? "V" : "K", L->p.il);
                    return true;
                }
            }
        }
    }
    if (m->rec) {
        const pmi_rec *r = m->rec;
        for (uint32_t l = 0; l < r->n_layer; ++l) {
            const pmi_rec_layer *L = &r->layers[l];
            for (int j = 0; j < 3; ++j) {
                uintptr_t b0 = (uintptr_t)L->data[j];
                uint64_t bn = L->row[j] * r->n_rows;
                if (L->data[j] != NULL && bn > 0 && a0 < b0 + (uintptr_t)bn && b0 < a1) {
                    snprintf(what, cap, "recurrent %c of layer %u", "rsp"[j], L->il);
                    return true;
                }
            }
        }
    }
    return false;
}

static pm_status check_overlap(const pm_memory *m, const uint8_t *p, uint64_t n, const char *op,
                               const char *buf) {
    char what[64];
    if (overlaps_tensors(m, p, n, what, sizeof what)) {
        return pmi_fail(PM_E_INVALID_ARG, "%s: the %s buffer overlaps this memory's own tensors (%s); copy it first",
                        op, buf, what);
    }
    return PM_OK;
}

static pm_status check_flags(uint32_t flags, uint32_t envelope) {
    if (flags & ~(uint32_t)(PM_STATE_PARTIAL_ONLY | PM_STATE_ON_DEVICE)) {
        return pmi_fail(PM_E_INVALID_ARG, "unknown state flags 0x%x", flags);
    }
    if (flags & PM_STATE_ON_DEVICE) {
        return pmi_fail(PM_E_UNSUPPORTED, "the ON_DEVICE state flag is not supported");
    }
    if (envelope != PM_ENVELOPE_NONE && envelope != PM_ENVELOPE_LLAMA) {
        return pmi_fail(PM_E_INVALID_ARG, "unknown envelope %u", envelope);
    }
    return PM_OK;
}

static pm_status write_all(const pm_memory *m, pmi_writer *w, pm_seq_id s, uint32_t flags,
                           uint32_t envelope) {
    pm_status st = check_flags(flags, envelope);
    if (st != PM_OK) {
        return st;
    }
    if (s < -1 || s >= PM_MAX_SEQ) {
        return pmi_fail(PM_E_INVALID_ARG, "state_write: seq_id %d is not -1 or in [0, %d)", s, PM_MAX_SEQ);
    }
    if (envelope == PM_ENVELOPE_LLAMA) {
        if (s == -1) {
            if (m->arch == NULL) {
                return pmi_fail(PM_E_INVALID_ARG,
                                "the llama.cpp context envelope needs the architecture name (arch)");
            }
            uint32_t n = (uint32_t)strlen(m->arch);
            pmi_w_u32(w, n);
            pmi_w_bytes(w, m->arch, n);
        } else {
            pmi_w_u32(w, IO_MAGIC);
            pmi_w_i32(w, s);
        }
    }
    /* sections in order; with PARTIAL_ONLY the caches without a sliding window (plain, base,
     * attention) write nothing and the SWA and recurrent parts everything */
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pm_status st = pmi_kv_state_write(m->kv[p], w, s, flags);
        if (st != PM_OK) {
            return st;
        }
    }
    return m->rec ? pmi_rec_state_write(m->rec, w, s) : PM_OK;
}

/* Parsed sections of one state, one plan per included part. */
typedef struct state_plan {
    pmi_kv_plan kv[2];
    pmi_rec_plan rec;
} state_plan;

static void plan_free(pm_memory *m, state_plan *sp) {
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pmi_kv_plan_free(&sp->kv[p]);
    }
    pmi_rec_plan_free(&sp->rec);
}

static pm_status parse_state(const pm_memory *m, pmi_reader *r, pm_seq_id s, uint32_t flags, state_plan *sp) {
    memset(sp, 0, sizeof(*sp));
    if (m->n_kv > 0) {
        if (s != -1) {
            pm_status st = pmi_kv_check_seq(m->kv[0], s, "state_read");
            if (st != PM_OK) {
                return st;
            }
        }
    }
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pm_status st = pmi_kv_state_parse(m->kv[p], r, s, flags, &sp->kv[p]);
        if (st != PM_OK) {
            if (m->n_kv > 1 || m->rec) {
                pmi_fail_ctx(st, "%s section", m->n_kv == 2 ? (p == 0 ? "base KV" : "SWA KV") : "attention KV");
            }
            return st;
        }
    }
    if (m->rec) {
        pm_status st = pmi_rec_state_parse(m->rec, r, s, &sp->rec);
        if (st != PM_OK) {
            return m->n_kv ? pmi_fail_ctx(st, "recurrent section") : st;
        }
    }
    return PM_OK;
}

pm_status pm_mem_state_size(const pm_memory *m, pm_seq_id s, uint32_t flags, uint32_t envelope,
                            uint64_t *out) {
    CHECK_MEM(m);
    pmi_writer w = {NULL, 0, 0, false};
    pm_status st = write_all(m, &w, s, flags, envelope);
    if (st == PM_OK && out) {
        *out = w.n;
    }
    return st;
}

pm_status pm_mem_state_write(const pm_memory *m, pm_seq_id s, uint32_t flags, uint32_t envelope,
                             uint8_t *dst, uint64_t cap, uint64_t *written) {
    CHECK_MEM(m);
    if (dst == NULL && cap > 0) {
        return pmi_fail(PM_E_INVALID_ARG, "dst is NULL");
    }
    pm_status st = check_overlap(m, dst, cap, "state_write", "destination");
    if (st != PM_OK) {
        return st;
    }
    pmi_writer w = {dst ? dst : (uint8_t *)"", cap, 0, false};
    st = write_all(m, &w, s, flags, envelope);
    if (st != PM_OK) {
        return st;
    }
    if (written) {
        *written = w.n;
    }
    if (w.overflow || w.n > cap) {
        return pmi_fail(PM_E_BUFFER_SMALL, "the state needs %llu bytes, the buffer has %llu",
                        (unsigned long long)w.n, (unsigned long long)cap);
    }
    return PM_OK;
}

/* Read llama.cpp's envelope (if any) in front of the memory section. */
static pm_status read_envelope(const pm_memory *m, pmi_reader *r, pm_seq_id s, uint32_t envelope) {
    if (envelope != PM_ENVELOPE_LLAMA) {
        return PM_OK;
    }
    if (s == -1) {
        uint32_t n;
        const uint8_t *name;
        if (!pmi_r_u32(r, &n, "architecture name length") || !pmi_r_span(r, n, &name, "architecture name")) {
            return PM_E_FORMAT;
        }
        if (m->arch != NULL && (strlen(m->arch) != n || memcmp(m->arch, name, n) != 0)) {
            return pmi_fail(PM_E_FORMAT, "wrong model arch: '%.*s' instead of '%s' (offset %llu)",
                            (int)(n > 64 ? 64 : n), (const char *)name, m->arch,
                            (unsigned long long)(r->off - n));
        }
        return PM_OK;
    }
    uint32_t magic;
    int32_t src_seq;
    if (!pmi_r_u32(r, &magic, "sequence state magic")) {
        return PM_E_FORMAT;
    }
    if (magic != IO_MAGIC) {
        return pmi_fail(PM_E_FORMAT, "wrong sequence state magic 0x%08x (expected 0x%08x) (offset %llu)", magic,
                        IO_MAGIC, (unsigned long long)(r->off - 4));
    }
    if (!pmi_r_i32(r, &src_seq, "source seq id")) {
        return PM_E_FORMAT;
    }
    return PM_OK;
}

static pm_status check_all(const pm_memory *m, pm_seq_id s, uint32_t flags, uint32_t envelope,
                           pmi_reader *r) {
    pm_status st = check_flags(flags, envelope);
    if (st == PM_OK) {
        st = read_envelope(m, r, s, envelope);
    }
    if (st == PM_OK) {
        state_plan sp;
        st = parse_state(m, r, s, flags, &sp);
        plan_free((pm_memory *)m, &sp);
    }
    return st;
}

pm_status pm_mem_state_check(const pm_memory *m, pm_seq_id s, uint32_t flags, uint32_t envelope,
                             const uint8_t *src, uint64_t len, uint64_t *consumed) {
    CHECK_MEM(m);
    if (src == NULL && len > 0) {
        return pmi_fail(PM_E_INVALID_ARG, "src is NULL");
    }
    pmi_reader r = {src ? src : (const uint8_t *)"", len, 0};
    pm_status st = check_all(m, s, flags, envelope, &r);
    if (st == PM_OK && consumed) {
        *consumed = r.off;
    }
    return st;
}

/* Apply parsed sections: cells of every part first (in a transaction when a part can still
 * fail), then the tensor bytes, so a failure leaves no trace. */
static pm_status apply_state(pm_memory *m, state_plan *sp, pm_seq_id s) {
    bool need_tx = s != -1 || m->n_kv + (m->rec != NULL) > 1;
    pm_status st = need_tx ? tx_begin(m) : PM_OK;
    if (st != PM_OK) {
        return st;
    }
    for (uint32_t p = 0; p < m->n_kv && st == PM_OK; ++p) {
        st = pmi_kv_state_meta(m->kv[p], &sp->kv[p]);
    }
    if (st == PM_OK && m->rec) {
        st = pmi_rec_state_meta(m->rec, &sp->rec);
    }
    if (need_tx) {
        tx_end(m, st == PM_OK);
    }
    if (st != PM_OK) {
        return st;
    }
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pmi_kv_state_data(m->kv[p], &sp->kv[p]);
    }
    if (m->rec) {
        pmi_rec_state_data(m->rec, &sp->rec);
    }
    return PM_OK;
}

pm_status pm_mem_state_read(pm_memory *m, pm_seq_id s, uint32_t flags, uint32_t envelope,
                            const uint8_t *src, uint64_t len, bool allow_trailing, uint64_t *consumed) {
    CHECK_MEM(m);
    if (src == NULL && len > 0) {
        return pmi_fail(PM_E_INVALID_ARG, "src is NULL");
    }
    pm_status st = check_flags(flags, envelope);
    if (st == PM_OK) {
        st = check_overlap(m, src, len, "state_read", "source");
    }
    if (st != PM_OK) {
        return st;
    }
    pmi_reader r = {src ? src : (const uint8_t *)"", len, 0};
    st = read_envelope(m, &r, s, envelope);
    state_plan sp;
    if (st == PM_OK) {
        st = parse_state(m, &r, s, flags, &sp);
        if (st == PM_OK && !allow_trailing && r.off != len) {
            st = pmi_fail(PM_E_FORMAT, "%llu trailing bytes after the state (offset %llu of %llu)",
                          (unsigned long long)(len - r.off), (unsigned long long)r.off, (unsigned long long)len);
        }
        if (st == PM_OK) {
            st = apply_state(m, &sp, s);
        }
        plan_free(m, &sp);
    }
    if (st == PM_OK) {
        m->gen++;
        if (consumed) {
            *consumed = r.off;
        }
    }
    return st;
}

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
    if (tx && (st = tx_begin(m)) != PM_OK) {
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
        tx_end(m, st == PM_OK);
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
    CHECK_MEM(m);
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
    st = tx_begin(m);
    if (st == PM_OK) {
        st = m->ops->init_batch(m, &ba, n_ubatch, embd_all, ctx);
        tx_end(m, st == PM_OK);
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
    CHECK_MEM(m);
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

static pm_status check_ub(const pm_mctx *ctx, uint32_t i) {
    if (ctx == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "context is NULL");
    }
    if (i >= ctx->n_ubatch) {
        return pmi_fail(PM_E_INVALID_ARG, "ubatch %u of %u", i, ctx->n_ubatch);
    }
    return PM_OK;
}

/* the latest applied ubatch, with nothing else changed in the memory since */
static pm_status check_current(const pm_mctx *ctx, uint32_t i, const char *what) {
    pm_status st = check_ub(ctx, i);
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
    pm_status st = check_ub(ctx, i);
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
    pm_status st = check_ub(ctx, i);
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
    pm_status st = check_ub(ctx, i);
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
    pm_status st = check_ub(ctx, i);
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
    pm_status st = check_current(ctx, i, "store");
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
            return pmi_kv_store(kv, &ctx->slots[part][i], l, k, v, is_f32, ub->n_tokens);
        }
    }
    return pmi_fail(PM_E_INVALID_ARG, "model layer %u is not held by this memory's KV cache", il);
}

pm_status pm_mctx_kq_mask(const pm_mctx *ctx, uint32_t i, uint32_t part, bool causal, int32_t non_causal,
                          bool alibi, float *out, uint64_t cap, uint32_t *n_kv) {
    pm_status st = check_current(ctx, i, "kq_mask");
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

/* ==========================================================================================
 * KV inspection
 * ======================================================================================== */

static pm_status get_part(const pm_memory *m, uint32_t part, pmi_kv **out) {
    CHECK_MEM(m);
    *out = part < m->n_kv ? m->kv[part] : NULL;
    if (*out == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "this memory has no KV part %u", part);
    }
    return PM_OK;
}

pm_status pm_kv_info_get(const pm_memory *m, uint32_t part, pm_kv_info *out) {
    pmi_kv *kv;
    pm_status st = get_part(m, part, &kv);
    if (st != PM_OK) {
        return st;
    }
    memset(out, 0, sizeof(*out));
    out->size = kv->size;
    out->n_stream = kv->n_stream;
    out->n_seq_max = kv->n_seq_max;
    out->n_layer = kv->n_layer;
    out->n_layer_model = kv->n_layer_model;
    out->type_k = kv->type_k;
    out->type_v = kv->type_v;
    out->v_trans = kv->v_trans;
    out->n_swa = kv->n_swa;
    out->swa_type = kv->swa_type;
    out->n_pos_per_embd = kv->n_pos_per_embd;
    out->cell_ext = kv->cell_ext;
    out->n_embd_v_gqa_max = kv->n_embd_v_gqa_max;
    out->k_rot = kv->k_rot;
    out->v_rot = kv->v_rot;
    out->format = kv->format;
    return PM_OK;
}

pm_status pm_kv_layer_info_get(const pm_memory *m, uint32_t part, uint32_t layer, pm_kv_layer_info *out) {
    pmi_kv *kv;
    pm_status st = get_part(m, part, &kv);
    if (st != PM_OK) {
        return st;
    }
    if (layer >= kv->n_layer) {
        return pmi_fail(PM_E_INVALID_ARG, "layer index %u of %u", layer, kv->n_layer);
    }
    const pmi_kv_layer *L = &kv->layers[layer];
    out->il = L->p.il;
    out->n_embd_k_gqa = L->n_embd_k_gqa;
    out->n_embd_v_gqa = L->n_embd_v_gqa;
    out->k_row_bytes = L->k_row;
    out->v_row_bytes = L->v_row;
    out->k_stream_bytes = L->k_stream;
    out->v_stream_bytes = L->v_stream;
    return PM_OK;
}

pm_status pm_kv_tensor(pm_memory *m, uint32_t part, uint32_t layer, uint32_t stream, uint32_t which,
                       uint8_t **ptr, uint64_t *nbytes) {
    pmi_kv *kv;
    pm_status st = get_part(m, part, &kv);
    if (st != PM_OK) {
        return st;
    }
    if (layer >= kv->n_layer || stream >= kv->n_stream || which > 1) {
        return pmi_fail(PM_E_INVALID_ARG, "layer %u / stream %u / tensor %u out of range", layer, stream,
                        which);
    }
    const pmi_kv_layer *L = &kv->layers[layer];
    if (which == 1 && L->v == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "layer %u has no V tensor", L->p.il);
    }
    uint64_t sb = which ? L->v_stream : L->k_stream;
    *ptr = (which ? L->v : L->k) + stream * sb;
    *nbytes = sb;
    return PM_OK;
}

pm_status pm_kv_cells_get(const pm_memory *m, uint32_t part, uint32_t stream, pm_pos *pos,
                          int32_t *shift, uint64_t *seq_bits, int32_t *ext) {
    pmi_kv *kv;
    pm_status st = get_part(m, part, &kv);
    if (st != PM_OK) {
        return st;
    }
    if (stream >= kv->n_stream) {
        return pmi_fail(PM_E_INVALID_ARG, "stream %u of %u", stream, kv->n_stream);
    }
    const pmi_cells *c = &kv->cells[stream];
    if (pos) {
        memcpy(pos, c->pos, sizeof(pm_pos) * c->size);
    }
    if (shift) {
        memcpy(shift, c->shift, sizeof(int32_t) * c->size);
    }
    if (seq_bits) {
        memcpy(seq_bits, c->seq, sizeof(uint64_t) * PMI_SEQ_WORDS * c->size);
    }
    if (ext) {
        memcpy(ext, c->ext, sizeof(pmi_ext) * c->size);
    }
    return PM_OK;
}

pm_status pm_kv_stream_get(const pm_memory *m, uint32_t part, uint32_t stream, uint32_t *head,
                           uint32_t *used, uint32_t *used_max_p1, bool *has_shift) {
    pmi_kv *kv;
    pm_status st = get_part(m, part, &kv);
    if (st != PM_OK) {
        return st;
    }
    if (stream >= kv->n_stream) {
        return pmi_fail(PM_E_INVALID_ARG, "stream %u of %u", stream, kv->n_stream);
    }
    const pmi_cells *c = &kv->cells[stream];
    if (head) {
        *head = kv->head[stream];
    }
    if (used) {
        *used = c->used;
    }
    if (used_max_p1) {
        *used_max_p1 = pmi_cells_used_max_p1(c);
    }
    if (has_shift) {
        *has_shift = c->has_shift;
    }
    return PM_OK;
}

/* ==========================================================================================
 * Recurrent inspection and state rows
 * ======================================================================================== */

static pm_status get_rec(const pm_memory *m, pmi_rec **out) {
    CHECK_MEM(m);
    *out = m->rec;
    if (*out == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "this memory has no recurrent part");
    }
    return PM_OK;
}

pm_status pm_rec_info_get(const pm_memory *m, pm_rec_info *out) {
    pmi_rec *r;
    pm_status st = get_rec(m, &r);
    if (st != PM_OK) {
        return st;
    }
    memset(out, 0, sizeof(*out));
    out->size = r->size;
    out->n_seq_max = r->n_seq_max;
    out->n_rs_seq = r->n_rs_seq;
    out->n_layer = r->n_layer;
    out->n_layer_model = r->n_layer_model;
    out->type_r = r->type_r;
    out->type_s = r->type_s;
    out->head = r->head;
    out->n = r->n;
    out->used = r->used;
    out->rs_z = r->rs_z;
    return PM_OK;
}

pm_status pm_rec_layer_info_get(const pm_memory *m, uint32_t layer, pm_rec_layer_info *out) {
    pmi_rec *r;
    pm_status st = get_rec(m, &r);
    if (st != PM_OK) {
        return st;
    }
    if (layer >= r->n_layer) {
        return pmi_fail(PM_E_INVALID_ARG, "recurrent layer index %u of %u", layer, r->n_layer);
    }
    out->il = r->layers[layer].il;
    for (int t = 0; t < 3; ++t) {
        out->row_bytes[t] = r->layers[layer].row[t];
    }
    out->n_rows = r->n_rows;
    return PM_OK;
}

pm_status pm_rec_cells_get(const pm_memory *m, pm_pos *pos, int32_t *src, int32_t *src0, int32_t *tail,
                           uint64_t *seq_bits, uint32_t *rs_idx) {
    pmi_rec *r;
    pm_status st = get_rec(m, &r);
    if (st != PM_OK) {
        return st;
    }
    for (uint32_t i = 0; i < r->size; ++i) {
        const pmi_rcell *c = &r->cells[i];
        if (pos) {
            pos[i] = c->pos;
        }
        if (src) {
            src[i] = c->src;
        }
        if (src0) {
            src0[i] = c->src0;
        }
        if (tail) {
            tail[i] = c->tail;
        }
        if (seq_bits) {
            memcpy(seq_bits + 4 * (size_t)i, c->seq, sizeof(c->seq));
        }
    }
    if (rs_idx) {
        memcpy(rs_idx, r->rs_idx, sizeof(uint32_t) * r->n_seq_max);
    }
    return PM_OK;
}

pm_status pm_rec_tensor(pm_memory *m, uint32_t layer, uint32_t which, uint8_t **ptr, uint64_t *nbytes) {
    pmi_rec *r;
    pm_status st = get_rec(m, &r);
    if (st != PM_OK) {
        return st;
    }
    if (layer >= r->n_layer || which > 2) {
        return pmi_fail(PM_E_INVALID_ARG, "recurrent layer %u / tensor %u out of range", layer, which);
    }
    const pmi_rec_layer *L = &r->layers[layer];
    if (L->data[which] == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "layer %u has no %s rows", L->il, which == 0 ? "r" : which == 1 ? "s" : "p");
    }
    *ptr = L->data[which];
    *nbytes = L->row[which] * r->n_rows;
    return PM_OK;
}

pm_status pm_mctx_rec_range(const pm_mctx *ctx, uint32_t i, uint32_t *head, uint32_t *n) {
    pm_status st = check_ub(ctx, i);
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
    pm_status st = check_current(ctx, i, "store_rs");
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
                memcpy(L->data[t] + (uint64_t)ctx->rec_head[i] * L->row[t], src[t], (size_t)len[t]);
            }
        }
        return PM_OK;
    }
    return pmi_fail(PM_E_INVALID_ARG, "model layer %u is not a recurrent layer of this memory", il);
}
