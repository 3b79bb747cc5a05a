/* kv_cells.c - cell metadata of one KV stream (llama.cpp's llama_kv_cells, SPEC section 3).
 *
 * Structure of arrays: pos, shift, ext and a 256-bit sequence set per cell, a bitmap of
 * used cells, and per sequence an ordered index of (pos, cell) pairs kept as a treap whose
 * shape is a pure function of its keys (priorities are hashes), so seq_pos_min/max and
 * range queries never scan the cells.  An optional journal records the first change of
 * each cell so that a failed composite operation can be undone exactly.
 */
#include "mem_internal.h"

#include <stdlib.h>

static const pmi_ext EXT_RESET = {0, 0, -1};

/* ---- per-sequence treap ------------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b) {
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

static uint32_t node_new(pmi_cells *c, uint64_t key) {
    uint32_t n = c->nfree;
    c->nfree = c->nl[n];
    c->nkey[n] = key;
    c->nprio[n] = prio_of(key);
    c->nl[n] = PMI_NONE;
    c->nr[n] = PMI_NONE;
    c->nlive++;
    return n;
}

static void node_free(pmi_cells *c, uint32_t n) {
    c->nl[n] = c->nfree;
    c->nfree = n;
    c->nlive--;
}

/* keys < key go to *lo, the others to *hi */
static void tr_split(pmi_cells *c, uint32_t t, uint64_t key, uint32_t *lo, uint32_t *hi) {
    if (t == PMI_NONE) {
        *lo = *hi = PMI_NONE;
    } else if (c->nkey[t] < key) {
        tr_split(c, c->nr[t], key, &c->nr[t], hi);
        *lo = t;
    } else {
        tr_split(c, c->nl[t], key, lo, &c->nl[t]);
        *hi = t;
    }
}

static uint32_t tr_merge(pmi_cells *c, uint32_t a, uint32_t b) {
    if (a == PMI_NONE) {
        return b;
    }
    if (b == PMI_NONE) {
        return a;
    }
    if (c->nprio[a] > c->nprio[b]) {
        c->nr[a] = tr_merge(c, c->nr[a], b);
        return a;
    }
    c->nl[b] = tr_merge(c, a, c->nl[b]);
    return b;
}

static uint32_t tr_insert(pmi_cells *c, uint32_t t, uint32_t n) {
    if (t == PMI_NONE) {
        return n;
    }
    uint64_t k = c->nkey[n];
    if (c->nprio[n] > c->nprio[t]) {
        tr_split(c, t, k, &c->nl[n], &c->nr[n]);
        return n;
    }
    if (k < c->nkey[t]) {
        c->nl[t] = tr_insert(c, c->nl[t], n);
    } else {
        c->nr[t] = tr_insert(c, c->nr[t], n);
    }
    return t;
}

static uint32_t tr_erase(pmi_cells *c, uint32_t t, uint64_t key) {
    if (t == PMI_NONE) {
        return t;
    }
    if (c->nkey[t] == key) {
        uint32_t r = tr_merge(c, c->nl[t], c->nr[t]);
        node_free(c, t);
        return r;
    }
    if (key < c->nkey[t]) {
        c->nl[t] = tr_erase(c, c->nl[t], key);
    } else {
        c->nr[t] = tr_erase(c, c->nr[t], key);
    }
    return t;
}

/* the union of two treaps with disjoint key sets */
static uint32_t tr_union(pmi_cells *c, uint32_t a, uint32_t b) {
    if (a == PMI_NONE) {
        return b;
    }
    if (b == PMI_NONE) {
        return a;
    }
    if (c->nprio[a] < c->nprio[b]) {
        uint32_t t = a;
        a = b;
        b = t;
    }
    uint32_t lo, hi;
    tr_split(c, b, c->nkey[a], &lo, &hi);
    c->nl[a] = tr_union(c, c->nl[a], lo);
    c->nr[a] = tr_union(c, c->nr[a], hi);
    return a;
}

static uint32_t tr_collect(const pmi_cells *c, uint32_t t, uint32_t *out, uint32_t n);
static uint32_t tr_build(pmi_cells *c, const uint32_t *nodes, uint32_t n);

static uint64_t tr_min_key(const pmi_cells *c, uint32_t t) {
    while (c->nl[t] != PMI_NONE) {
        t = c->nl[t];
    }
    return c->nkey[t];
}

static uint64_t tr_max_key(const pmi_cells *c, uint32_t t) {
    while (c->nr[t] != PMI_NONE) {
        t = c->nr[t];
    }
    return c->nkey[t];
}

