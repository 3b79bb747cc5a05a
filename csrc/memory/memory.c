/* memory.c - the memory interface: one handle, a table of operations per memory type,
 * llama.cpp's API envelopes, memory contexts (ubatch iteration). */
#include "mem_internal.h"

#include <stdlib.h>

#define IO_MAGIC 0xAF143CD8u

/* ==========================================================================================
 * Plain KV cache
 * ======================================================================================== */

static pmi_kv *KV(const pm_memory *m) { return (pmi_kv *)m->impl; }

static void kv_destroy(pm_memory *m) { pmi_kv_destroy(KV(m)); }
static uint64_t kv_nbytes(const pm_memory *m) { return pmi_kv_nbytes(KV(m)); }
static void kv_clear(pm_memory *m, bool data) { pmi_kv_clear(KV(m), data); }
static pm_status kv_seq_rm(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, bool *out) {
    return pmi_kv_seq_rm(KV(m), s, p0, p1, out);
}
static pm_status kv_seq_cp(pm_memory *m, pm_seq_id a, pm_seq_id b, pm_pos p0, pm_pos p1) {
    return pmi_kv_seq_cp(KV(m), a, b, p0, p1);
}
static pm_status kv_seq_keep(pm_memory *m, pm_seq_id s) { return pmi_kv_seq_keep(KV(m), s); }
static pm_status kv_seq_add(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d) {
    return pmi_kv_seq_add(KV(m), s, p0, p1, d);
}
static pm_status kv_seq_div(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, int32_t d) {
    return pmi_kv_seq_div(KV(m), s, p0, p1, d);
}
static pm_status kv_pos_min(const pm_memory *m, pm_seq_id s, pm_pos *out) {
    return pmi_kv_seq_pos_min(KV(m), s, out);
}
static pm_status kv_pos_max(const pm_memory *m, pm_seq_id s, pm_pos *out) {
    return pmi_kv_seq_pos_max(KV(m), s, out);
}
static bool kv_can_shift(const pm_memory *m) { return pmi_kv_can_shift(KV(m)); }
static bool kv_update_pending(const pm_memory *m) { return pmi_kv_update_pending(KV(m)); }
static pm_status kv_update(pm_memory *m) {
    pm_status st = pmi_kv_update_check(KV(m));
    if (st == PM_OK) {
        pmi_kv_update(KV(m));
    }
    return st;
}
static pm_status kv_state_write(const pm_memory *m, pmi_writer *w, pm_seq_id s, uint32_t flags) {
    (void)flags;
    return pmi_kv_state_write(KV(m), w, s);
}

/* Restore one KV section; nothing changes on failure. */
static pm_status kv_section_read(pmi_kv *kv, pmi_reader *r, pm_seq_id s) {
    pmi_reader probe = *r;
    pm_status st = pmi_kv_state_check(kv, &probe, s);
    if (st != PM_OK) {
        return st;
    }
    if (s != -1) {
        st = pmi_kv_tx_begin(kv);
        if (st != PM_OK) {
            return st;
        }
    }
    pmi_reader rr = *r;
    st = pmi_kv_state_apply(kv, &rr, s);
    if (s != -1) {
        if (st == PM_OK) {
            pmi_kv_tx_commit(kv);
        } else {
            pmi_kv_tx_rollback(kv);
        }
    }
    if (st == PM_OK) {
        *r = rr;
    }
    return st;
}

static pm_status kv_state_check(const pm_memory *m, pmi_reader *r, pm_seq_id s, uint32_t flags) {
    (void)flags;
    return pmi_kv_state_check(KV(m), r, s);
}

static pm_status kv_state_read(pm_memory *m, pmi_reader *r, pm_seq_id s, uint32_t flags) {
    (void)flags;
    return kv_section_read(KV(m), r, s);
}

static pm_status kv_init_batch(pm_memory *m, pmi_balloc *ba, uint32_t n_ubatch, bool embd_all,
                               pm_mctx *ctx);
static pm_status kv_ctx_apply(pm_memory *m, pm_mctx *ctx, uint32_t i);
static pmi_kv *kv_part(const pm_memory *m, uint32_t part) { return part == 0 ? KV(m) : NULL; }

static const pmi_mem_ops KV_OPS = {
    kv_destroy,     kv_nbytes,   kv_clear,         kv_seq_rm,      kv_seq_cp,
    kv_seq_keep,    kv_seq_add,  kv_seq_div,       kv_pos_min,     kv_pos_max,
    kv_can_shift,   kv_update_pending, kv_update,  kv_state_write, kv_state_check, kv_state_read,
    kv_init_batch,  kv_ctx_apply, kv_part,
};

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

