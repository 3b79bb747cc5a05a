/* kv_cache.h - the KV cache: streams of cells and per-layer K/V tensors
 * (kv_cache.c: construction, sequence operations, K-shift; kv_place.c: slot search, placement,
 * K/V rows, KQ mask). */
#ifndef PM_KV_CACHE_H
#define PM_KV_CACHE_H

#include "memory/kv_cells.h"
#include "batch.h"

#include <limits.h>

/* the tensors of a KV layer (the `which` of pm_kv_tensor) */
typedef enum pmi_kv_which { PMI_KV_K = 0, PMI_KV_V = 1 } pmi_kv_which;

typedef struct pmi_kv_layer {
    pm_kv_layer p;        /* copy; p.rope.freq_factors points to our copy */
    float *freq_factors;
    uint32_t n_embd_k_gqa;
    uint32_t n_embd_v_gqa;
    uint64_t k_row;       /* bytes per cell */
    uint64_t v_row;       /* untransposed: bytes per cell; transposed: element size */
    uint64_t k_stream;    /* bytes per stream */
    uint64_t v_stream;
    uint8_t *k;           /* n_stream * k_stream */
    uint8_t *v;           /* NULL without V */
} pmi_kv_layer;

typedef struct pmi_slot {
    uint32_t n_stream;    /* groups */
    uint32_t n_per;       /* cells per group */
    uint32_t strm[PM_MAX_SEQ];
    uint32_t *idxs;       /* n_stream * n_per */
} pmi_slot;

typedef struct pmi_kv {
    uint32_t size;
    uint32_t n_stream;
    uint32_t n_seq_max;
    uint32_t seq_to_stream_len; /* 256 unified, n_seq_max otherwise */
    int32_t type_k, type_v;
    bool v_trans;
    bool unified;
    uint32_t n_swa;
    int32_t swa_type;
    uint32_t n_pos_per_embd;
    bool cell_ext;
    uint32_t n_embd_v_gqa_max;
    int32_t k_rot, v_rot;
    bool can_shift_arch;
    bool kshift_ok;       /* update() can perform a K-shift (architecture, M-RoPE, K type) */
    uint32_t format;
    uint32_t n_layer_model;
    uint32_t n_layer;
    pmi_kv_layer *layers;
    pmi_cells *cells;     /* n_stream */
    uint32_t *head;       /* n_stream */
    uint32_t *tx_head;    /* heads saved at tx_begin */
    bool tx_on;
    /* pending cross-stream copies (src, dst) */
    uint32_t n_copies;
    uint32_t cap_copies;
    uint32_t *copies;
    uint32_t *work;       /* scratch: size cell indices */
    uint32_t *runs;       /* scratch: size (first cell, length) runs */
    uint64_t *bits;       /* scratch: a bitmap of size cells */
    void *kshift_work;    /* update()'s K-shift work memory, allocated with the cache (NULL: no
                           * layer rotates), so a K-shift never fails half way */
} pmi_kv;

/* int32 arithmetic wrapping as llama.cpp's does in practice (there it is UB on overflow;
 * the KQ-mask kernels emulate the same, see pmk_wrap_i32) */
static inline int32_t pmi_wrap_i32(int64_t v) {
    uint32_t u = (uint32_t)v;
    return u <= (uint32_t)INT32_MAX ? (int32_t)u : (int32_t)(u - 2147483648u) - INT32_MAX - 1;
}

/* llama.cpp's is_masked_swa: is position p0 outside the window of a token at p1? */
static inline bool pmi_is_masked_swa(uint32_t n_swa, int32_t swa_type, pm_pos p0, pm_pos p1) {
    switch (swa_type) {
    case PM_SWA_STANDARD:
        return pmi_wrap_i32((int64_t)p1 - p0) >= (int32_t)n_swa;
    case PM_SWA_CHUNKED: {
        uint32_t start = ((uint32_t)p1 / n_swa) * n_swa;
        return (uint32_t)p0 < start;
    }
    case PM_SWA_SYMMETRIC: {
        int32_t h = (int32_t)n_swa / 2;
        int32_t d = pmi_wrap_i32((int64_t)p1 - p0);
        return d < -h || d > h;
    }
    default:
        return false;
    }
}

