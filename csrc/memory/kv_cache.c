/* kv_cache.c - llama.cpp's KV cache (SPEC sections 2-4, 8.2, 8.3): streams, sequence
 * operations, slot search, ubatch placement, KQ mask, K-shift, state.
 *
 * Where llama.cpp aborts we return an error before changing anything.  Cell mutations go
 * through kv_cells.c, whose journal lets callers undo composite operations exactly.
 */
#include "mem_internal.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* ---- helpers ---------------------------------------------------------------------------- */

/* int32 arithmetic wrapping as llama.cpp's does in practice (there it is UB on overflow;
 * the KQ-mask kernels emulate the same, see pmk_wrap_i32) */
static inline int32_t wrap_i32(int64_t v) {
    uint32_t u = (uint32_t)v;
    return u <= (uint32_t)INT32_MAX ? (int32_t)u : (int32_t)(u - 2147483648u) - INT32_MAX - 1;
}

static bool is_masked_swa(uint32_t n_swa, int32_t swa_type, pm_pos p0, pm_pos p1) {
    switch (swa_type) {
    case PM_SWA_STANDARD:
        return wrap_i32((int64_t)p1 - p0) >= (int32_t)n_swa;
    case PM_SWA_CHUNKED: {
        uint32_t start = ((uint32_t)p1 / n_swa) * n_swa;
        return (uint32_t)p0 < start;
    }
    case PM_SWA_SYMMETRIC: {
        int32_t h = (int32_t)n_swa / 2;
        int32_t d = wrap_i32((int64_t)p1 - p0);
        return d < -h || d > h;
    }
    default:
        return false;
    }
}