/* The index of one sequence joined with the sorted new nodes nodes[0..m) (which may be
 * c->tmp): a merge when the key ranges do not overlap, the recursive union when one side is
 * much smaller, else a linear merge of both node lists and a rebuild. */
static uint32_t tr_join(pmi_cells *c, uint32_t a, const uint32_t *nodes, uint32_t m) {
    if (m == 0) {
        return a;
    }
    if (a == PMI_NONE) {
        return tr_build(c, nodes, m);
    }
    if (tr_max_key(c, a) < c->nkey[nodes[0]]) {
        return tr_merge(c, a, tr_build(c, nodes, m));
    }
    if (c->nkey[nodes[m - 1]] < tr_min_key(c, a)) {
        return tr_merge(c, tr_build(c, nodes, m), a);
    }
    uint32_t *xa = c->tmp + 2 * (size_t)c->size, *xb = c->tmp + 3 * (size_t)c->size;
    uint32_t na = tr_collect(c, a, xa, 0);
    if (na > 16 * (uint64_t)m || m > 16 * (uint64_t)na) {
        return tr_union(c, a, tr_build(c, nodes, m));
    }
    memmove(xb, nodes, sizeof(uint32_t) * m);
    uint32_t i = 0, j = 0, k = 0;
    while (i < na || j < m) { /* na + m <= size: both are cells of this stream */
        c->tmp[k++] = (j >= m || (i < na && c->nkey[xa[i]] < c->nkey[xb[j]])) ? xa[i++] : xb[j++];
    }
    return tr_build(c, c->tmp, k);
}

/* the nodes of subtree t in key order, appended to out[n..]; returns the new count */
static uint32_t tr_collect(const pmi_cells *c, uint32_t t, uint32_t *out, uint32_t n) {
    while (t != PMI_NONE) {
        n = tr_collect(c, c->nl[t], out, n);
        out[n++] = t;
        t = c->nr[t];
    }
    return n;
}

/* one node onto the right spine of a Cartesian tree under construction (keys ascending) */
static inline void cart_push(pmi_cells *c, uint32_t nd, uint32_t *stack, uint32_t *sp) {
    uint32_t pr = c->nprio[nd];
    uint32_t last = PMI_NONE;
    while (*sp > 0 && c->nprio[stack[*sp - 1]] < pr) {
        last = stack[--*sp];
    }
    c->nl[nd] = last;
    c->nr[nd] = PMI_NONE;
    if (*sp > 0) {
        c->nr[stack[*sp - 1]] = nd;
    }
    stack[(*sp)++] = nd;
}

/* the treap of nodes[0..n) (ascending keys) in linear time; nodes may alias c->tmp */
static uint32_t tr_build(pmi_cells *c, const uint32_t *nodes, uint32_t n) {
    uint32_t *stack = c->tmp + c->size, sp = 0;
    for (uint32_t j = 0; j < n; ++j) {
        cart_push(c, nodes[j], stack, &sp);
    }
    return sp > 0 ? stack[0] : PMI_NONE;
}

static inline void bound_shift(pmi_cells *c, int32_t v) {
    uint32_t a = v < 0 ? (uint32_t)(-(int64_t)v) : (uint32_t)v;
    if (a > c->shift_bound) {
        c->shift_bound = a;
    }
}

/* every index empty, every node free */
static void idx_clear(pmi_cells *c) {
    for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
        c->root[s] = PMI_NONE;
        c->cnt[s] = 0;
    }
    for (uint32_t n = 0; n < c->ncap; ++n) {
        c->nl[n] = n + 1 < c->ncap ? n + 1 : PMI_NONE;
    }
    c->nfree = 0;
    c->nlive = 0;
}

static void idx_add(pmi_cells *c, pm_seq_id s, pm_pos pos, uint32_t i) {
    uint32_t n = node_new(c, key_of(pos, i));
    c->root[s] = tr_insert(c, c->root[s], n);
    c->cnt[s]++;
}

static void idx_rm(pmi_cells *c, pm_seq_id s, pm_pos pos, uint32_t i) {
    c->root[s] = tr_erase(c, c->root[s], key_of(pos, i));
    c->cnt[s]--;
}

