/* mem_internal.h - private structures of the memory types (cells, KV cache, interface). */
#ifndef PM_MEM_INTERNAL_H
#define PM_MEM_INTERNAL_H

#include "pm_internal.h"

/* ======================================================================================
 * KV cells of one stream (kv_cells.c): structure of arrays, per-sequence ordered index,
 * optional undo journal.
 * ==================================================================================== */
typedef struct pmi_ext {
    int32_t x, y, tok;
} pmi_ext;

#define PMI_SEQ_WORDS 4 /* 256 sequence bits per cell */

typedef struct pmi_jrec {
    uint32_t idx;
    pm_pos pos;
    int32_t shift;
    pmi_ext ext;
    uint64_t seq[PMI_SEQ_WORDS];
} pmi_jrec;

typedef struct pmi_cellsnap {
    pm_pos pos;
    pmi_ext ext;
    uint64_t seq[PMI_SEQ_WORDS];
} pmi_cellsnap;

typedef struct pmi_cells {
    uint32_t size;
    uint32_t nwords;     /* 64-bit words of used_bits */
    pm_pos *pos;         /* -1 = empty */
    int32_t *shift;
    pmi_ext *ext;
    uint64_t *seq;       /* PMI_SEQ_WORDS per cell */
    uint64_t *used_bits; /* bit i = pos[i] != -1 */
    uint32_t used;
    bool has_shift;
    uint32_t shift_bound; /* >= |shift[i]| of every cell (0 after a reset) */
    /* per-sequence index: treap of keys (pos, cell) */
    uint32_t root[PM_MAX_SEQ];
    uint32_t cnt[PM_MAX_SEQ];
    uint64_t *nkey;
    uint32_t *nl, *nr;
    uint32_t *nprio;     /* heap priority of each node (a hash of its cell) */
    uint32_t ncap, nfree, nlive;
    uint32_t *tmp;       /* 4 * size scratch entries for the range operations */
    /* undo journal */
    bool jon;
    bool j_has_shift;
    uint32_t j_shift_bound;
    uint32_t jepoch;
    uint32_t jn;
    uint32_t *jmark;
    pmi_jrec *jrec;
} pmi_cells;

pm_status pmi_cells_init(pmi_cells *c, uint32_t size);
void pmi_cells_free(pmi_cells *c);
uint64_t pmi_cells_nbytes(const pmi_cells *c);
/* Ensure room for `extra` more (sequence, cell) memberships. */
pm_status pmi_cells_reserve(pmi_cells *c, uint64_t extra);

static inline bool pmi_cells_is_empty(const pmi_cells *c, uint32_t i) { return c->pos[i] == -1; }
static inline bool pmi_cells_seq_has(const pmi_cells *c, uint32_t i, pm_seq_id s) {
    return (c->seq[(size_t)i * PMI_SEQ_WORDS + ((uint32_t)s >> 6)] >> ((uint32_t)s & 63)) & 1u;
}
static inline uint32_t pmi_cells_seq_count(const pmi_cells *c, uint32_t i) {
    const uint64_t *w = c->seq + (size_t)i * PMI_SEQ_WORDS;
    return pmi_popcount64(w[0]) + pmi_popcount64(w[1]) + pmi_popcount64(w[2]) + pmi_popcount64(w[3]);
}
/* no sequence / more than one sequence (cheaper than counting) */
static inline bool pmi_cells_seq_none(const pmi_cells *c, uint32_t i) {
    const uint64_t *w = c->seq + (size_t)i * PMI_SEQ_WORDS;
    return (w[0] | w[1] | w[2] | w[3]) == 0;
}
static inline bool pmi_cells_seq_multi(const pmi_cells *c, uint32_t i) {
    const uint64_t *w = c->seq + (size_t)i * PMI_SEQ_WORDS;
    uint64_t x = w[0] | w[1] | w[2] | w[3];
    return (w[0] != 0) + (w[1] != 0) + (w[2] != 0) + (w[3] != 0) > 1 || (x & (x - 1)) != 0;
}
pm_seq_id pmi_cells_seq_get(const pmi_cells *c, uint32_t i); /* lowest id, -1 if none */
pm_pos pmi_cells_seq_pos_min(const pmi_cells *c, pm_seq_id s);
pm_pos pmi_cells_seq_pos_max(const pmi_cells *c, pm_seq_id s);
uint32_t pmi_cells_used_max_p1(const pmi_cells *c);
/* Cells of s with p0 <= pos < p1, ascending (pos, cell); returns the count (<= cnt[s]). */
uint32_t pmi_cells_seq_range(const pmi_cells *c, pm_seq_id s, pm_pos p0, pm_pos p1,
                             uint32_t *out);