static void norm_range(pm_pos *p0, pm_pos *p1) {
    if (*p0 < 0) {
        *p0 = 0;
    }
    if (*p1 < 0) {
        *p1 = INT32_MAX;
    }
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static uint32_t uniform_head(const pmi_kv *kv, bool v) {
    uint32_t h = 0;
    for (uint32_t l = 0; l < kv->n_layer; ++l) {
        uint32_t x = v ? kv->layers[l].p.n_embd_head_v : kv->layers[l].p.n_embd_head_k;
        if (v && x == 0) {
            continue;
        }
        if (h != 0 && x != h) {
            return 0;
        }
        h = x;
    }
    return h;
}

static pm_status shift_blocker(const pmi_kv *kv);

/* ---- construction ------------------------------------------------------------------------ */

static pm_status check_layer(const pm_kv_params *p, uint32_t l, uint32_t prev_il) {
    const pm_kv_layer *L = &p->layers[l];
    if (L->il >= p->n_layer_model) {
        return pmi_fail(PM_E_INVALID_ARG, "layer %u: model layer id %u >= n_layer_model %u", l,
                        L->il, p->n_layer_model);
    }
    if (l > 0 && L->il <= prev_il) {
        return pmi_fail(PM_E_INVALID_ARG, "layers must be in ascending model layer order");
    }
    if (L->n_head_kv == 0 || L->n_embd_head_k == 0) {
        return pmi_fail(PM_E_INVALID_ARG, "layer %u: n_head_kv and n_embd_head_k must be > 0",
                        L->il);
    }
    uint64_t nk = (uint64_t)L->n_head_kv * L->n_embd_head_k;
    uint64_t nv = (uint64_t)L->n_head_kv * L->n_embd_head_v;
    uint32_t bk = pm_type_block_size(p->type_k), bv = pm_type_block_size(p->type_v);
    if (nk % bk != 0 || nk > UINT32_MAX) {
        return pmi_fail(PM_E_INVALID_ARG, "layer %u: K width %llu is not a multiple of %s's block of %u",
                        L->il, (unsigned long long)nk, pm_type_name(p->type_k), bk);
    }
    if (nv % bv != 0 || nv > UINT32_MAX) {
        return pmi_fail(PM_E_INVALID_ARG, "layer %u: V width %llu is not a multiple of %s's block of %u",
                        L->il, (unsigned long long)nv, pm_type_name(p->type_v), bv);
    }
    if (L->has_rope && L->rope.mode != PM_ROPE_NONE) {
        const pm_rope *r = &L->rope;
        if (r->mode != PM_ROPE_NORM && r->mode != PM_ROPE_NEOX && r->mode != PM_ROPE_MROPE &&
            r->mode != PM_ROPE_IMROPE && r->mode != PM_ROPE_VISION) {
            return pmi_fail(PM_E_INVALID_ARG, "layer %u: unknown rope mode %d", L->il, r->mode);
        }
        if (r->n_rot == 0 || r->n_rot % 2 != 0 ||
            (uint64_t)r->n_rot + L->k_rope_offset > L->n_embd_head_k) {
            return pmi_fail(PM_E_INVALID_ARG,
                            "layer %u: n_rot %u must be even, > 0 and fit the head (%u, offset %u)",
                            L->il, r->n_rot, L->n_embd_head_k, L->k_rope_offset);
        }
        if (r->n_freq_factors != 0 && (r->n_freq_factors < r->n_rot / 2 || r->freq_factors == NULL)) {
            return pmi_fail(PM_E_INVALID_ARG, "layer %u: freq_factors needs n_rot/2 = %u values",
                            L->il, r->n_rot / 2);
        }
        if (!(r->freq_base > 0.0f) || !isfinite(r->freq_scale)) {
            return pmi_fail(PM_E_INVALID_ARG, "layer %u: freq_base must be > 0", L->il);
        }
    }
    return PM_OK;
}

pm_status pmi_kv_create(const pm_kv_params *p, pmi_kv **out) {
    *out = NULL;
    if (p == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "params is NULL");
    }
    if (p->n_seq_max == 0 || p->n_seq_max > PM_MAX_SEQ) {
        return pmi_fail(PM_E_INVALID_ARG, "n_seq_max %u must be in [1, %d]", p->n_seq_max, PM_MAX_SEQ);
    }
    if (p->size == 0 || p->size >= (1u << 30)) {
        return pmi_fail(PM_E_INVALID_ARG, "size %u must be in [1, 2^30)", p->size);
    }
    if (!pmi_type_known(p->type_k) || !pmi_type_known(p->type_v)) {
        return pmi_fail(PM_E_UNSUPPORTED, "unsupported cache type (k %d, v %d)", p->type_k, p->type_v);
    }
    if (p->v_trans && pmi_type_is_quantized(p->type_v)) {
        return pmi_fail(PM_E_UNSUPPORTED,
                        "transposed V needs a non-block type, not %s (llama.cpp requires flash attention)",
                        pm_type_name(p->type_v));
    }
    if (p->swa_type < PM_SWA_NONE || p->swa_type > PM_SWA_SYMMETRIC) {
        return pmi_fail(PM_E_INVALID_ARG, "unknown swa_type %d", p->swa_type);
    }
    if (p->swa_type != PM_SWA_NONE && p->n_swa == 0) {
        return pmi_fail(PM_E_INVALID_ARG, "n_swa must be > 0 with a sliding window");
    }
    if (p->n_pos_per_embd != 1 && p->n_pos_per_embd != 4) {
        return pmi_fail(PM_E_INVALID_ARG, "n_pos_per_embd must be 1 or 4, not %u", p->n_pos_per_embd);
    }
    if (p->format != 10 && p->format != 11) {
        return pmi_fail(PM_E_INVALID_ARG, "state format %u is not 10 or 11", p->format);
    }
    if (p->n_layer > 0 && p->layers == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "layers is NULL");
    }
    if (p->n_layer > p->n_layer_model) {
        return pmi_fail(PM_E_INVALID_ARG, "n_layer %u > n_layer_model %u", p->n_layer, p->n_layer_model);
    }
    for (uint32_t l = 0; l < p->n_layer; ++l) {
        pm_status st = check_layer(p, l, l ? p->layers[l - 1].il : 0);
        if (st != PM_OK) {
            return st;
        }
    }

    pmi_kv *kv = calloc(1, sizeof(*kv));
    if (kv == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    kv->size = p->size;
    kv->n_seq_max = p->n_seq_max;
    kv->unified = p->unified != 0;
    kv->n_stream = kv->unified ? 1 : p->n_seq_max;
    kv->seq_to_stream_len = kv->unified ? PM_MAX_SEQ : p->n_seq_max;
    kv->type_k = p->type_k;
    kv->type_v = p->type_v;
    kv->v_trans = p->v_trans != 0;
    kv->n_swa = p->n_swa;
    kv->swa_type = p->swa_type;
    kv->n_pos_per_embd = p->n_pos_per_embd;
    kv->cell_ext = p->cell_ext != 0 || p->n_pos_per_embd > 1;
    kv->can_shift_arch = p->can_shift != 0;
    kv->format = p->format;
    kv->n_layer_model = p->n_layer_model;
    kv->n_layer = p->n_layer;

    pm_status st = PM_OK;
    kv->layers = calloc(p->n_layer ? p->n_layer : 1, sizeof(pmi_kv_layer));
    kv->cells = calloc(kv->n_stream, sizeof(pmi_cells));
    kv->head = calloc(kv->n_stream, sizeof(uint32_t));
    kv->tx_head = calloc(kv->n_stream, sizeof(uint32_t));
    kv->work = malloc(sizeof(uint32_t) * (size_t)kv->size);
    kv->runs = malloc(sizeof(uint32_t) * 2 * (size_t)kv->size);
    kv->bits = malloc(sizeof(uint64_t) * (((size_t)kv->size + 63) / 64));
    if (!kv->layers || !kv->cells || !kv->head || !kv->tx_head || !kv->work || !kv->runs || !kv->bits) {
        pmi_kv_destroy(kv);
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        st = pmi_cells_init(&kv->cells[s], kv->size);
        if (st != PM_OK) {
            pmi_kv_destroy(kv);
            return st;
        }
    }
    uint32_t v_max = 0;
    for (uint32_t l = 0; l < p->n_layer; ++l) {
        pmi_kv_layer *L = &kv->layers[l];
        L->p = p->layers[l];
        L->n_embd_k_gqa = L->p.n_head_kv * L->p.n_embd_head_k;
        L->n_embd_v_gqa = L->p.n_head_kv * L->p.n_embd_head_v;
        v_max = PMI_MAX(v_max, L->n_embd_v_gqa);
        L->p.rope.freq_factors = NULL;
        if (p->layers[l].rope.n_freq_factors > 0 && p->layers[l].rope.freq_factors != NULL) {
            uint32_t nf = p->layers[l].rope.n_freq_factors;
            L->freq_factors = malloc(sizeof(float) * nf);
            if (L->freq_factors == NULL) {
                pmi_kv_destroy(kv);
                return pmi_fail(PM_E_NOMEM, "out of memory");
            }
            memcpy(L->freq_factors, p->layers[l].rope.freq_factors, sizeof(float) * nf);
            L->p.rope.freq_factors = L->freq_factors;
        } else {
            L->p.rope.n_freq_factors = 0;
        }
        L->k_row = pmi_row_size(kv->type_k, L->n_embd_k_gqa);
        L->k_stream = L->k_row * kv->size;
        if (L->n_embd_v_gqa > 0) {
            if (kv->v_trans) {
                L->v_row = pm_type_size(kv->type_v);
                L->v_stream = L->v_row * L->n_embd_v_gqa * kv->size;
            } else {
                L->v_row = pmi_row_size(kv->type_v, L->n_embd_v_gqa);
                L->v_stream = L->v_row * kv->size;
            }
        }
        /* the message is formatted from copies: kv (and L with it) is freed first */
        uint32_t il = L->p.il;
        uint64_t k_bytes = L->k_stream * kv->n_stream, v_bytes = L->v_stream * kv->n_stream;
        L->k = pmi_aligned_calloc(k_bytes);
        if (L->k == NULL && k_bytes > 0) {
            pmi_kv_destroy(kv);
            return pmi_fail(PM_E_NOMEM, "out of memory for K of layer %u (%llu bytes)", il,
                            (unsigned long long)k_bytes);
        }
        if (v_bytes > 0) {
            L->v = pmi_aligned_calloc(v_bytes);
            if (L->v == NULL) {
                pmi_kv_destroy(kv);
                return pmi_fail(PM_E_NOMEM, "out of memory for V of layer %u (%llu bytes)", il,
                                (unsigned long long)v_bytes);
            }
        }
    }
    kv->n_embd_v_gqa_max = p->n_embd_v_gqa_max ? PMI_MAX(p->n_embd_v_gqa_max, v_max) : v_max;

    /* b11739's attention rotation (Hadamard) of quantized K and V */
    if (p->k_rot >= 0) {
        kv->k_rot = p->k_rot;
    } else {
        uint32_t hk = uniform_head(kv, false);
        kv->k_rot = 0;
        if (pmi_type_is_quantized(kv->type_k) && hk > 0 && hk % 64 == 0) {
            uint32_t nrot = 64;
            while (hk % (nrot * 2) == 0) {
                nrot *= 2;
            }
            kv->k_rot = (int32_t)nrot;
        }
    }
    if (p->v_rot >= 0) {
        kv->v_rot = p->v_rot;
    } else {
        uint32_t hv = uniform_head(kv, true);
        kv->v_rot = (pmi_type_is_quantized(kv->type_v) && hv > 0 && hv % 64 == 0) ? 64 : 0;
    }
    kv->kshift_ok = shift_blocker(kv) == PM_OK; /* fixed by the parameters */
    *out = kv;
    return PM_OK;
}

