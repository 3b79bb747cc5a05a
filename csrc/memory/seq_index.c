/* seq_index.c - the per-sequence ordered index of a KV stream: a treap of (pos, cell) keys per
 * sequence whose shape is a pure function of its keys (priorities are hashes of the cell), so
 * seq_pos_min/max and range queries never scan the cells.  Treap primitives (split, merge,
 * join, build), index maintenance, index queries and the bulk build used by restores.
 * kv_cells.c owns the cells and calls these.
 */
#include "memory/seq_index.h"

#include <stdlib.h>

/* keys < key go to *lo, the others to *hi */
void pmi_tr_split(pmi_cells *c, uint32_t t, uint64_t key, uint32_t *lo, uint32_t *hi) {
    if (t == PMI_NONE) {
        *lo = *hi = PMI_NONE;
    } else if (c->nkey[t] < key) {
        pmi_tr_split(c, c->nr[t], key, &c->nr[t], hi);
        *lo = t;
    } else {
        pmi_tr_split(c, c->nl[t], key, lo, &c->nl[t]);
        *hi = t;
    }
}

uint32_t pmi_tr_merge(pmi_cells *c, uint32_t a, uint32_t b) {
    if (a == PMI_NONE) {
        return b;
    }
    if (b == PMI_NONE) {
        return a;
    }
    if (c->nprio[a] > c->nprio[b]) {
        c->nr[a] = pmi_tr_merge(c, c->nr[a], b);
        return a;
    }
    c->nl[b] = pmi_tr_merge(c, a, c->nl[b]);
    return b;
}

uint32_t pmi_tr_insert(pmi_cells *c, uint32_t t, uint32_t n) {
    if (t == PMI_NONE) {
        return n;
    }
    uint64_t k = c->nkey[n];
    if (c->nprio[n] > c->nprio[t]) {
        pmi_tr_split(c, t, k, &c->nl[n], &c->nr[n]);
        return n;
    }
    if (k < c->nkey[t]) {
        c->nl[t] = pmi_tr_insert(c, c->nl[t], n);
    } else {
        c->nr[t] = pmi_tr_insert(c, c->nr[t], n);
    }
    return t;
}

uint32_t pmi_tr_erase(pmi_cells *c, uint32_t t, uint64_t key) {
    if (t == PMI_NONE) {
        return t;
    }
    if (c->nkey[t] == key) {
        uint32_t r = pmi_tr_merge(c, c->nl[t], c->nr[t]);
        node_free(c, t);
        return r;
    }
    if (key < c->nkey[t]) {
        c->nl[t] = pmi_tr_erase(c, c->nl[t], key);
    } else {
        c->nr[t] = pmi_tr_erase(c, c->nr[t], key);
    }
    return t;
}

/* the union of two treaps with disjoint key sets */
uint32_t pmi_tr_union(pmi_cells *c, uint32_t a, uint32_t b) {
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
    pmi_tr_split(c, b, c->nkey[a], &lo, &hi);
    c->nl[a] = pmi_tr_union(c, c->nl[a], lo);
    c->nr[a] = pmi_tr_union(c, c->nr[a], hi);
    return a;
}


uint64_t pmi_tr_min_key(const pmi_cells *c, uint32_t t) {
    while (c->nl[t] != PMI_NONE) {
        t = c->nl[t];
    }
    return c->nkey[t];
}

uint64_t pmi_tr_max_key(const pmi_cells *c, uint32_t t) {
    while (c->nr[t] != PMI_NONE) {
        t = c->nr[t];
    }
    return c->nkey[t];
}

/* The index of one sequence joined with the sorted new nodes nodes[0..m) (which may be
 * c->tmp): a merge when the key ranges do not overlap, the recursive union when one side is
 * much smaller, else a linear merge of both node lists and a rebuild. */
uint32_t pmi_tr_join(pmi_cells *c, uint32_t a, const uint32_t *nodes, uint32_t m) {
    if (m == 0) {
        return a;
    }
    if (a == PMI_NONE) {
        return pmi_tr_build(c, nodes, m);
    }
    if (pmi_tr_max_key(c, a) < c->nkey[nodes[0]]) {
        return pmi_tr_merge(c, a, pmi_tr_build(c, nodes, m));
    }
    if (c->nkey[nodes[m - 1]] < pmi_tr_min_key(c, a)) {
        return pmi_tr_merge(c, pmi_tr_build(c, nodes, m), a);
    }
    uint32_t *xa = c->tmp + 2 * (size_t)c->size, *xb = c->tmp + 3 * (size_t)c->size;
    uint32_t na = pmi_tr_collect(c, a, xa, 0);
    if (na > 16 * (uint64_t)m || m > 16 * (uint64_t)na) {
        return pmi_tr_union(c, a, pmi_tr_build(c, nodes, m));
    }
    memmove(xb, nodes, sizeof(uint32_t) * m);
    uint32_t i = 0, j = 0, k = 0;
    while (i < na || j < m) { /* na + m <= size: both are cells of this stream */
        c->tmp[k++] = (j >= m || (i < na && c->nkey[xa[i]] < c->nkey[xb[j]])) ? xa[i++] : xb[j++];
    }
    return pmi_tr_build(c, c->tmp, k);
}

