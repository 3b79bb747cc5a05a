/* kv_cells.c - cell metadata of one KV stream (llama.cpp's llama_kv_cells, SPEC section 3).
 *
 * Structure of arrays: pos, shift, ext and a 256-bit sequence set per cell, a bitmap of
 * used cells, and per sequence an ordered index of (pos, cell) pairs kept as a treap whose
 * shape is a pure function of its keys (priorities are hashes), so seq_pos_min/max and
 * range queries never scan the cells.  An optional journal records the first change of
 * each cell so that a failed composite operation can be undone exactly.
 */
#include "memory/seq_index.h"

#include <stdlib.h>

static const pmi_ext EXT_RESET = {0, 0, -1};

/* ---- per-sequence treap ------------------------------------------------------------- */

static inline void bound_shift(pmi_cells *c, int32_t v) {
    uint32_t a = v < 0 ? (uint32_t)(-(int64_t)v) : (uint32_t)v;
    if (a > c->shift_bound) {
        c->shift_bound = a;
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
    c->nfree = PMI_NONE; /* every node fresh */
    c->nfresh = 0;
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
    /* the new nodes are fresh (nfresh <= the old ncap: nothing to chain) */
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

/* ---- queries -------------------------------------------------------------------------- */

uint32_t pmi_cells_used_max_p1(const pmi_cells *c) {
    for (uint32_t w = c->nwords; w-- > 0;) {
        if (c->used_bits[w]) {
            return w * 64 + 64 - (uint32_t)__builtin_clzll(c->used_bits[w]);
        }
    }
    return 0;
}

/* ---- journal ------------------------------------------------------------------------------ */


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


void pmi_cells_tx_rollback(pmi_cells *c) {
    c->jon = false;
    /* first drop every current membership of the touched cells, then restore: the node
     * count never exceeds the larger of its values before and after */
    for (uint32_t k = c->jn; k-- > 0;) {
        uint32_t i = c->jrec[k].idx;
        if (c->pos[i] != -1) {
            pmi_idx_all(c, i, false);
        }
    }
    for (uint32_t k = c->jn; k-- > 0;) {
        const pmi_jrec *r = &c->jrec[k];
        uint32_t i = r->idx;
        c->pos[i] = r->pos;
        c->shift[i] = r->shift;
        c->ext[i] = r->ext;
        memcpy(c->seq + (size_t)i * PMI_SEQ_WORDS, r->seq, sizeof(r->seq));
        pmi_cells_used_set(c, i, r->pos != -1);
        if (r->pos != -1) {
            pmi_idx_all(c, i, true);
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
                pmi_cells_jtouch(c, w * 64 + (uint32_t)__builtin_ctzll(bits));
                bits &= bits - 1;
            }
        }
        for (uint32_t i = 0; i < c->size; ++i) {
            if (c->shift[i] != 0 || memcmp(&c->ext[i], &EXT_RESET, sizeof(pmi_ext)) != 0) {
                pmi_cells_jtouch(c, i);
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
    pmi_idx_clear(c);
}

void pmi_cells_reset_packed(pmi_cells *c, uint32_t cc) {
    for (uint32_t i = cc; i < c->size; ++i) {
        c->pos[i] = -1;
        c->ext[i] = EXT_RESET;
        c->shift[i] = 0;
    }
    memset(c->seq + (size_t)cc * PMI_SEQ_WORDS, 0, sizeof(uint64_t) * PMI_SEQ_WORDS * (c->size - cc));
    for (uint32_t w = 0; w < c->nwords; ++w) {
        uint32_t lo = w * 64;
        c->used_bits[w] = cc >= lo + 64 ? UINT64_MAX : cc > lo ? (1ULL << (cc - lo)) - 1 : 0;
    }
    c->used = cc;
    c->has_shift = false;
    c->shift_bound = 0;
    pmi_idx_clear(c);
}

void pmi_cells_reset_shift(pmi_cells *c) {
    if (c->jon) {
        for (uint32_t i = 0; i < c->size; ++i) {
            if (c->shift[i] != 0) {
                pmi_cells_jtouch(c, i);
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
    pmi_cells_used_set(c, i, false);
}

void pmi_cells_rm(pmi_cells *c, uint32_t i) {
    pmi_cells_jtouch(c, i);
    pmi_idx_all(c, i, false);
    seq_clear(c, i);
    make_empty(c, i);
}

void pmi_cells_seq_add(pmi_cells *c, uint32_t i, pm_seq_id s) {
    if (pmi_cells_seq_has(c, i, s)) {
        return;
    }
    pmi_cells_jtouch(c, i);
    c->seq[(size_t)i * PMI_SEQ_WORDS + ((uint32_t)s >> 6)] |= 1ULL << ((uint32_t)s & 63);
    pmi_idx_add(c, s, c->pos[i], i);
}



bool pmi_cells_pos_add(pmi_cells *c, uint32_t i, pm_pos d) {
    pmi_cells_jtouch(c, i);
    pmi_idx_all(c, i, false);
    c->pos[i] += d;
    c->shift[i] += d;
    c->has_shift = true;
    bound_shift(c, c->shift[i]);
    if (c->pos[i] < 0) {
        seq_clear(c, i);
        c->pos[i] = -1;
        c->shift[i] = 0;
        pmi_cells_used_set(c, i, false);
        return true; /* ext deliberately kept (llama.cpp) */
    }
    pmi_idx_all(c, i, true);
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
        pmi_cells_jtouch(c, i);
        if (c->pos[i] != -1) {
            pmi_idx_all(c, i, false);
        }
        c->pos[i] = snap[j].pos;
        c->ext[i] = snap[j].ext;
        memcpy(c->seq + (size_t)i * PMI_SEQ_WORDS, snap[j].seq, sizeof(snap[j].seq));
        pmi_cells_used_set(c, i, snap[j].pos != -1);
        if (snap[j].pos != -1) {
            pmi_idx_all(c, i, true);
        }
    }
}

/* ---- whole-range sequence operations ---------------------------------------------------------
 * Each detaches the affected key range of one sequence's index with two splits, works on its
 * nodes in key order, and joins the result back (merge or union): the cost follows the cells
 * the operation touches, not the size of the cache.  Cells are journaled as by the per-cell
 * operations, so these compose with transactions. */

static void detach(pmi_cells *c, pm_seq_id s, pm_pos p0, pm_pos p1, uint32_t *lo, uint32_t *mid,
                   uint32_t *hi) {
    pmi_tr_split(c, c->root[s], key_of(p0, 0), lo, mid);
    pmi_tr_split(c, *mid, key_of(p1, 0), mid, hi);
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
                pmi_idx_add(c, o, c->pos[i], i);
            } else {
                pmi_idx_rm(c, o, c->pos[i], i);
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
    uint32_t n = pmi_tr_collect(c, mid, c->tmp, 0);
    const uint32_t wq = (uint32_t)s >> 6;
    const uint64_t bit = 1ULL << ((uint32_t)s & 63);
    for (uint32_t k = 0; k < n; ++k) {
        uint32_t t = c->tmp[k], i = (uint32_t)c->nkey[t];
        pmi_cells_jtouch(c, i);
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
    c->root[s] = pmi_tr_merge(c, lo, hi);
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
        pmi_cells_jtouch(c, i);
        *w |= bit;
        c->tmp[m++] = node_new(c, key_of(c->pos[i], i)); /* m <= k: in place */
    }
    c->cnt[b] += m;
    c->root[b] = pmi_tr_join(c, c->root[b], c->tmp, m);
}

uint32_t pmi_cells_seq_shift_range(pmi_cells *c, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d,
                                   int32_t div) {
    uint32_t head = PMI_NONE, lo, mid, hi;
    if (p0 >= p1 || c->root[s] == PMI_NONE) {
        return head;
    }
    detach(c, s, p0, p1, &lo, &mid, &hi);
    uint32_t n = pmi_tr_collect(c, mid, c->tmp, 0), m = 0;
    for (uint32_t k = 0; k < n; ++k) {
        uint32_t t = c->tmp[k], i = (uint32_t)c->nkey[t];
        pmi_cells_jtouch(c, i);
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
            pmi_cells_used_set(c, i, false); /* ext deliberately kept (llama.cpp) */
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
    c->root[s] = pmi_tr_join(c, pmi_tr_merge(c, lo, hi), c->tmp, m);
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
                    pmi_cells_jtouch(c, i);
                    seq_clear(c, i);
                    sw[wq] = bit;
                }
            } else if (!pmi_cells_seq_none(c, i)) {
                pmi_cells_jtouch(c, i);
                seq_clear(c, i);
                make_empty(c, i);
                if (head == PMI_NONE) {
                    head = i;
                }
            }
        }
    }
    /* only s keeps an index: rebuild it in a fresh node pool */
    uint32_t n = pmi_tr_collect(c, c->root[s], c->tmp, 0);
    for (uint32_t k = 0; k < n; ++k) {
        c->tmp[k] = (uint32_t)c->nkey[c->tmp[k]]; /* the cell */
    }
    pmi_idx_clear(c);
    for (uint32_t k = 0; k < n; ++k) {
        c->tmp[k] = node_new(c, key_of(c->pos[c->tmp[k]], c->tmp[k]));
    }
    c->cnt[s] = n;
    c->root[s] = pmi_tr_build(c, c->tmp, n);
    return head;
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
        pmi_cells_jtouch(c, i);
        *w |= bit;
        keys[m] = key_of(c->pos[i], i);
        sorted = sorted && (m == 0 || keys[m] > keys[m - 1]);
        m++;
    }
    if (!sorted) {
        qsort(keys, m, sizeof(uint64_t), pmi_cmp_u64);
    }
    for (uint32_t j = 0; j < m; ++j) {
        c->tmp[j] = node_new(c, keys[j]);
    }
    c->cnt[s] += m;
    c->root[s] = pmi_tr_join(c, c->root[s], c->tmp, m);
}