void pmi_kv_destroy(pmi_kv *kv) {
    if (kv == NULL) {
        return;
    }
    if (kv->cells) {
        for (uint32_t s = 0; s < kv->n_stream; ++s) {
            pmi_cells_free(&kv->cells[s]);
        }
    }
    if (kv->layers) {
        for (uint32_t l = 0; l < kv->n_layer; ++l) {
            pmi_aligned_free(kv->layers[l].k);
            pmi_aligned_free(kv->layers[l].v);
            free(kv->layers[l].freq_factors);
        }
    }
    free(kv->layers);
    free(kv->cells);
    free(kv->head);
    free(kv->tx_head);
    free(kv->copies);
    free(kv->work);
    free(kv->runs);
    free(kv->bits);
    free(kv);
}

uint64_t pmi_kv_nbytes(const pmi_kv *kv) {
    uint64_t n = sizeof(*kv);
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        n += pmi_cells_nbytes(&kv->cells[s]);
    }
    for (uint32_t l = 0; l < kv->n_layer; ++l) {
        n += (kv->layers[l].k_stream + kv->layers[l].v_stream) * kv->n_stream;
    }
    return n;
}

/* ---- transactions ------------------------------------------------------------------------- */

pm_status pmi_kv_tx_begin(pmi_kv *kv) {
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        pm_status st = pmi_cells_tx_begin(&kv->cells[s]);
        if (st != PM_OK) {
            for (uint32_t t = 0; t < s; ++t) {
                pmi_cells_tx_commit(&kv->cells[t]);
            }
            return st;
        }
    }
    memcpy(kv->tx_head, kv->head, sizeof(uint32_t) * kv->n_stream);
    kv->tx_on = true;
    return PM_OK;
}

void pmi_kv_tx_commit(pmi_kv *kv) {
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        pmi_cells_tx_commit(&kv->cells[s]);
    }
    kv->tx_on = false;
}

