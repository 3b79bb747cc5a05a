/* kv_cache.c - llama.cpp's KV cache (SPEC sections 2-4, 8.2, 8.3): construction, transactions,
 * sequence operations, K-shift.  Placement is in kv_place.c, the state section in
 * state/kv_state.c.
 *
 * Where llama.cpp aborts we return an error before changing anything.  Cell mutations go
 * through kv_cells.c, whose journal lets callers undo composite operations exactly.
 */
#include "memory/kv_cache.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* ---- helpers ---------------------------------------------------------------------------- */

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
static bool layer_rotates(const pmi_kv_layer *L);

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

static pm_status kv_create(const pm_kv_params *p, pmi_kv **out) {
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
    if (kv->kshift_ok) {
        uint64_t wb = 0;
        for (uint32_t l = 0; l < kv->n_layer; ++l) {
            const pmi_kv_layer *L = &kv->layers[l];
            if (layer_rotates(L)) {
                wb = PMI_MAX(wb, pmi_kshift_work_bytes(kv->type_k, L->p.n_head_kv, L->p.n_embd_head_k,
                                                       L->p.rope.n_rot));
            }
        }
        kv->kshift_work = wb > 0 && wb <= SIZE_MAX / 2 ? pmi_aligned_calloc((size_t)wb) : NULL;
        if (wb > 0 && kv->kshift_work == NULL) {
            pmi_kv_destroy(kv);
            return pmi_fail(PM_E_NOMEM, "out of memory for the K-shift work memory (%llu bytes)",
                            (unsigned long long)wb);
        }
    }
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
    pmi_aligned_free(kv->kshift_work);
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
void pmi_kv_seq_remove(pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1) {
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
    pmi_kv_seq_remove(kv, s, p0, p1);
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
            /* checked by pmi_kv_update_check (and at creation: kshift_ok); allocates nothing */
            (void)pmi_kshift_into(kv->kshift_work, L->k + s * L->k_stream, L->k_row, kv->size,
                                  kv->cells[s].shift, kv->type_k, L->p.n_head_kv, L->p.n_embd_head_k,
                                  L->p.k_rope_offset, &L->p.rope, kv->k_rot);
        }
    }
    for (uint32_t s = 0; s < kv->n_stream; ++s) {
        pmi_cells_reset_shift(&kv->cells[s]);
    }
}

/* The parameters (and their layer array) are the caller's memory, read while the GIL is
 * released: validate and build from one snapshot, never from a second read. */
pm_status pmi_kv_create(const pm_kv_params *p, pmi_kv **out) {
    *out = NULL;
    if (p == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "params is NULL");
    }
    pm_kv_params snap = *p;
    pm_kv_layer *layers = NULL;
    if (snap.n_layer > 0 && snap.layers != NULL && snap.n_layer <= snap.n_layer_model) { /* else refused unread */
        layers = malloc(sizeof(pm_kv_layer) * (size_t)snap.n_layer);
        if (layers == NULL) {
            return pmi_fail(PM_E_NOMEM, "out of memory");
        }
        memcpy(layers, snap.layers, sizeof(pm_kv_layer) * (size_t)snap.n_layer);
        snap.layers = layers;
    }
    pm_status st = kv_create(&snap, out);
    free(layers);
    return st;
}
