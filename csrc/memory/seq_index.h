/* seq_index.h - the per-sequence treap of a KV stream (seq_index.c), shared with kv_cells.c.
 * Private to those two files; everyone else uses kv_cells.h. */
#ifndef PM_SEQ_INDEX_H
#define PM_SEQ_INDEX_H

#include "memory/kv_cells.h"

static inline int pmi_cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static inline uint64_t key_of(pm_pos pos, uint32_t cell) {
    return ((uint64_t)((uint32_t)pos ^ 0x80000000u) << 32) | cell;
}

/* The heap priority of a node is a hash of its cell (the low half of the key) alone, kept
 * in nprio: every cell is at most once in a sequence's index, so priorities are distinct
 * (fmix32 is a bijection), the shape is a pure function of the set of cells, and a node keeps
 * its place in the heap order when its position changes (seq_add / seq_div rewrite keys in
 * place). */
static inline uint32_t prio_of(uint64_t key) {
    uint32_t k = (uint32_t)key;
    k ^= k >> 16;
    k *= 0x85ebca6bu;
    k ^= k >> 13;
    k *= 0xc2b2ae35u;
    return k ^ (k >> 16);
}

/* The free nodes are the free list (chained through nl) and every node from nfresh up, which
 * no tree has used since the last clear: a clear is O(1) and a bulk build after it takes nodes
 * in sequence. */
static inline uint32_t node_new(pmi_cells *c, uint64_t key) {
    uint32_t n = c->nfree;
    if (n != PMI_NONE) {
        c->nfree = c->nl[n];
    } else {
        n = c->nfresh++;
    }
    c->nkey[n] = key;
    c->nprio[n] = prio_of(key);
    c->nl[n] = PMI_NONE;
    c->nr[n] = PMI_NONE;
    c->nlive++;
    return n;
}

static inline void node_free(pmi_cells *c, uint32_t n) {
    c->nl[n] = c->nfree;
    c->nfree = n;
    c->nlive--;
}

/* treap primitives over the node pool of c (PMI_NONE = empty tree) */
void pmi_tr_split(pmi_cells *c, uint32_t t, uint64_t key, uint32_t *lo, uint32_t *hi);
uint32_t pmi_tr_merge(pmi_cells *c, uint32_t a, uint32_t b);
uint32_t pmi_tr_insert(pmi_cells *c, uint32_t t, uint32_t n);
uint32_t pmi_tr_erase(pmi_cells *c, uint32_t t, uint64_t key);
uint32_t pmi_tr_union(pmi_cells *c, uint32_t a, uint32_t b);
uint32_t pmi_tr_collect(const pmi_cells *c, uint32_t t, uint32_t *out, uint32_t n);
uint32_t pmi_tr_build(pmi_cells *c, const uint32_t *nodes, uint32_t n);
uint64_t pmi_tr_min_key(const pmi_cells *c, uint32_t t);
uint64_t pmi_tr_max_key(const pmi_cells *c, uint32_t t);
uint32_t pmi_tr_join(pmi_cells *c, uint32_t a, const uint32_t *nodes, uint32_t m);
uint32_t pmi_tr_range(const pmi_cells *c, uint32_t t, uint64_t lo, uint64_t hi, uint32_t *out, uint32_t n);

/* index maintenance: every index empty; (s, pos, i) in / out; every sequence of cell i */
void pmi_idx_clear(pmi_cells *c);
void pmi_idx_add(pmi_cells *c, pm_seq_id s, pm_pos pos, uint32_t i);
void pmi_idx_rm(pmi_cells *c, pm_seq_id s, pm_pos pos, uint32_t i);
void pmi_idx_all(pmi_cells *c, uint32_t i, bool add);

#endif /* PM_SEQ_INDEX_H */