static void idx_all(pmi_cells *c, uint32_t i, bool add) {
    const uint64_t *w = c->seq + (size_t)i * PMI_SEQ_WORDS;
    for (uint32_t k = 0; k < PMI_SEQ_WORDS; ++k) {
        uint64_t bits = w[k];
        while (bits) {
            pm_seq_id s = (pm_seq_id)(k * 64 + (uint32_t)__builtin_ctzll(bits));
            bits &= bits - 1;
            if (add) {
                idx_add(c, s, c->pos[i], i);
            } else {
                idx_rm(c, s, c->pos[i], i);
            }
        }
    }
}

/* ---- lifetime --------------------------------------------------------------------------- */

pm_status pmi_cells_init(pmi_cells *c, uint32_t size) {
    memset(c, 0, sizeof(*c));
    c->size = size;
    c->nwords = (size + 63) / 64;
    c->pos = malloc(sizeof(pm_pos) * size);
    c->shift = calloc(size, sizeof(int32_t));
    c->ext = malloc(sizeof(pmi_ext) * size);
    c->seq = calloc((size_t)size * PMI_SEQ_WORDS, sizeof(uint64_t));
    c->used_bits = calloc(c->nwords ? c->nwords : 1, sizeof(uint64_t));
    c->ncap = size ? size : 1;
    c->nkey = malloc(sizeof(uint64_t) * c->ncap);
    c->nl = malloc(sizeof(uint32_t) * c->ncap);
    c->nr = malloc(sizeof(uint32_t) * c->ncap);
    c->nprio = malloc(sizeof(uint32_t) * c->ncap);
    c->tmp = malloc(sizeof(uint32_t) * 4 * (size_t)(size ? size : 1));
    if (!c->pos || !c->shift || !c->ext || !c->seq || !c->used_bits || !c->nkey || !c->nl ||
        !c->nr || !c->nprio || !c->tmp) {
        pmi_cells_free(c);
        return pmi_fail(PM_E_NOMEM, "out of memory for %u cells", size);
    }
    for (uint32_t i = 0; i < size; ++i) {
        c->pos[i] = -1;
        c->ext[i] = EXT_RESET;
    }
    for (uint32_t n = 0; n < c->ncap; ++n) {
        c->nl[n] = n + 1 < c->ncap ? n + 1 : PMI_NONE;
    }
    c->nfree = 0;
    for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
        c->root[s] = PMI_NONE;
    }
    return PM_OK;
}

void pmi_cells_free(pmi_cells *c) {
    free(c->pos);
    free(c->shift);
    free(c->ext);
    free(c->seq);
    free(c->used_bits);
    free(c->nkey);
    free(c->nl);
    free(c->nr);
    free(c->nprio);
    free(c->tmp);
    free(c->jmark);
    free(c->jrec);
    memset(c, 0, sizeof(*c));
}

uint64_t pmi_cells_nbytes(const pmi_cells *c) {
    uint64_t n = (uint64_t)c->size * (sizeof(pm_pos) + sizeof(int32_t) + sizeof(pmi_ext) +
                                      PMI_SEQ_WORDS * sizeof(uint64_t));
    n += (uint64_t)c->nwords * 8 + (uint64_t)c->ncap * 20 + (uint64_t)c->size * 16;
    if (c->jmark) {
        n += (uint64_t)c->size * (sizeof(uint32_t) + sizeof(pmi_jrec));
    }
    return n;
}

pm_status pmi_cells_reserve(pmi_cells *c, uint64_t extra) {
    if ((uint64_t)c->nlive + extra <= c->ncap) {
        return PM_OK;
    }
    uint64_t want = (uint64_t)c->ncap * 2;
    if (want < (uint64_t)c->nlive + extra) {
        want = (uint64_t)c->nlive + extra;
    }
    if (want > (uint64_t)c->size * PM_MAX_SEQ + 1) {
        want = (uint64_t)c->size * PM_MAX_SEQ + 1;
    }
    if (want >= PMI_NONE || want < (uint64_t)c->nlive + extra) {
        return pmi_fail(PM_E_NOMEM, "sequence index cannot grow to %llu entries",
                        (unsigned long long)((uint64_t)c->nlive + extra));
    }
    uint64_t *k = realloc(c->nkey, sizeof(uint64_t) * want);
    if (k == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory growing the sequence index");
    }
    c->nkey = k;
    uint32_t *l = realloc(c->nl, sizeof(uint32_t) * want);
    if (l == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory growing the sequence index");
    }
    c->nl = l;
    uint32_t *r = realloc(c->nr, sizeof(uint32_t) * want);
    if (r == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory growing the sequence index");
    }
    c->nr = r;
    uint32_t *pr = realloc(c->nprio, sizeof(uint32_t) * want);
    if (pr == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory growing the sequence index");
    }
    c->nprio = pr;
    /* chain the new nodes in front of the free list */
    uint32_t old = c->ncap;
    for (uint32_t n = old; n < (uint32_t)want; ++n) {
        c->nl[n] = n + 1 < (uint32_t)want ? n + 1 : c->nfree;
    }
    c->nfree = old;
    c->ncap = (uint32_t)want;
    return PM_OK;
}