void pmi_kv_tx_rollback(pmi_kv *kv) {
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        pmi_cells_tx_rollback(&kv->cells[s]);
    }
    memcpy(kv->head, kv->tx_head, sizeof(uint32_t) * kv->n_stream);
    kv->tx_on = false;
}

/* ---- sequence operations ------------------------------------------------------------------- */

void pmi_kv_clear(pmi_kv *kv, bool data) {
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        pmi_cells_reset(&kv->cells[s]);
        kv->head[s] = 0;
    }
    if (data) {
        for (uint32_t l = 0; l < kv->n_layer; ++l) {
            memset(kv->layers[l].k, 0, (size_t)(kv->layers[l].k_stream * kv->n_stream));
            if (kv->layers[l].v) {
                memset(kv->layers[l].v, 0, (size_t)(kv->layers[l].v_stream * kv->n_stream));
            }
        }
    }
}

static void lower_head(pmi_kv *kv, uint32_t st, uint32_t new_head) {
    if (new_head != PMI_NONE && new_head < kv->head[st]) {
        kv->head[st] = new_head;
    }
}

/* seq_rm without argument checks (used by apply_ubatch's purge and restores) */
static void kv_seq_rm(pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1) {
    norm_range(&p0, &p1);
    if (s >= 0) {
        uint32_t st = pmi_kv_stream(kv, s);
        lower_head(kv, st, pmi_cells_seq_rm_range(&kv->cells[st], s, p0, p1));
        return;
    }
    for (uint32_t st = 0; st < kv->n_stream; ++st) {
        pmi_cells *c = &kv->cells[st];
        uint32_t new_head = PMI_NONE;
        for (uint32_t w = 0; w < c->nwords; ++w) {
            uint64_t bits = c->used_bits[w];
            while (bits) {
                uint32_t i = w * 64 + (uint32_t)__builtin_ctzll(bits);
                bits &= bits - 1;
                if (c->pos[i] >= p0 && c->pos[i] < p1) {
                    pmi_cells_rm(c, i);
                    if (new_head == PMI_NONE) {
                        new_head = i;
                    }
                }
            }
        }
        lower_head(kv, st, new_head);
    }
}

pm_status pmi_kv_seq_rm(pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1, bool *out) {
    if (s != -1 && !pmi_kv_seq_valid(kv, s)) {
        return pmi_fail(PM_E_INVALID_ARG, "seq_rm: seq_id %d is not -1 or in [0, %u)", s,
                        kv->seq_to_stream_len);
    }
    kv_seq_rm(kv, s, p0, p1);
    if (out) {
        *out = true;
    }
    return PM_OK;
}

pm_status pmi_kv_check_seq(const pmi_kv *kv, pm_seq_id s, const char *op) {
    if (!pmi_kv_seq_valid(kv, s)) {
        return pmi_fail(PM_E_INVALID_ARG, "%s: seq_id %d is not in [0, %u)", op, s,
                        kv->seq_to_stream_len);
    }
    return PM_OK;
}

pm_status pmi_kv_seq_cp_prepare(pmi_kv *kv, pm_seq_id a, pm_seq_id b, pm_pos p0, pm_pos p1) {
    pm_status st = pmi_kv_check_seq(kv, a, "seq_cp (src)");
    if (st == PM_OK) {
        st = pmi_kv_check_seq(kv, b, "seq_cp (dst)");
    }
    if (st != PM_OK) {
        return st;
    }
    uint32_t sa = pmi_kv_stream(kv, a), sb = pmi_kv_stream(kv, b);
    if (sa == sb) {
        return a == b ? PM_OK : pmi_cells_reserve(&kv->cells[sa], kv->cells[sa].cnt[a]);
    }
    int64_t size = kv->size;
    bool full = !((int64_t)p0 > 0 && (int64_t)p0 + 1 < size) &&
                !((int64_t)p1 > 0 && (int64_t)p1 + 1 < size);
    if (!full) {
        return pmi_fail(PM_E_UNSUPPORTED,
                        "seq_cp across streams copies whole sequences only (p0 %d, p1 %d; llama.cpp aborts)",
                        p0, p1);
    }
    if (kv->n_copies + 1 > kv->cap_copies) {
        uint32_t ncap = kv->cap_copies ? kv->cap_copies * 2 : 8;
        uint32_t *nc = realloc(kv->copies, sizeof(uint32_t) * 2 * ncap);
        if (nc == NULL) {
            return pmi_fail(PM_E_NOMEM, "out of memory");
        }
        kv->copies = nc;
        kv->cap_copies = ncap;
    }
    return pmi_cells_reserve(&kv->cells[sb], kv->cells[sa].cnt[a]);
}

