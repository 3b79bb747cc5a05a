/* kv_cells.h - KV cells of one stream (kv_cells.c, seq_index.c): structure of
 * arrays, a per-sequence ordered index (treap), an optional undo journal. */
#ifndef PM_KV_CELLS_H
#define PM_KV_CELLS_H

#include "pm_internal.h"

#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#define PMI_STREAM_STORES 1
#else
#define PMI_STREAM_STORES 0
#endif

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
    uint32_t nfresh;     /* nodes nfresh..ncap-1 are free and off the free list */
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
/* A whole restore of cc cells packed at 0..cc-1 (not journaled: outside transactions only).
 * reset_packed empties every index, resets every cell from cc up and counts 0..cc-1 as used;
 * the caller loads each of those (position, ext or NULL for the reset value, the 4 sequence words)
 * and, in ascending runs of cells, hands them to the bulk index build: bulk_start with at
 * least as many nodes reserved as memberships, cap[s] >= the members of s (PM_MAX_SEQ
 * entries) and a stack of pmi_cells_bulk_stack_len(cap) entries; bulk_cells for the cells
 * [i0, i1) loaded since; bulk_finish once every cell is in. */
void pmi_cells_reset_packed(pmi_cells *c, uint32_t cc);
/* On x86-64 the shift, ext and sequence words go out with streaming stores: a whole restore
 * writes megabytes of them, which the tensor copy that follows evicts anyway; streaming skips
 * reading each line before writing it (a tenth of a 17 MB restore).  The position is stored
 * normally (the index build reads it back at once).  pmi_cells_load_end after the last. */
static inline void pmi_cells_load(pmi_cells *c, uint32_t i, pm_pos pos, const pmi_ext *e,
                                  uint64_t w0, uint64_t w1, uint64_t w2, uint64_t w3) {
    static const pmi_ext reset = {0, 0, -1};
    const pmi_ext x = e != NULL ? *e : reset;
    uint64_t *sw = c->seq + (size_t)i * PMI_SEQ_WORDS;
    c->pos[i] = pos;
#if PMI_STREAM_STORES
    int *xe = (int *)&c->ext[i];
    _mm_stream_si32((int *)&c->shift[i], 0);
    _mm_stream_si32(xe, x.x);
    _mm_stream_si32(xe + 1, x.y);
    _mm_stream_si32(xe + 2, x.tok);
    _mm_stream_si64((long long *)sw, (long long)w0);
    _mm_stream_si64((long long *)sw + 1, (long long)w1);
    _mm_stream_si64((long long *)sw + 2, (long long)w2);
    _mm_stream_si64((long long *)sw + 3, (long long)w3);
#else
    c->shift[i] = 0;
    c->ext[i] = x;
    sw[0] = w0;
    sw[1] = w1;
    sw[2] = w2;
    sw[3] = w3;
#endif
}
static inline void pmi_cells_load_end(void) {
#if PMI_STREAM_STORES
    _mm_sfence(); /* the streaming stores ordered before anything that follows */
#endif
}
#define PMI_BULK_SENTINELS 8
typedef struct pmi_bulk {
    uint64_t *stack;
    uint32_t base[PM_MAX_SEQ], sp[PM_MAX_SEQ]; /* each sequence's stack: bottom, one past the top */
    uint32_t end[PM_MAX_SEQ];                  /* and the end of its region */
    uint64_t last[PM_MAX_SEQ];                 /* its last key */
    uint64_t unsorted[PM_MAX_SEQ / 64];        /* a key came after a larger one */
} pmi_bulk;
uint64_t pmi_cells_bulk_stack_len(const uint32_t *cap);
/* the stacks may be c->tmp when they fit: this many uint64_t (bulk_finish reads the roots off
 * the stacks before it uses c->tmp for anything else) */
static inline uint64_t pmi_cells_scratch_u64(const pmi_cells *c) { return 2 * (uint64_t)c->size; }
void pmi_cells_bulk_start(pmi_cells *c, pmi_bulk *b, const uint32_t *cap, uint64_t *stack);
void pmi_cells_bulk_cells(pmi_cells *c, pmi_bulk *b, uint32_t i0, uint32_t i1);
/* the same for cells [i, j) known to be members of s alone (j > i) */
void pmi_cells_bulk_run(pmi_cells *c, pmi_bulk *b, uint32_t s, uint32_t i, uint32_t j);
void pmi_cells_bulk_finish(pmi_cells *c, pmi_bulk *b);
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
bool pmi_cells_pos_add(pmi_cells *c, uint32_t i, pm_pos d);
void pmi_cells_snap(const pmi_cells *c, const uint32_t *idxs, uint32_t n, pmi_cellsnap *out);
void pmi_cells_set(pmi_cells *c, const uint32_t *idxs, uint32_t n, const pmi_cellsnap *snap);

/* per-cell primitives, inline (hot in placement and restores): journal the cell's first
 * change in a transaction; keep used_bits / used in step with pos */
static inline void pmi_cells_jtouch(pmi_cells *c, uint32_t i) {
    if (c->jon && c->jmark[i] != c->jepoch) {
        c->jmark[i] = c->jepoch;
        pmi_jrec *r = &c->jrec[c->jn++];
        r->idx = i;
        r->pos = c->pos[i];
        r->shift = c->shift[i];
        r->ext = c->ext[i];
        memcpy(r->seq, c->seq + (size_t)i * PMI_SEQ_WORDS, sizeof(r->seq));
    }
}

static inline void pmi_cells_used_set(pmi_cells *c, uint32_t i, bool on) {
    uint64_t bit = 1ULL << (i & 63);
    bool was = (c->used_bits[i >> 6] & bit) != 0;
    if (on && !was) {
        c->used_bits[i >> 6] |= bit;
        c->used++;
    } else if (!on && was) {
        c->used_bits[i >> 6] &= ~bit;
        c->used--;
    }
}

static inline void pmi_cells_pos_set(pmi_cells *c, uint32_t i, pm_pos p) {
    pmi_cells_jtouch(c, i);
    c->pos[i] = p;
    pmi_cells_used_set(c, i, true);
}

static inline void pmi_cells_ext_set(pmi_cells *c, uint32_t i, pmi_ext e) {
    pmi_cells_jtouch(c, i);
    c->ext[i] = e;
}

/* Undo journal: after tx_begin every mutated cell is recorded once; rollback restores
 * cells and has_shift exactly. */
pm_status pmi_cells_tx_begin(pmi_cells *c);
void pmi_cells_tx_commit(pmi_cells *c);
void pmi_cells_tx_rollback(pmi_cells *c);

#endif /* PM_KV_CELLS_H */