pm_status pm_kv_new(const pm_kv_params *params, pm_memory **out) {
    if (out == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "out is NULL");
    }
    *out = NULL;
    pmi_kv *kv;
    pm_status st = pmi_kv_create(params, &kv);
    if (st != PM_OK) {
        return st;
    }
    pm_memory *m = calloc(1, sizeof(*m));
    if (m == NULL || (params->arch != NULL && (m->arch = dup_str(params->arch)) == NULL)) {
        free(m);
        pmi_kv_destroy(kv);
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    m->ops = &KV_OPS;
    m->kind = PM_MEM_KV;
    m->n_seq_max = params->n_seq_max;
    m->n_pos_per_embd = params->n_pos_per_embd;
    m->impl = kv;
    *out = m;
    return PM_OK;
}

/* ==========================================================================================
 * Generic entry points
 * ======================================================================================== */

void pm_memory_free(pm_memory *m) {
    if (m == NULL) {
        return;
    }
    m->ops->destroy(m);
    free(m->arch);
    free(m);
}

int32_t pm_memory_kind(const pm_memory *m) { return m ? m->kind : 0; }

uint64_t pm_memory_nbytes(const pm_memory *m) { return m ? m->ops->nbytes(m) + sizeof(*m) : 0; }

#define CHECK_MEM(m)                                                                           \
    do {                                                                                       \
        if ((m) == NULL) {                                                                     \
            return pmi_fail(PM_E_INVALID_ARG, "memory is NULL");                              \
        }                                                                                      \
    } while (0)

pm_status pm_mem_clear(pm_memory *m, bool data) {
    CHECK_MEM(m);
    m->ops->clear(m, data);
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
    pm_status st = m->ops->seq_cp(m, a, b, p0, p1);
    if (st == PM_OK) {
        m->gen++;
    }
    return st;
}

pm_status pm_mem_seq_keep(pm_memory *m, pm_seq_id s) {
    CHECK_MEM(m);
    pm_status st = m->ops->seq_keep(m, s);
    if (st == PM_OK) {
        m->gen++;
    }
    return st;
}

pm_status pm_mem_seq_add(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d) {
    CHECK_MEM(m);
    pm_status st = m->ops->seq_add(m, s, p0, p1, d);
    if (st == PM_OK) {
        m->gen++;
    }
    return st;
}