pm_status pmi_kv_seq_cp(pmi_kv *kv, pm_seq_id a, pm_seq_id b, pm_pos p0, pm_pos p1) {
    pm_status st = pmi_kv_seq_cp_prepare(kv, a, b, p0, p1);
    if (st != PM_OK) {
        return st;
    }
    uint32_t sa = pmi_kv_stream(kv, a), sb = pmi_kv_stream(kv, b);
    if (sa == sb) {
        if (a == b) {
            return PM_OK;
        }
        norm_range(&p0, &p1);
        pmi_cells_seq_cp_range(&kv->cells[sa], a, b, p0, p1);
        return PM_OK;
    }
    /* cross-stream: whole sequence, data copy deferred to the next update */
    pmi_cells *cs = &kv->cells[sa], *cd = &kv->cells[sb];
    kv->copies[2 * kv->n_copies] = sa;
    kv->copies[2 * kv->n_copies + 1] = sb;
    kv->n_copies++;
    pmi_cells_reset(cd);
    uint32_t n = pmi_cells_seq_range(cs, a, INT32_MIN, INT32_MAX, kv->work);
    qsort(kv->work, n, sizeof(uint32_t), cmp_u32);
    for (uint32_t k = 0; k < n; ++k) {
        uint32_t i = kv->work[k];
        pm_pos pos = cs->pos[i];
        int32_t d = cs->shift[i];
        pmi_ext e = cs->ext[i];
        pmi_cells_pos_set(cd, i, pos - d);
        pmi_cells_seq_add(cd, i, b);
        if (d != 0) {
            pmi_cells_pos_add(cd, i, d);
        }
        pmi_cells_ext_set(cd, i, e);
    }
    kv->head[sb] = kv->head[sa];
    return PM_OK;
}

pm_status pmi_kv_seq_keep(pmi_kv *kv, pm_seq_id s) {
    pm_status st = pmi_kv_check_seq(kv, s, "seq_keep");
    if (st != PM_OK) {
        return st;
    }
    uint32_t strm = pmi_kv_stream(kv, s);
    lower_head(kv, strm, pmi_cells_seq_keep_all(&kv->cells[strm], s));
    return PM_OK;
}

static bool layer_rotates(const pmi_kv_layer *L) {
    return L->p.has_rope && L->p.rope.mode != PM_ROPE_NONE;
}

/* PM_OK if update() can perform a K-shift of this cache, else PM_E_SHIFT with the reason (the
 * architecture, M-RoPE, or a K type / rotation the re-rotation does not support). */
static pm_status shift_blocker(const pmi_kv *kv) {
    if (!kv->can_shift_arch || kv->n_pos_per_embd > 1) {
        return pmi_fail(PM_E_SHIFT, "this cache cannot shift%s",
                        kv->n_pos_per_embd > 1 ? " (M-RoPE)" : " (architecture)");
    }
    for (uint32_t l = 0; l < kv->n_layer; ++l) {
        const pmi_kv_layer *L = &kv->layers[l];
        if (!layer_rotates(L)) {
            continue;
        }
        pm_status st = pmi_kshift_check(kv->type_k, L->p.n_embd_head_k, L->p.rope.n_rot,
                                        L->p.k_rope_offset, kv->k_rot);
        if (st != PM_OK) {
            return pmi_fail_ctx(st, "layer %u", L->p.il);
        }
    }
    return PM_OK;
}

/* A position change of cells of s in [p0, p1) needs a K-shift update() could not perform:
 * refused here (PM_E_UNSUPPORTED, the reason in the message), with nothing changed, instead of
 * being accepted and wedging every later update(). */
static pm_status check_shiftable(const pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1) {
    if (kv->kshift_ok) {
        return PM_OK;
    }
    const pmi_cells *c = &kv->cells[pmi_kv_stream(kv, s)];
    if (pmi_cells_seq_range(c, s, p0, p1, kv->work) == 0) {
        return PM_OK; /* no cell moves */
    }
    /* SPEC A-9: PM_E_UNSUPPORTED (llama.cpp would abort or crash in the shift) */
    return shift_blocker(kv) == PM_OK ? PM_OK : PM_E_UNSUPPORTED;
}

static pm_status check_shift_op(const pmi_kv *kv, pm_seq_id s, const char *op) {
    pm_status st = pmi_kv_check_seq(kv, s, op);
    if (st == PM_OK && kv->n_pos_per_embd > 1) {
        st = pmi_fail(PM_E_UNSUPPORTED, "%s is not supported with M-RoPE (n_pos_per_embd %u)", op,
                      kv->n_pos_per_embd);
    }
    return st;
}

pm_status pmi_kv_seq_add_check(const pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d) {
    pm_status st = check_shift_op(kv, s, "seq_add");
    if (st != PM_OK || d == 0) {
        return st;
    }
    norm_range(&p0, &p1);
    if (p0 == p1) {
        return PM_OK;
    }
    st = check_shiftable(kv, s, p0, p1);
    if (st != PM_OK) {
        return st;
    }
    const pmi_cells *c = &kv->cells[pmi_kv_stream(kv, s)];
    /* the extremes of the sequence and the stream's shift bound settle the common case */
    if ((int64_t)pmi_cells_seq_pos_max(c, s) + d <= INT32_MAX &&
        (int64_t)pmi_cells_seq_pos_min(c, s) + d >= INT32_MIN && c->shift_bound + llabs(d) <= INT32_MAX) {
        return PM_OK;
    }
    uint32_t n = pmi_cells_seq_range(c, s, p0, p1, kv->work);
    for (uint32_t k = 0; k < n; ++k) {
        uint32_t i = kv->work[k];
        int64_t np = (int64_t)c->pos[i] + d, ns = (int64_t)c->shift[i] + d;
        if (np > INT32_MAX || np < INT32_MIN || ns > INT32_MAX || ns < INT32_MIN) {
            return pmi_fail(PM_E_INVALID_ARG, "seq_add: position %d + %d overflows int32", c->pos[i], d);
        }
    }
    return PM_OK;
}