/* token of the cell of s with the largest pos <= p (highest cell on ties), -1 if none */
pm_token pmi_cells_seq_pos_tok_le(const pmi_cells *c, pm_seq_id s, pm_pos p);

/* Mutations (llama.cpp's llama_kv_cells operations, SPEC section 3.2). */
void pmi_cells_reset(pmi_cells *c);
void pmi_cells_reset_shift(pmi_cells *c);
void pmi_cells_rm(pmi_cells *c, uint32_t i);
void pmi_cells_seq_add(pmi_cells *c, uint32_t i, pm_seq_id s); /* needs a reserved node */
/* Bulk restores: set sequence bits without indexing, then build every sequence's index from
 * the cells at once.  keys/stack hold at least as many entries as memberships (nodes must be
 * reserved).  Not journaled: use outside transactions only. */
void pmi_cells_seq_set_bit(pmi_cells *c, uint32_t i, pm_seq_id s);
void pmi_cells_build_index(pmi_cells *c, uint64_t *keys, uint32_t *stack);
/* Whole-range operations on one sequence (cost: the cells in the range, see kv_cells.c).
 * rm / shift / keep return the lowest cell they emptied (PMI_NONE if none).  shift adds d to
 * the positions in [p0, p1) or, with div > 0, divides them by div.  cp needs reserved nodes. */
uint32_t pmi_cells_seq_rm_range(pmi_cells *c, pm_seq_id s, pm_pos p0, pm_pos p1);
void pmi_cells_seq_cp_range(pmi_cells *c, pm_seq_id a, pm_seq_id b, pm_pos p0, pm_pos p1);
uint32_t pmi_cells_seq_shift_range(pmi_cells *c, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d,
                                   int32_t div);
uint32_t pmi_cells_seq_keep_all(pmi_cells *c, pm_seq_id s);
/* s joins each of cells[0..n) (positions already set; nodes reserved), indexed in bulk */
void pmi_cells_seq_add_many(pmi_cells *c, pm_seq_id s, const uint32_t *cells, uint32_t n);
/* every cell of s in (pos, cell) order; returns the count (cnt[s]) */
uint32_t pmi_cells_seq_all(const pmi_cells *c, pm_seq_id s, uint32_t *out);
void pmi_cells_pos_set(pmi_cells *c, uint32_t i, pm_pos p);
void pmi_cells_ext_set(pmi_cells *c, uint32_t i, pmi_ext e);
bool pmi_cells_pos_add(pmi_cells *c, uint32_t i, pm_pos d);
void pmi_cells_snap(const pmi_cells *c, const uint32_t *idxs, uint32_t n, pmi_cellsnap *out);
void pmi_cells_set(pmi_cells *c, const uint32_t *idxs, uint32_t n, const pmi_cellsnap *snap);

/* Undo journal: after tx_begin every mutated cell is recorded once; rollback restores
 * cells and has_shift exactly. */
pm_status pmi_cells_tx_begin(pmi_cells *c);
void pmi_cells_tx_commit(pmi_cells *c);
void pmi_cells_tx_rollback(pmi_cells *c);

/* ======================================================================================
 * Batches and ubatches (batch.c)
 * ==================================================================================== */
struct pm_batch {
    uint32_t n_tokens;
    pm_token *token;     /* NULL: embedding batch */
    pm_pos *pos;         /* NULL: automatic; else n_tokens * n_pos, section-major */
    uint32_t n_pos;
    uint32_t *seq_off;   /* n_tokens + 1 offsets into seq_id */
    pm_seq_id *seq_id;   /* per token in llama.cpp's order (primary first) */
    pm_seq_id *first_id; /* per token: first id as given (drives automatic positions) */
    int8_t *output;
};