static inline uint32_t pmi_kv_stream(const pmi_kv *kv, pm_seq_id s) {
    return kv->unified ? 0 : (uint32_t)s;
}
static inline bool pmi_kv_seq_valid(const pmi_kv *kv, pm_seq_id s) {
    return s >= 0 && (uint32_t)s < kv->seq_to_stream_len;
}

pm_status pmi_kv_create(const pm_kv_params *p, pmi_kv **out);
void pmi_kv_destroy(pmi_kv *kv);
uint64_t pmi_kv_nbytes(const pmi_kv *kv);

void pmi_kv_clear(pmi_kv *kv, bool data);
pm_status pmi_kv_seq_rm(pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1, bool *out);
pm_status pmi_kv_seq_cp(pmi_kv *kv, pm_seq_id a, pm_seq_id b, pm_pos p0, pm_pos p1);
pm_status pmi_kv_seq_keep(pmi_kv *kv, pm_seq_id s);
pm_status pmi_kv_seq_add(pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d);
pm_status pmi_kv_seq_div(pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1, int32_t d);
pm_status pmi_kv_seq_pos_min(const pmi_kv *kv, pm_seq_id s, pm_pos *out);
pm_status pmi_kv_seq_pos_max(const pmi_kv *kv, pm_seq_id s, pm_pos *out);
bool pmi_kv_can_shift(const pmi_kv *kv);
bool pmi_kv_update_pending(const pmi_kv *kv);
pm_status pmi_kv_update_check(const pmi_kv *kv);
void pmi_kv_update(pmi_kv *kv);

/* slot search and placement */
pm_status pmi_kv_find_slot(const pmi_kv *kv, const pmi_ubatch *ub, pmi_slot *out);
pm_status pmi_kv_apply_ubatch(pmi_kv *kv, const pmi_slot *si, const pmi_ubatch *ub);
/* Dry-run placement of n ubatches (llama.cpp's prepare).  On PM_E_NO_SLOT the cells keep
 * llama.cpp's side effects; callers that need "nothing changed" wrap it in a transaction. */
pm_status pmi_kv_prepare(pmi_kv *kv, const pmi_ubatch *ubs, uint32_t n, pmi_slot *slots);
uint32_t pmi_kv_n_kv(const pmi_kv *kv, const pmi_slot *si);
void pmi_slot_free(pmi_slot *si);
pm_status pmi_kv_store(pmi_kv *kv, const pmi_slot *si, uint32_t layer, const void *k,
                       const void *v, bool is_f32, uint32_t n_tokens);
pm_status pmi_kv_kq_mask(const pmi_kv *kv, const pmi_slot *si, const pmi_ubatch *ub,
                         bool causal, int32_t non_causal, bool alibi, float *out,
                         uint32_t n_kv);

/* argument checks and resource reservation of the operations, for composites that must
 * validate every part before changing any */
pm_status pmi_kv_check_seq(const pmi_kv *kv, pm_seq_id s, const char *op);
pm_status pmi_kv_seq_cp_prepare(pmi_kv *kv, pm_seq_id a, pm_seq_id b, pm_pos p0, pm_pos p1);
pm_status pmi_kv_seq_add_check(const pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d);
pm_status pmi_kv_seq_div_check(const pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1, int32_t d);

/* seq_rm without argument checks (the caller checked s): every stream s may use */
void pmi_kv_seq_remove(pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1);

/* transactions over all streams (cells + heads); K/V bytes are not journaled */
pm_status pmi_kv_tx_begin(pmi_kv *kv);
void pmi_kv_tx_commit(pmi_kv *kv);
void pmi_kv_tx_rollback(pmi_kv *kv);

#endif /* PM_KV_CACHE_H */