/* ---- queries -------------------------------------------------------------------------- */

pm_seq_id pmi_cells_seq_get(const pmi_cells *c, uint32_t i) {
    const uint64_t *w = c->seq + (size_t)i * PMI_SEQ_WORDS;
    for (uint32_t k = 0; k < PMI_SEQ_WORDS; ++k) {
        if (w[k]) {
            return (pm_seq_id)(k * 64 + (uint32_t)__builtin_ctzll(w[k]));
        }
    }
    return -1;
}

pm_pos pmi_cells_seq_pos_min(const pmi_cells *c, pm_seq_id s) {
    uint32_t t = c->root[s];
    if (t == PMI_NONE) {
        return -1;
    }
    while (c->nl[t] != PMI_NONE) {
        t = c->nl[t];
    }
    return (pm_pos)((uint32_t)(c->nkey[t] >> 32) ^ 0x80000000u);
}

pm_pos pmi_cells_seq_pos_max(const pmi_cells *c, pm_seq_id s) {
    uint32_t t = c->root[s];
    if (t == PMI_NONE) {
        return -1;
    }
    while (c->nr[t] != PMI_NONE) {
        t = c->nr[t];
    }
    return (pm_pos)((uint32_t)(c->nkey[t] >> 32) ^ 0x80000000u);
}

uint32_t pmi_cells_used_max_p1(const pmi_cells *c) {
    for (uint32_t w = c->nwords; w-- > 0;) {
        if (c->used_bits[w]) {
            return w * 64 + 64 - (uint32_t)__builtin_clzll(c->used_bits[w]);
        }
    }
    return 0;
}

static uint32_t tr_range(const pmi_cells *c, uint32_t t, uint64_t lo, uint64_t hi,
                         uint32_t *out, uint32_t n) {
    while (t != PMI_NONE) {
        uint64_t k = c->nkey[t];
        if (k < lo) {
            t = c->nr[t];
        } else if (k >= hi) {
            t = c->nl[t];
        } else {
            n = tr_range(c, c->nl[t], lo, hi, out, n);
            out[n++] = (uint32_t)k;
            t = c->nr[t];
        }
    }
    return n;
}

uint32_t pmi_cells_seq_range(const pmi_cells *c, pm_seq_id s, pm_pos p0, pm_pos p1,
                             uint32_t *out) {
    if (p0 >= p1) {
        return 0;
    }
    return tr_range(c, c->root[s], key_of(p0, 0), key_of(p1, 0), out, 0);
}

pm_token pmi_cells_seq_pos_tok_le(const pmi_cells *c, pm_seq_id s, pm_pos p) {
    /* the largest key <= (p, max cell) */
    uint64_t bound = key_of(p, UINT32_MAX);
    uint32_t t = c->root[s], best = PMI_NONE;
    while (t != PMI_NONE) {
        if (c->nkey[t] <= bound) {
            best = t;
            t = c->nr[t];
        } else {
            t = c->nl[t];
        }
    }
    return best == PMI_NONE ? -1 : c->ext[(uint32_t)c->nkey[best]].tok;
}

/* ---- journal ------------------------------------------------------------------------------ */