typedef struct pmi_ubatch {
    uint32_t n_tokens;
    uint32_t n_seq_tokens;
    uint32_t n_seqs;
    uint32_t n_seqs_unq;
    uint32_t n_pos;          /* sections in pos */
    bool equal_seqs;
    bool has_token;
    uint32_t *idx;           /* batch index of each token */
    pm_token *token;         /* n_tokens (zeros for an embedding batch: never read) */
    pm_pos *pos;             /* n_tokens * n_pos, section-major */
    uint32_t *seq_off;       /* n_tokens + 1 */
    pm_seq_id *seq_id;
    int8_t *output;
    pm_seq_id seq_id_unq[PM_MAX_SEQ];
    int32_t seq_idx[PM_MAX_SEQ];
} pmi_ubatch;

static inline pm_seq_id pmi_ub_primary(const pmi_ubatch *ub, uint32_t t) {
    return ub->seq_id[ub->seq_off[t]];
}
static inline uint32_t pmi_ub_n_seq_id(const pmi_ubatch *ub, uint32_t t) {
    return ub->seq_off[t + 1] - ub->seq_off[t];
}

/* A validated batch with resolved positions and the splitter's state. */
typedef struct pmi_balloc {
    const pm_batch *batch;
    uint32_t n_tokens;
    uint32_t n_pos;          /* n_pos_per_embd of the memory */
    pm_pos *pos;             /* resolved: n_tokens * n_pos section-major */
    uint64_t *seq_set;       /* PMI_SEQ_WORDS per token */
    bool has_cpl;
    bool *used;
    uint32_t n_used;
    /* distinct sequence sets: set id per token, entries of each set in batch order */
    uint32_t n_sets;
    uint32_t *set_of;        /* per token */
    uint32_t *set_start;     /* n_sets + 1 offsets into set_tok */
    uint32_t *set_tok;
} pmi_balloc;

struct pmi_mem_ops;
/* Validate (llama_batch_allocr::init) against memory `mem`; fills ba.  PM_E_BATCH with
 * llama.cpp's reason when it would reject the batch. */
pm_status pmi_balloc_init(pmi_balloc *ba, const pm_batch *batch, const pm_memory *mem,
                          uint32_t n_seq_max, uint32_t n_pos_per_embd, uint32_t n_vocab,
                          bool output_all);
void pmi_balloc_free(pmi_balloc *ba);
void pmi_balloc_reset(pmi_balloc *ba);
/* Splits; an ubatch with n_tokens == 0 ends the run.  PM_E_NOMEM / PM_E_INVALID_ARG. */
pm_status pmi_split_simple(pmi_balloc *ba, uint32_t n_ubatch, pmi_ubatch *out);
pm_status pmi_split_equal(pmi_balloc *ba, uint32_t n_ubatch, bool sequential,
                          uint32_t n_keep_tail, pmi_ubatch *out);
pm_status pmi_split_seq(pmi_balloc *ba, uint32_t n_ubatch, pmi_ubatch *out);
void pmi_ubatch_free(pmi_ubatch *ub);
/* An ubatch of n_tokens tokens in one sequence set {seq} (ubatch_reserve + fill). */
pm_status pmi_ubatch_reserve(pmi_ubatch *ub, uint32_t n_tokens, uint32_t n_pos, pm_seq_id seq);

/* ======================================================================================
 * KV cache (kv_cache.c)
 * ==================================================================================== */
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
} pmi_kv;

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

/* state */
/* With PM_STATE_PARTIAL_ONLY a cache without a sliding window has no partial state: it writes
 * and reads nothing (b11739; the SWA cache of an iSWA memory is the partial part). */
bool pmi_kv_partial_skips(const pmi_kv *kv, uint32_t flags);
pm_status pmi_kv_state_write(const pmi_kv *kv, pmi_writer *w, pm_seq_id seq, uint32_t flags);