pm_status pmi_kv_seq_add(pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d) {
    pm_status st = pmi_kv_seq_add_check(kv, s, p0, p1, d);
    if (st != PM_OK || d == 0) {
        return st;
    }
    norm_range(&p0, &p1);
    if (p0 == p1) {
        return PM_OK;
    }
    uint32_t strm = pmi_kv_stream(kv, s);
    uint32_t new_head = pmi_cells_seq_shift_range(&kv->cells[strm], s, p0, p1, d, 0);
    kv->head[strm] = new_head != PMI_NONE ? new_head : 0;
    return PM_OK;
}

pm_status pmi_kv_seq_div_check(const pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1, int32_t d) {
    pm_status st = check_shift_op(kv, s, "seq_div");
    if (st != PM_OK || d == 1) {
        return st;
    }
    if (d <= 0) {
        return pmi_fail(PM_E_INVALID_ARG, "seq_div: divisor %d must be >= 1", d);
    }
    norm_range(&p0, &p1);
    if (p0 == p1) {
        return PM_OK;
    }
    st = check_shiftable(kv, s, p0, p1);
    if (st != PM_OK) {
        return st;
    }
    const pmi_cells *c = &kv->cells[pmi_kv_stream(kv, s)];
    int64_t lo = llabs(pmi_cells_seq_pos_min(c, s)), hi = llabs(pmi_cells_seq_pos_max(c, s));
    int64_t amax = PMI_MAX(lo, hi);
    if (c->shift_bound + amax <= INT32_MAX) { /* |pos - pos / d| <= |pos| */
        return PM_OK;
    }
    uint32_t n = pmi_cells_seq_range(c, s, p0, p1, kv->work);
    for (uint32_t k = 0; k < n; ++k) {
        uint32_t i = kv->work[k];
        int64_t ns = (int64_t)c->shift[i] + (c->pos[i] - c->pos[i] / d);
        if (ns > INT32_MAX || ns < INT32_MIN) {
            return pmi_fail(PM_E_INVALID_ARG, "seq_div: accumulated shift overflows int32");
        }
    }
    return PM_OK;
}

pm_status pmi_kv_seq_div(pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1, int32_t d) {
    pm_status st = pmi_kv_seq_div_check(kv, s, p0, p1, d);
    if (st != PM_OK || d == 1) {
        return st;
    }
    norm_range(&p0, &p1);
    if (p0 == p1) {
        return PM_OK;
    }
    pmi_cells_seq_shift_range(&kv->cells[pmi_kv_stream(kv, s)], s, p0, p1, 0, d);
    return PM_OK;
}

pm_status pmi_kv_seq_pos_min(const pmi_kv *kv, pm_seq_id s, pm_pos *out) {
    pm_status st = pmi_kv_check_seq(kv, s, "seq_pos_min");
    if (st == PM_OK) {
        *out = pmi_cells_seq_pos_min(&kv->cells[pmi_kv_stream(kv, s)], s);
    }
    return st;
}

pm_status pmi_kv_seq_pos_max(const pmi_kv *kv, pm_seq_id s, pm_pos *out) {
    pm_status st = pmi_kv_check_seq(kv, s, "seq_pos_max");
    if (st == PM_OK) {
        *out = pmi_cells_seq_pos_max(&kv->cells[pmi_kv_stream(kv, s)], s);
    }
    return st;
}

bool pmi_kv_can_shift(const pmi_kv *kv) {
    return kv->can_shift_arch && kv->n_pos_per_embd == 1 && kv->kshift_ok;
}

static bool any_shift(const pmi_kv *kv) {
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        if (kv->cells[s].has_shift) {
            return true;
        }
    }
    return false;
}

bool pmi_kv_update_pending(const pmi_kv *kv) {
    return kv->n_copies > 0 || any_shift(kv);
}

pm_status pmi_kv_update_check(const pmi_kv *kv) {
    if (!any_shift(kv) || kv->kshift_ok) {
        return PM_OK;
    }
    /* unreachable through seq_add / seq_div (they refuse such shifts); kept for restored
     * states, which carry no pending shift either */
    pm_status st = shift_blocker(kv);
    return st == PM_OK ? PM_OK : pmi_fail_ctx(st, "a K-shift is pending");
}