pm_status pm_mem_seq_div(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, int32_t d) {
    CHECK_MEM(m);
    pm_status st = m->ops->seq_div(m, s, p0, p1, d);
    if (st == PM_OK) {
        m->gen++;
    }
    return st;
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

bool pm_mem_update_pending(const pm_memory *m) { return m ? m->ops->update_pending(m) : false; }

pm_status pm_mem_update(pm_memory *m, bool *did) {
    CHECK_MEM(m);
    bool pending = m->ops->update_pending(m);
    if (did) {
        *did = false;
    }
    if (!pending) {
        return PM_OK;
    }
    pm_status st = m->ops->update(m);
    if (st == PM_OK) {
        m->gen++;
        if (did) {
            *did = true;
        }
    }
    return st;
}

/* ---- state and envelopes -------------------------------------------------------------------- */

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
    return m->ops->state_write(m, w, s, flags);
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
    pmi_writer w = {dst ? dst : (uint8_t *)"", cap, 0, false};
    pm_status st = write_all(m, &w, s, flags, envelope);
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
            return pmi_fail(PM_E_FORMAT, "wrong model arch: '%.*s' instead of '%s'", (int)(n > 64 ? 64 : n),
                            (const char *)name, m->arch);
        }
        return PM_OK;
    }
    uint32_t magic;
    int32_t src_seq;
    if (!pmi_r_u32(r, &magic, "sequence state magic")) {
        return PM_E_FORMAT;
    }
    if (magic != IO_MAGIC) {
        return pmi_fail(PM_E_FORMAT, "wrong sequence state magic 0x%08x (expected 0x%08x)", magic, IO_MAGIC);
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
        st = m->ops->state_check(m, r, s, flags);
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

pm_status pm_mem_state_read(pm_memory *m, pm_seq_id s, uint32_t flags, uint32_t envelope,
                            const uint8_t *src, uint64_t len, bool allow_trailing, uint64_t *consumed) {
    CHECK_MEM(m);
    if (src == NULL && len > 0) {
        return pmi_fail(PM_E_INVALID_ARG, "src is NULL");
    }
    pmi_reader probe = {src ? src : (const uint8_t *)"", len, 0};
    pm_status st = check_all(m, s, flags, envelope, &probe);
    if (st != PM_OK) {
        return st;
    }
    if (!allow_trailing && probe.off != len) {
        return pmi_fail(PM_E_FORMAT, "%llu trailing bytes after the state (offset %llu of %llu)",
                        (unsigned long long)(len - probe.off), (unsigned long long)probe.off,
                        (unsigned long long)len);
    }
    pmi_reader r = {probe.buf, len, 0};
    st = read_envelope(m, &r, s, envelope);
    if (st == PM_OK) {
        st = m->ops->state_read(m, &r, s, flags);
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

pm_status pmi_mctx_alloc(pm_mctx *ctx, uint32_t n_ubatch, uint32_t n_parts) {
    ctx->n_ubatch = n_ubatch;
    ctx->n_parts = n_parts;
    size_t n = n_ubatch ? n_ubatch : 1;
    ctx->n_kv = calloc(n, sizeof(uint32_t));
    ctx->n_kv2 = calloc(n, sizeof(uint32_t));
    for (uint32_t p = 0; p < n_parts; ++p) {
        ctx->slots[p] = calloc(n, sizeof(pmi_slot));
        if (ctx->slots[p] == NULL) {
            return pmi_fail(PM_E_NOMEM, "out of memory");
        }
    }
    if (ctx->n_kv == NULL || ctx->n_kv2 == NULL) {
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
    for (uint32_t p = 0; p < 2; ++p) {
        free(ctx->slots[p]);
    }
    free(ctx->ubs);
    free(ctx->n_kv);
    free(ctx->n_kv2);
    free(ctx);
}

/* Split a validated batch with `split` until it runs dry; PM_E_NO_SLOT if tokens remain. */
typedef enum { SPLIT_SIMPLE, SPLIT_EQUAL, SPLIT_SEQ } split_kind;

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
                          ? "tokens shared by several sequences cannot be split into per-sequence streams (llama.cpp returns 1)"
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

static pm_status kv_init_batch(pm_memory *m, pmi_balloc *ba, uint32_t n_ubatch, bool embd_all,
                               pm_mctx *ctx) {
    (void)embd_all;
    pmi_kv *kv = KV(m);
    pmi_ubatch *ubs = NULL;
    uint32_t n = 0;
    pm_status st = split_all(ba, n_ubatch, kv->n_stream == 1 ? SPLIT_SIMPLE : SPLIT_EQUAL, true, 0,
                             &ubs, &n);
    if (st != PM_OK) {
        return st;
    }
    ctx->ubs = ubs;
    st = pmi_mctx_alloc(ctx, n, 1);
    if (st != PM_OK) {
        return st;
    }
    st = pmi_kv_tx_begin(kv);
    if (st != PM_OK) {
        return st;
    }
    st = pmi_kv_prepare(kv, ubs, n, ctx->slots[0]);
    if (st == PM_OK) {
        pmi_kv_tx_commit(kv);
    } else {
        pmi_kv_tx_rollback(kv);
    }
    return st;
}

static pm_status kv_ctx_apply(pm_memory *m, pm_mctx *ctx, uint32_t i) {
    pmi_kv *kv = KV(m);
    pm_status st = pmi_kv_apply_ubatch(kv, &ctx->slots[0][i], &ctx->ubs[i]);
    if (st == PM_OK) {
        ctx->n_kv[i] = pmi_kv_n_kv(kv, &ctx->slots[0][i]);
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
    if (m->ops->update_pending(m)) {
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
    st = m->ops->init_batch(m, &ba, n_ubatch, embd_all, ctx);
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
    out->n_kv = out->applied ? ctx->n_kv[i] : 0;
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
    st = ctx->mem->ops->ctx_apply(ctx->mem, ctx, i);
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
        pmi_kv *kv = ctx->mem->ops->kv_part(ctx->mem, part);
        if (kv == NULL) {
            continue;
        }
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
    pmi_kv *kv = ctx->mem->ops->kv_part(ctx->mem, part);
    uint32_t nk = part == 0 ? ctx->n_kv[i] : ctx->n_kv2[i];
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
    *out = m->ops->kv_part(m, part);
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