/* One stream section of a KV blob, parsed and validated (pointers into the blob). */
typedef struct pmi_kv_section {
    uint32_t cc;
    const uint8_t *meta;  /* cell records: copy.buf (validated copy, never the caller's bytes) */
    uint64_t meta_len;
    pmi_copy copy;
    const uint8_t **k;    /* per layer: rows */
    const uint8_t **v;    /* per layer: rows or transposed elements */
} pmi_kv_section;

/* A restore in three steps: parse (validates, changes nothing), meta (cells and heads; a
 * per-sequence restore can fail with PM_E_NO_SLOT: wrap it in a transaction), data. */
typedef struct pmi_kv_plan {
    pm_seq_id seq;
    bool skip;            /* nothing to restore (PARTIAL_ONLY on a non-SWA cache) */
    uint32_t n_stream;
    pmi_kv_section *secs; /* per stream */
    uint32_t **slots;     /* per stream section: the cells it went to (meta) */
} pmi_kv_plan;

pm_status pmi_kv_state_parse(const pmi_kv *kv, pmi_reader *r, pm_seq_id seq, uint32_t flags,
                             pmi_kv_plan *plan);
pm_status pmi_kv_state_meta(pmi_kv *kv, pmi_kv_plan *plan);
void pmi_kv_state_data(pmi_kv *kv, const pmi_kv_plan *plan);
void pmi_kv_plan_free(pmi_kv_plan *plan);

/* argument checks and resource reservation of the operations, for composites that must
 * validate every part before changing any */
pm_status pmi_kv_check_seq(const pmi_kv *kv, pm_seq_id s, const char *op);
pm_status pmi_kv_seq_cp_prepare(pmi_kv *kv, pm_seq_id a, pm_seq_id b, pm_pos p0, pm_pos p1);
pm_status pmi_kv_seq_add_check(const pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d);
pm_status pmi_kv_seq_div_check(const pmi_kv *kv, pm_seq_id s, pm_pos p0, pm_pos p1, int32_t d);

/* transactions over all streams (cells + heads); K/V bytes are not journaled */
pm_status pmi_kv_tx_begin(pmi_kv *kv);
void pmi_kv_tx_commit(pmi_kv *kv);
void pmi_kv_tx_rollback(pmi_kv *kv);

/* ======================================================================================
 * Recurrent memory (recurrent.c)
 * ==================================================================================== */
typedef struct pmi_rcell {
    pm_pos pos;
    int32_t src, src0, tail;
    uint64_t seq[4];
} pmi_rcell;

typedef struct pmi_rec_layer {
    uint32_t il;
    bool has_p;
    uint64_t row[3];      /* bytes per row of r, s, p */
    uint8_t *data[3];     /* size * (1 + n_rs_seq) rows each */
} pmi_rec_layer;

typedef struct pmi_rec {
    uint32_t size;
    uint32_t n_seq_max;
    uint32_t n_rs_seq;
    uint32_t n_rows;      /* size * (1 + n_rs_seq) */
    uint32_t n_layer_model;
    uint32_t n_layer;
    int32_t type_r, type_s;
    uint32_t head, n, used;
    int32_t rs_z;
    uint32_t *rs_idx;     /* n_seq_max */
    pmi_rcell *cells;
    pmi_rec_layer *layers;
    /* transaction snapshot */
    pmi_rcell *tx_cells;
    uint32_t *tx_rs_idx;
    uint32_t tx_head, tx_n, tx_used;
    int32_t tx_rs_z;
} pmi_rec;

typedef struct pmi_rec_plan {
    pm_seq_id seq;
    uint32_t cc;
    pm_pos last_pos;
    const uint8_t *meta;  /* cell records: copy.buf (validated copy) */
    pmi_copy copy;
    const uint8_t **rows; /* n_layer * 3 */
    uint32_t head;        /* set by meta */
} pmi_rec_plan;