void pmi_kv_update(pmi_kv *kv) {
    for (uint32_t c = 0; c < kv->n_copies; ++c) {
        uint32_t src = kv->copies[2 * c], dst = kv->copies[2 * c + 1];
        for (uint32_t l = 0; l < kv->n_layer; ++l) {
            pmi_kv_layer *L = &kv->layers[l];
            memcpy(L->k + dst * L->k_stream, L->k + src * L->k_stream, (size_t)L->k_stream);
            if (L->v) {
                memcpy(L->v + dst * L->v_stream, L->v + src * L->v_stream, (size_t)L->v_stream);
            }
        }
    }
    kv->n_copies = 0;
    if (!any_shift(kv)) {
        return;
    }
    for (uint32_t l = 0; l < kv->n_layer; ++l) {
        pmi_kv_layer *L = &kv->layers[l];
        if (!layer_rotates(L)) {
            continue;
        }
        for (uint32_t s = 0; s < kv->n_stream; ++s) {
            /* checked by pmi_kv_update_check; allocation failure leaves this layer unshifted */
            (void)pmi_kshift(L->k + s * L->k_stream, L->k_row, kv->size, kv->cells[s].shift,
                             kv->type_k, L->p.n_head_kv, L->p.n_embd_head_k, L->p.k_rope_offset,
                             &L->p.rope, kv->k_rot);
        }
    }
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        pmi_cells_reset_shift(&kv->cells[s]);
    }
}

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
                can_use = is_masked_swa(kv->n_swa, kv->swa_type, c->pos[idx],
                                        wrap_i32((int64_t)pmi_cells_seq_pos_max(c, owner) + 1));
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
                kv_seq_rm(kv, (pm_seq_id)s, pmin, rm_max[s] + 1);
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