/* the nodes of subtree t in key order, appended to out[n..]; returns the new count */
uint32_t pmi_tr_collect(const pmi_cells *c, uint32_t t, uint32_t *out, uint32_t n) {
    while (t != PMI_NONE) {
        n = pmi_tr_collect(c, c->nl[t], out, n);
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
uint32_t pmi_tr_build(pmi_cells *c, const uint32_t *nodes, uint32_t n) {
    uint32_t *stack = c->tmp + c->size, sp = 0;
    for (uint32_t j = 0; j < n; ++j) {
        cart_push(c, nodes[j], stack, &sp);
    }
    return sp > 0 ? stack[0] : PMI_NONE;
}

/* every index empty, every node free */
void pmi_idx_clear(pmi_cells *c) {
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

void pmi_idx_add(pmi_cells *c, pm_seq_id s, pm_pos pos, uint32_t i) {
    uint32_t n = node_new(c, key_of(pos, i));
    c->root[s] = pmi_tr_insert(c, c->root[s], n);
    c->cnt[s]++;
}

void pmi_idx_rm(pmi_cells *c, pm_seq_id s, pm_pos pos, uint32_t i) {
    c->root[s] = pmi_tr_erase(c, c->root[s], key_of(pos, i));
    c->cnt[s]--;
}

void pmi_idx_all(pmi_cells *c, uint32_t i, bool add) {
    const uint64_t *w = c->seq + (size_t)i * PMI_SEQ_WORDS;
    for (uint32_t k = 0; k < PMI_SEQ_WORDS; ++k) {
        uint64_t bits = w[k];
        while (bits) {
            pm_seq_id s = (pm_seq_id)(k * 64 + (uint32_t)__builtin_ctzll(bits));
            bits &= bits - 1;
            if (add) {
                pmi_idx_add(c, s, c->pos[i], i);
            } else {
                pmi_idx_rm(c, s, c->pos[i], i);
            }
        }
    }
}

/* ---- index queries ------------------------------------------------------------------------ */

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


uint32_t pmi_tr_range(const pmi_cells *c, uint32_t t, uint64_t lo, uint64_t hi,
                         uint32_t *out, uint32_t n) {
    while (t != PMI_NONE) {
        uint64_t k = c->nkey[t];
        if (k < lo) {
            t = c->nr[t];
        } else if (k >= hi) {
            t = c->nl[t];
        } else {
            n = pmi_tr_range(c, c->nl[t], lo, hi, out, n);
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
    return pmi_tr_range(c, c->root[s], key_of(p0, 0), key_of(p1, 0), out, 0);
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

/* ---- bulk index build ------------------------------------------------------------------------ */

void pmi_cells_seq_set_bit(pmi_cells *c, uint32_t i, pm_seq_id s) {
    c->seq[(size_t)i * PMI_SEQ_WORDS + ((uint32_t)s >> 6)] |= 1ULL << ((uint32_t)s & 63);
}

/* Build the index of every sequence from the cells' bits (the trees must be empty): gather
 * each sequence's keys, sort them (already sorted for packed restores), and build the treap
 * as the Cartesian tree of the priorities with a stack, in linear time. */
void pmi_cells_build_index(pmi_cells *c, uint64_t *keys, uint64_t *stack, const uint32_t *counts) {
    uint32_t cnt[PM_MAX_SEQ] = {0}, at[PM_MAX_SEQ];
    if (counts != NULL) {
        memcpy(cnt, counts, sizeof cnt);
    }
    for (uint32_t w = 0; w < c->nwords && counts == NULL; ++w) {
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
                qsort(ks, n, sizeof(uint64_t), pmi_cmp_u64);
                break;
            }
        }
        /* cart_push with each node's priority kept on the stack next to it (no dependent
         * load of nprio per comparison) */
        uint32_t sp = 0;
        for (uint32_t j = 0; j < n; ++j) {
            uint32_t nd = node_new(c, ks[j]), pr = c->nprio[nd], last = PMI_NONE;
            while (sp > 0 && (uint32_t)(stack[sp - 1] >> 32) < pr) {
                last = (uint32_t)stack[--sp];
            }
            c->nl[nd] = last;
            if (sp > 0) {
                c->nr[(uint32_t)stack[sp - 1]] = nd;
            }
            stack[sp++] = ((uint64_t)pr << 32) | nd;
        }
        c->root[s] = (uint32_t)stack[0];
        c->cnt[s] = n;
    }
}

uint32_t pmi_cells_seq_all(const pmi_cells *c, pm_seq_id s, uint32_t *out) {
    uint32_t n = pmi_tr_collect(c, c->root[s], out, 0);
    for (uint32_t k = 0; k < n; ++k) {
        out[k] = (uint32_t)c->nkey[out[k]];
    }
    return n;
}