pm_status pmi_rec_create(const pm_rec_params *p, pmi_rec **out);
void pmi_rec_destroy(pmi_rec *r);
uint64_t pmi_rec_nbytes(const pmi_rec *r);
void pmi_rec_tx_begin(pmi_rec *r);
void pmi_rec_tx_rollback(pmi_rec *r);
void pmi_rec_clear(pmi_rec *r, bool data);
bool pmi_rec_seq_rm(pmi_rec *r, pm_seq_id s, pm_pos p0, pm_pos p1);
void pmi_rec_seq_cp(pmi_rec *r, pm_seq_id a, pm_seq_id b);
void pmi_rec_seq_keep(pmi_rec *r, pm_seq_id s);
pm_status pmi_rec_seq_add(pmi_rec *r, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d, bool check_only);
pm_status pmi_rec_seq_div(pmi_rec *r, pm_seq_id s, pm_pos p0, pm_pos p1, int32_t d, bool check_only);
pm_pos pmi_rec_seq_pos_min(const pmi_rec *r, pm_seq_id s);
pm_pos pmi_rec_seq_pos_max(const pmi_rec *r, pm_seq_id s);
pm_status pmi_rec_find_slot(pmi_rec *r, const pmi_ubatch *ub);
pm_status pmi_rec_prepare(pmi_rec *r, const pmi_ubatch *ubs, uint32_t n);
void pmi_rec_move_states(pmi_rec *r, uint8_t *tmp);
uint64_t pmi_rec_max_row(const pmi_rec *r);
pm_status pmi_rec_state_write(const pmi_rec *r, pmi_writer *w, pm_seq_id seq);
pm_status pmi_rec_state_parse(const pmi_rec *r, pmi_reader *rd, pm_seq_id seq, pmi_rec_plan *plan);
pm_status pmi_rec_state_meta(pmi_rec *r, pmi_rec_plan *plan);
void pmi_rec_state_data(pmi_rec *r, const pmi_rec_plan *plan);
void pmi_rec_plan_free(pmi_rec_plan *plan);

/* ======================================================================================
 * Memory interface (memory.c)
 * ==================================================================================== */
typedef struct pmi_mem_ops {
    pm_status (*seq_rm)(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, bool *out);
    pm_status (*seq_pos_min)(const pm_memory *m, pm_seq_id s, pm_pos *out);
    pm_status (*seq_pos_max)(const pm_memory *m, pm_seq_id s, pm_pos *out);
    bool (*can_shift)(const pm_memory *m);
    /* split the batch and dry-run the placement of its ubatches into ctx */
    pm_status (*init_batch)(pm_memory *m, pmi_balloc *ba, uint32_t n_ubatch, bool embd_all,
                            pm_mctx *ctx);
} pmi_mem_ops;

/* A memory is a list of parts in state-section order: up to two KV caches (KV: the cache;
 * iSWA: base, swa; hybrid: attention; hybrid-iSWA: base, swa) and an optional recurrent
 * memory.  The kind's table decides how operations combine them, as llama.cpp's
 * composite memories do; everything else (clear, seq_cp/keep/add/div, update, state,
 * ubatch placement) applies to every part in order. */
struct pm_memory {
    const pmi_mem_ops *ops;
    int32_t kind;
    uint32_t n_seq_max;
    uint32_t n_pos_per_embd;
    uint64_t gen;        /* bumped by every change; memory contexts check it */
    char *arch;          /* for the context envelope; may be NULL */
    uint32_t n_kv;
    pmi_kv *kv[2];
    pmi_rec *rec;
    uint8_t *rec_tmp;    /* scratch rows for moving recurrent states */
};

/* A memory context: the ubatches of one batch and their placements. */
struct pm_mctx {
    pm_memory *mem;
    uint64_t gen;        /* memory generation this context is valid for */
    uint32_t n_ubatch;
    uint32_t next;       /* next ubatch to apply */
    pmi_ubatch *ubs;
    uint32_t n_parts;    /* KV parts with slots */
    pmi_slot *slots[2];  /* per part: n_ubatch slots */
    uint32_t *n_kv[2];   /* per part, per ubatch, after apply */
    uint32_t *rec_head;  /* recurrent: range of each applied ubatch */
    uint32_t *rec_n;
};

pm_status pmi_mctx_alloc(pm_mctx *ctx, uint32_t n_ubatch, uint32_t n_parts);

/* composite.c: the operation tables of every kind */
extern const pmi_mem_ops pmi_ops_kv, pmi_ops_iswa, pmi_ops_rec, pmi_ops_hybrid, pmi_ops_hybrid_iswa;

#endif /* PM_MEM_INTERNAL_H */