/* ---- state: write ------------------------------------------------------------------------ */

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
            if (!is_masked_swa(kv->n_swa, kv->swa_type, c->pos[out[k]], pmax)) {
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
static uint32_t make_runs(const uint32_t *cells, uint32_t n, uint32_t *runs) {
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
        memcpy(dst, base + runs[2 * r] * row, (size_t)(row * runs[2 * r + 1]));
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
    uint64_t wmask[PMI_SEQ_WORDS] = {0};
    for (uint32_t q = 0; q < kv->n_seq_max; ++q) {
        wmask[q >> 6] |= 1ULL << (q & 63);
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
    uint32_t nr = make_runs(cells, n, runs);
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
    uint32_t *cells = malloc(sizeof(uint32_t) * (size_t)kv->size + 1);
    if (cells == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    pmi_w_u32(w, kv->n_stream);
    for (uint32_t st = 0; st < kv->n_stream; ++st) {
        uint32_t n = select_cells(kv, st, seq, cells);
        write_stream(kv, w, st, seq, cells, n);
    }
    free(cells);
    return PM_OK;
}

/* ---- state: read ----------------------------------------------------------------------------- */

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
    /* the cell records are copied (sec->copy, in bulk: the size they have with one id per
     * cell, more on demand) and validated from the copy; the apply step reads only the copy,
     * never the caller's buffer again.  q: offset of the next record from m0. */
    pmi_copy *cp = &sec->copy;
    const uint32_t ext = kv->cell_ext ? 12 : 0;
    const uint64_t m0 = r->off, avail = r->len - m0;
    uint64_t q = 0;
    pm_status st = pmi_copy_window(r, m0, cp, PMI_MIN(avail, (uint64_t)sec->cc * (12 + ext)));
    if (st != PM_OK) {
        return st;
    }
    for (uint32_t i = 0; i < sec->cc; ++i) {
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
        if ((st = pmi_copy_window(r, m0, cp, q + 8 + ext)) != PM_OK) {
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
        if ((st = pmi_copy_window(r, m0, cp, q + 4ull * nid)) != PM_OK) {
            return st;
        }
        if (seq == -1) {
            const uint8_t *ids = cp->buf + q;
            for (uint32_t k = 0; k < nid; ++k) {
                int32_t id = pmi_rd_i32(ids + 4ull * k);
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
    for (uint32_t l = 0; l < kv->n_layer; ++l) {
        const pmi_kv_layer *L = &kv->layers[l];
        int32_t type;
        uint64_t row;
        snprintf(what, sizeof what, "KV stream %u layer %u K", s, L->p.il);
        if (!pmi_r_i32(r, &type, what)) {
            return PM_E_FORMAT;
        }
        if (type != kv->type_k) {
            return pmi_fail(PM_E_FORMAT, "%s: type %d, this cache has %d (%s) (offset %llu)", what, type,
                            kv->type_k, pm_type_name(kv->type_k), (unsigned long long)(r->off - 4));
        }
        if (!pmi_r_u64(r, &row, what)) {
            return PM_E_FORMAT;
        }
        if (row != L->k_row) {
            return pmi_fail(PM_E_FORMAT, "%s: row size %llu, this cache has %llu (offset %llu)", what,
                            (unsigned long long)row, (unsigned long long)L->k_row,
                            (unsigned long long)(r->off - 8));
        }
        if (!pmi_r_span(r, row * sec->cc, &sec->k[l], what)) {
            return PM_E_FORMAT;
        }
    }
    for (uint32_t l = 0; l < kv->n_layer; ++l) {
        const pmi_kv_layer *L = &kv->layers[l];
        if (L->v == NULL) {
            continue;
        }
        int32_t type;
        snprintf(what, sizeof what, "KV stream %u layer %u V", s, L->p.il);
        if (!pmi_r_i32(r, &type, what)) {
            return PM_E_FORMAT;
        }
        if (type != kv->type_v) {
            return pmi_fail(PM_E_FORMAT, "%s: type %d, this cache has %d (%s) (offset %llu)", what, type,
                            kv->type_v, pm_type_name(kv->type_v), (unsigned long long)(r->off - 4));
        }
        if (!kv->v_trans) {
            uint64_t row;
            if (!pmi_r_u64(r, &row, what)) {
                return PM_E_FORMAT;
            }
            if (row != L->v_row) {
                return pmi_fail(PM_E_FORMAT, "%s: row size %llu, this cache has %llu (offset %llu)", what,
                                (unsigned long long)row, (unsigned long long)L->v_row,
                                (unsigned long long)(r->off - 8));
            }
            if (!pmi_r_span(r, row * sec->cc, &sec->v[l], what)) {
                return PM_E_FORMAT;
            }
        } else {
            uint32_t el, ne;
            if (!pmi_r_u32(r, &el, what)) {
                return PM_E_FORMAT;
            }
            if (el != L->v_row) {
                return pmi_fail(PM_E_FORMAT, "%s: element size %u, this cache has %llu (offset %llu)", what,
                                el, (unsigned long long)L->v_row, (unsigned long long)(r->off - 4));
            }
            if (!pmi_r_u32(r, &ne, what)) {
                return PM_E_FORMAT;
            }
            if (ne != L->n_embd_v_gqa) {
                return pmi_fail(PM_E_FORMAT, "%s: %u V rows, this cache has %u (offset %llu)", what, ne,
                                L->n_embd_v_gqa, (unsigned long long)(r->off - 4));
            }
            if (!pmi_r_span(r, (uint64_t)el * ne * sec->cc, &sec->v[l], what)) {
                return PM_E_FORMAT;
            }
        }
    }
    return PM_OK;
}

static pm_status sections_alloc(const pmi_kv *kv, pmi_kv_section **out) {
    pmi_kv_section *secs = calloc(kv->n_stream, sizeof(pmi_kv_section));
    const uint8_t **ptrs = calloc((size_t)kv->n_stream * 2 * (kv->n_layer ? kv->n_layer : 1),
                                  sizeof(uint8_t *));
    if (secs == NULL || ptrs == NULL) {
        free(secs);
        free(ptrs);
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    uint32_t nl = kv->n_layer ? kv->n_layer : 1;
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        secs[s].k = ptrs + (size_t)s * 2 * nl;
        secs[s].v = ptrs + (size_t)s * 2 * nl + nl;
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
        st = sections_alloc(kv, &plan->secs);
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
        memcpy(base + runs[2 * r] * row, src, (size_t)(row * runs[2 * r + 1]));
        src += row * runs[2 * r + 1];
    }
}

static void apply_data(pmi_kv *kv, uint32_t st, const pmi_kv_section *sec, const uint32_t *idx) {
    if (sec->cc == 0) {
        return; /* no rows; sec->k / sec->v are NULL (no arithmetic on them: UB) */
    }
    uint32_t *runs = kv->runs;
    uint32_t nr = make_runs(idx, sec->cc, runs);
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

pm_status pmi_kv_state_meta(pmi_kv *kv, pmi_kv_plan *plan) {
    pmi_kv_section *secs = plan->secs;
    pm_status st = PM_OK;
    if (plan->skip) {
        return PM_OK;
    }
    if (plan->seq == -1) {
        /* whole restore: reserve, then clear and pack every stream at cells 0..cc-1; the
         * sequence index is built in bulk (outside a transaction) from sorted keys */
        uint64_t most = 0;
        for (uint32_t s = 0; s < kv->n_stream && st == PM_OK; ++s) {
            uint64_t ids = (secs[s].meta_len - (uint64_t)secs[s].cc * (kv->cell_ext ? 20 : 8)) / 4;
            most = PMI_MAX(most, ids);
            st = pmi_cells_reserve(&kv->cells[s], ids);
        }
        bool bulk = !kv->tx_on;
        uint64_t *keys = NULL;
        uint32_t *stack = NULL;
        if (st == PM_OK && bulk && most > 0) {
            keys = malloc(sizeof(uint64_t) * most);
            stack = malloc(sizeof(uint32_t) * most);
            if (keys == NULL || stack == NULL) {
                st = pmi_fail(PM_E_NOMEM, "out of memory");
            }
        }
        if (st != PM_OK) {
            free(keys);
            free(stack);
            return st;
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
                    if (bulk) {
                        pmi_cells_seq_set_bit(c, i, pmi_rd_i32(p + 4ull * q));
                    } else {
                        pmi_cells_seq_add(c, i, pmi_rd_i32(p + 4ull * q));
                    }
                }
                p += 4ull * nid;
            }
            if (bulk) {
                pmi_cells_build_index(c, keys, stack);
            }
            kv->head[s] = 0;
        }
        free(keys);
        free(stack);
        return PM_OK;
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
        kv_seq_rm(kv, seq, -1, -1);
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
                    memcpy(kb, sec->k[l], (size_t)(L->k_row * cc));
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
                        memcpy(dst, sec->v[l] + (uint64_t)j * cc * el, (size_t)(el * cc));
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