static inline void jtouch(pmi_cells *c, uint32_t i) {
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

pm_status pmi_cells_tx_begin(pmi_cells *c) {
    if (c->jmark == NULL) {
        c->jmark = calloc(c->size ? c->size : 1, sizeof(uint32_t));
        c->jrec = malloc(sizeof(pmi_jrec) * (c->size ? c->size : 1));
        if (c->jmark == NULL || c->jrec == NULL) {
            free(c->jmark);
            free(c->jrec);
            c->jmark = NULL;
            c->jrec = NULL;
            return pmi_fail(PM_E_NOMEM, "out of memory for the undo journal");
        }
        c->jepoch = 0;
    }
    if (++c->jepoch == 0) {
        memset(c->jmark, 0, sizeof(uint32_t) * c->size);
        c->jepoch = 1;
    }
    c->jon = true;
    c->jn = 0;
    c->j_has_shift = c->has_shift;
    c->j_shift_bound = c->shift_bound;
    return PM_OK;
}

void pmi_cells_tx_commit(pmi_cells *c) {
    c->jon = false;
    c->jn = 0;
}

static inline void used_set(pmi_cells *c, uint32_t i, bool on) {
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

void pmi_cells_tx_rollback(pmi_cells *c) {
    c->jon = false;
    /* first drop every current membership of the touched cells, then restore: the node
     * count never exceeds the larger of its values before and after */
    for (uint32_t k = c->jn; k-- > 0;) {
        uint32_t i = c->jrec[k].idx;
        if (c->pos[i] != -1) {
            idx_all(c, i, false);
        }
    }
    for (uint32_t k = c->jn; k-- > 0;) {
        const pmi_jrec *r = &c->jrec[k];
        uint32_t i = r->idx;
        c->pos[i] = r->pos;
        c->shift[i] = r->shift;
        c->ext[i] = r->ext;
        memcpy(c->seq + (size_t)i * PMI_SEQ_WORDS, r->seq, sizeof(r->seq));
        used_set(c, i, r->pos != -1);
        if (r->pos != -1) {
            idx_all(c, i, true);
        }
    }
    c->has_shift = c->j_has_shift;
    if (c->j_shift_bound > c->shift_bound) {
        c->shift_bound = c->j_shift_bound;
    }
    c->jn = 0;
}

/* ---- mutations -------------------------------------------------------------------------- */

static inline void seq_clear(pmi_cells *c, uint32_t i) {
    memset(c->seq + (size_t)i * PMI_SEQ_WORDS, 0, sizeof(uint64_t) * PMI_SEQ_WORDS);
}

void pmi_cells_reset(pmi_cells *c) {
    if (c->jon) {
        for (uint32_t w = 0; w < c->nwords; ++w) {
            uint64_t bits = c->used_bits[w];
            while (bits) {
                jtouch(c, w * 64 + (uint32_t)__builtin_ctzll(bits));
                bits &= bits - 1;
            }
        }
        for (uint32_t i = 0; i < c->size; ++i) {
            if (c->shift[i] != 0 || memcmp(&c->ext[i], &EXT_RESET, sizeof(pmi_ext)) != 0) {
                jtouch(c, i);
            }
        }
    }
    for (uint32_t i = 0; i < c->size; ++i) {
        c->pos[i] = -1;
        c->ext[i] = EXT_RESET;
        c->shift[i] = 0;
    }
    memset(c->seq, 0, sizeof(uint64_t) * PMI_SEQ_WORDS * c->size);
    memset(c->used_bits, 0, sizeof(uint64_t) * c->nwords);
    c->used = 0;
    c->has_shift = false;
    c->shift_bound = 0;
    idx_clear(c);
}

void pmi_cells_reset_shift(pmi_cells *c) {
    if (c->jon) {
        for (uint32_t i = 0; i < c->size; ++i) {
            if (c->shift[i] != 0) {
                jtouch(c, i);
            }
        }
    }
    memset(c->shift, 0, sizeof(int32_t) * c->size);
    c->has_shift = false;
    c->shift_bound = 0;
}

/* the cell (already out of every index, no sequence left) becomes empty */
static void make_empty(pmi_cells *c, uint32_t i) {
    c->pos[i] = -1;
    c->ext[i] = EXT_RESET;
    c->shift[i] = 0;
    used_set(c, i, false);
}

void pmi_cells_rm(pmi_cells *c, uint32_t i) {
    jtouch(c, i);
    idx_all(c, i, false);
    seq_clear(c, i);
    make_empty(c, i);
}

void pmi_cells_seq_add(pmi_cells *c, uint32_t i, pm_seq_id s) {
    if (pmi_cells_seq_has(c, i, s)) {
        return;
    }
    jtouch(c, i);
    c->seq[(size_t)i * PMI_SEQ_WORDS + ((uint32_t)s >> 6)] |= 1ULL << ((uint32_t)s & 63);
    idx_add(c, s, c->pos[i], i);
}

void pmi_cells_pos_set(pmi_cells *c, uint32_t i, pm_pos p) {
    jtouch(c, i);
    c->pos[i] = p;
    used_set(c, i, true);
}

void pmi_cells_ext_set(pmi_cells *c, uint32_t i, pmi_ext e) {
    jtouch(c, i);
    c->ext[i] = e;
}

bool pmi_cells_pos_add(pmi_cells *c, uint32_t i, pm_pos d) {
    jtouch(c, i);
    idx_all(c, i, false);
    c->pos[i] += d;
    c->shift[i] += d;
    c->has_shift = true;
    bound_shift(c, c->shift[i]);
    if (c->pos[i] < 0) {
        seq_clear(c, i);
        c->pos[i] = -1;
        c->shift[i] = 0;
        used_set(c, i, false);
        return true; /* ext deliberately kept (llama.cpp) */
    }
    idx_all(c, i, true);
    return false;
}

void pmi_cells_snap(const pmi_cells *c, const uint32_t *idxs, uint32_t n, pmi_cellsnap *out) {
    for (uint32_t j = 0; j < n; ++j) {
        uint32_t i = idxs[j];
        out[j].pos = c->pos[i];
        out[j].ext = c->ext[i];
        memcpy(out[j].seq, c->seq + (size_t)i * PMI_SEQ_WORDS, sizeof(out[j].seq));
    }
}

void pmi_cells_set(pmi_cells *c, const uint32_t *idxs, uint32_t n, const pmi_cellsnap *snap) {
    for (uint32_t j = 0; j < n; ++j) {
        uint32_t i = idxs[j];
        jtouch(c, i);
        if (c->pos[i] != -1) {
            idx_all(c, i, false);
        }
        c->pos[i] = snap[j].pos;
        c->ext[i] = snap[j].ext;
        memcpy(c->seq + (size_t)i * PMI_SEQ_WORDS, snap[j].seq, sizeof(snap[j].seq));
        used_set(c, i, snap[j].pos != -1);
        if (snap[j].pos != -1) {
            idx_all(c, i, true);
        }
    }
}

/* ---- bulk index build ------------------------------------------------------------------------ */

void pmi_cells_seq_set_bit(pmi_cells *c, uint32_t i, pm_seq_id s) {
    c->seq[(size_t)i * PMI_SEQ_WORDS + ((uint32_t)s >> 6)] |= 1ULL << ((uint32_t)s & 63);
}

/* Build the index of every sequence from the cells' bits (the trees must be empty): gather
 * each sequence's keys, sort them (already sorted for packed restores), and build the treap
 * as the Cartesian tree of the priorities with a stack, in linear time. */
void pmi_cells_build_index(pmi_cells *c, uint64_t *keys, uint32_t *stack) {
    uint32_t cnt[PM_MAX_SEQ] = {0}, at[PM_MAX_SEQ];
    for (uint32_t w = 0; w < c->nwords; ++w) {
        for (uint64_t bits = c->used_bits[w]; bits; bits &= bits - 1) {
            const uint64_t *sw = c->seq + (size_t)(w * 64 + (uint32_t)__builtin_ctzll(bits)) * PMI_SEQ_WORDS;
            for (uint32_t k = 0; k < PMI_SEQ_WORDS; ++k) {
                for (uint64_t b = sw[k]; b; b &= b - 1) {
                    cnt[k * 64 + (uint32_t)__builtin_ctzll(b)]++;
                }
            }
        }
    }
    uint32_t o = 0;
    for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
        at[s] = o;
        o += cnt[s];
    }
    /* one pass: every membership's key into its sequence's slice, in cell order */
    for (uint32_t w = 0; w < c->nwords; ++w) {
        for (uint64_t bits = c->used_bits[w]; bits; bits &= bits - 1) {
            uint32_t i = w * 64 + (uint32_t)__builtin_ctzll(bits);
            const uint64_t *sw = c->seq + (size_t)i * PMI_SEQ_WORDS;
            for (uint32_t k = 0; k < PMI_SEQ_WORDS; ++k) {
                for (uint64_t b = sw[k]; b; b &= b - 1) {
                    keys[at[k * 64 + (uint32_t)__builtin_ctzll(b)]++] = key_of(c->pos[i], i);
                }
            }
        }
    }
    uint32_t off = 0; /* an offset, not a pointer: keys may be NULL when nothing is a member */
    for (uint32_t s = 0; s < PM_MAX_SEQ; off += cnt[s], ++s) {
        uint32_t n = cnt[s];
        if (n == 0) {
            continue;
        }
        uint64_t *ks = keys + off;
        for (uint32_t j = 1; j < n; ++j) {
            if (ks[j] < ks[j - 1]) {
                qsort(ks, n, sizeof(uint64_t), cmp_u64);
                break;
            }
        }
        uint32_t sp = 0;
        for (uint32_t j = 0; j < n; ++j) {
            cart_push(c, node_new(c, ks[j]), stack, &sp);
        }
        c->root[s] = stack[0];
        c->cnt[s] = n;
    }
}

/* ---- whole-range sequence operations ---------------------------------------------------------
 * Each detaches the affected key range of one sequence's index with two splits, works on its
 * nodes in key order, and joins the result back (merge or union): the cost follows the cells
 * the operation touches, not the size of the cache.  Cells are journaled as by the per-cell
 * operations, so these compose with transactions. */

static void detach(pmi_cells *c, pm_seq_id s, pm_pos p0, pm_pos p1, uint32_t *lo, uint32_t *mid,
                   uint32_t *hi) {
    tr_split(c, c->root[s], key_of(p0, 0), lo, mid);
    tr_split(c, *mid, key_of(p1, 0), mid, hi);
}

/* every sequence of cell i other than s in or out of its index (the cell's pos as it is now) */
static void idx_others(pmi_cells *c, uint32_t i, pm_seq_id s, bool add) {
    const uint64_t *w = c->seq + (size_t)i * PMI_SEQ_WORDS;
    for (uint32_t k = 0; k < PMI_SEQ_WORDS; ++k) {
        for (uint64_t bits = w[k]; bits; bits &= bits - 1) {
            pm_seq_id o = (pm_seq_id)(k * 64 + (uint32_t)__builtin_ctzll(bits));
            if (o == s) {
                continue;
            }
            if (add) {
                idx_add(c, o, c->pos[i], i);
            } else {
                idx_rm(c, o, c->pos[i], i);
            }
        }
    }
}

uint32_t pmi_cells_seq_rm_range(pmi_cells *c, pm_seq_id s, pm_pos p0, pm_pos p1) {
    uint32_t head = PMI_NONE, lo, mid, hi;
    if (p0 >= p1 || c->root[s] == PMI_NONE) {
        return head;
    }
    detach(c, s, p0, p1, &lo, &mid, &hi);
    uint32_t n = tr_collect(c, mid, c->tmp, 0);
    const uint32_t wq = (uint32_t)s >> 6;
    const uint64_t bit = 1ULL << ((uint32_t)s & 63);
    for (uint32_t k = 0; k < n; ++k) {
        uint32_t t = c->tmp[k], i = (uint32_t)c->nkey[t];
        jtouch(c, i);
        c->seq[(size_t)i * PMI_SEQ_WORDS + wq] &= ~bit;
        if (pmi_cells_seq_none(c, i)) {
            make_empty(c, i);
            if (i < head) {
                head = i;
            }
        }
        node_free(c, t);
    }
    c->cnt[s] -= n;
    c->root[s] = tr_merge(c, lo, hi);
    return head;
}

void pmi_cells_seq_cp_range(pmi_cells *c, pm_seq_id a, pm_seq_id b, pm_pos p0, pm_pos p1) {
    uint32_t n = pmi_cells_seq_range(c, a, p0, p1, c->tmp), m = 0;
    const uint32_t wq = (uint32_t)b >> 6;
    const uint64_t bit = 1ULL << ((uint32_t)b & 63);
    for (uint32_t k = 0; k < n; ++k) {
        uint32_t i = c->tmp[k];
        uint64_t *w = c->seq + (size_t)i * PMI_SEQ_WORDS + wq;
        if (*w & bit) {
            continue;
        }
        jtouch(c, i);
        *w |= bit;
        c->tmp[m++] = node_new(c, key_of(c->pos[i], i)); /* m <= k: in place */
    }
    c->cnt[b] += m;
    c->root[b] = tr_join(c, c->root[b], c->tmp, m);
}

uint32_t pmi_cells_seq_shift_range(pmi_cells *c, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d,
                                   int32_t div) {
    uint32_t head = PMI_NONE, lo, mid, hi;
    if (p0 >= p1 || c->root[s] == PMI_NONE) {
        return head;
    }
    detach(c, s, p0, p1, &lo, &mid, &hi);
    uint32_t n = tr_collect(c, mid, c->tmp, 0), m = 0;
    for (uint32_t k = 0; k < n; ++k) {
        uint32_t t = c->tmp[k], i = (uint32_t)c->nkey[t];
        jtouch(c, i);
        bool shared = pmi_cells_seq_multi(c, i);
        if (shared) {
            idx_others(c, i, s, false);
        }
        pm_pos p_old = c->pos[i];
        c->pos[i] = div ? p_old / div : p_old + d;
        c->shift[i] += div ? p_old - c->pos[i] : d;
        c->has_shift = true;
        bound_shift(c, c->shift[i]);
        if (c->pos[i] < 0 && !div) { /* shifted out: the cell leaves every sequence */
            seq_clear(c, i);
            c->pos[i] = -1;
            c->shift[i] = 0;
            used_set(c, i, false); /* ext deliberately kept (llama.cpp) */
            if (i < head) {
                head = i;
            }
            node_free(c, t);
            continue;
        }
        c->nkey[t] = key_of(c->pos[i], i);
        if (shared) {
            idx_others(c, i, s, true);
        }
        c->tmp[m++] = t;
    }
    if (div) {
        /* p / div is monotonic: keys only fall out of order among equal new positions */
        for (uint32_t k = 1; k < m; ++k) {
            uint32_t t = c->tmp[k], j = k;
            while (j > 0 && c->nkey[c->tmp[j - 1]] > c->nkey[t]) {
                c->tmp[j] = c->tmp[j - 1];
                --j;
            }
            c->tmp[j] = t;
        }
    }
    c->cnt[s] -= n - m;
    c->root[s] = tr_join(c, tr_merge(c, lo, hi), c->tmp, m);
    return head;
}

uint32_t pmi_cells_seq_keep_all(pmi_cells *c, pm_seq_id s) {
    uint32_t head = PMI_NONE;
    const uint32_t wq = (uint32_t)s >> 6;
    const uint64_t bit = 1ULL << ((uint32_t)s & 63);
    for (uint32_t w = 0; w < c->nwords; ++w) {
        for (uint64_t bits = c->used_bits[w]; bits; bits &= bits - 1) {
            uint32_t i = w * 64 + (uint32_t)__builtin_ctzll(bits);
            uint64_t *sw = c->seq + (size_t)i * PMI_SEQ_WORDS;
            if (sw[wq] & bit) {
                if (pmi_cells_seq_multi(c, i)) {
                    jtouch(c, i);
                    seq_clear(c, i);
                    sw[wq] = bit;
                }
            } else if (!pmi_cells_seq_none(c, i)) {
                jtouch(c, i);
                seq_clear(c, i);
                make_empty(c, i);
                if (head == PMI_NONE) {
                    head = i;
                }
            }
        }
    }
    /* only s keeps an index: rebuild it in a fresh node pool */
    uint32_t n = tr_collect(c, c->root[s], c->tmp, 0);
    for (uint32_t k = 0; k < n; ++k) {
        c->tmp[k] = (uint32_t)c->nkey[c->tmp[k]]; /* the cell */
    }
    idx_clear(c);
    for (uint32_t k = 0; k < n; ++k) {
        c->tmp[k] = node_new(c, key_of(c->pos[c->tmp[k]], c->tmp[k]));
    }
    c->cnt[s] = n;
    c->root[s] = tr_build(c, c->tmp, n);
    return head;
}

uint32_t pmi_cells_seq_all(const pmi_cells *c, pm_seq_id s, uint32_t *out) {
    uint32_t n = tr_collect(c, c->root[s], out, 0);
    for (uint32_t k = 0; k < n; ++k) {
        out[k] = (uint32_t)c->nkey[out[k]];
    }
    return n;
}

void pmi_cells_seq_add_many(pmi_cells *c, pm_seq_id s, const uint32_t *cells, uint32_t n) {
    uint64_t *keys = (uint64_t *)(c->tmp + 2 * (size_t)c->size);
    const uint32_t wq = (uint32_t)s >> 6;
    const uint64_t bit = 1ULL << ((uint32_t)s & 63);
    uint32_t m = 0;
    bool sorted = true;
    for (uint32_t k = 0; k < n; ++k) {
        uint32_t i = cells[k];
        uint64_t *w = c->seq + (size_t)i * PMI_SEQ_WORDS + wq;
        if (*w & bit) {
            continue;
        }
        jtouch(c, i);
        *w |= bit;
        keys[m] = key_of(c->pos[i], i);
        sorted = sorted && (m == 0 || keys[m] > keys[m - 1]);
        m++;
    }
    if (!sorted) {
        qsort(keys, m, sizeof(uint64_t), cmp_u64);
    }
    for (uint32_t j = 0; j < m; ++j) {
        c->tmp[j] = node_new(c, keys[j]);
    }
    c->cnt[s] += m;
    c->root[s] = tr_join(c, c->root[s], c->tmp, m);
}
