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
    c->nfree = PMI_NONE; /* every node fresh: O(1), no chain to rebuild */
    c->nfresh = 0;
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

/* The bulk build: every sequence's treap is the Cartesian tree of its priorities over its keys
 * in ascending order, built left to right on a stack of (priority << 32 | node) entries (the
 * right spine; priorities fall from the bottom up), in linear time, all sequences at once as
 * the cells arrive in ascending order (their keys are then ascending unless positions go
 * down, fixed in pmi_cells_bulk_finish).  Each stack sits on PMI_BULK_SENTINELS entries of
 * UINT64_MAX that never pop (no priority exceeds UINT32_MAX) and keeps a UINT64_MAX mark one
 * above its top, so the count a new node pops is taken branch-free from the top 4 (the stack
 * is monotonic; a loop only when all 4 pop) and the new node's left child is read off the
 * stack either way (bulk_push).  A long run is built as 2 or 4 parts at once, joined by a
 * treap merge (build_parts).  The shape is the one repeated inserts give: a function of the
 * keys alone (tests/c/test_seq_index.c). */
uint64_t pmi_cells_bulk_stack_len(const uint32_t *cap) {
    uint64_t n = 0;
    for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
        n += cap[s] ? (uint64_t)cap[s] + 4 * PMI_BULK_SENTINELS : 0;
    }
    return n + 1; /* the last stack's mark above its top */
}

void pmi_cells_bulk_start(pmi_cells *c, pmi_bulk *b, const uint32_t *cap, uint64_t *stack) {
    uint32_t o = 0;
    b->stack = stack;
    memset(b->unsorted, 0, sizeof b->unsorted);
    for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
        b->sp[s] = b->base[s] = b->end[s] = o + PMI_BULK_SENTINELS;
        b->last[s] = 0;
        if (cap[s]) {
            for (uint32_t k = 0; k <= PMI_BULK_SENTINELS; ++k) { /* and the mark above the top */
                stack[o + k] = UINT64_MAX;
            }
            /* room for every member and the sentinels of 3 more stacks (build_parts) */
            o += cap[s] + 4 * PMI_BULK_SENTINELS;
            b->end[s] = o;
        }
    }
    c->nfree = PMI_NONE; /* every index is empty: every node is fresh, taken in order */
    c->nfresh = 0;
}

/* node nd of priority pr onto the stack whose top is stk[sp - 1]; returns the new top.  Each
 * stack keeps UINT64_MAX one above its top (a mark whose low half is PMI_NONE: the new node's
 * left child when nothing pops). */
static inline __attribute__((always_inline)) uint32_t bulk_push(uint64_t *restrict stk, uint32_t sp,
                                                                uint32_t *restrict nl, uint32_t *restrict nr,
                                                                uint32_t nd, uint32_t pr) {
    uint64_t below = (uint64_t)pr << 32;
    const uint64_t *top = stk + sp;
    uint32_t k = ((uint32_t)(top[-1] < below) + (uint32_t)(top[-2] < below)) +
                 ((uint32_t)(top[-3] < below) + (uint32_t)(top[-4] < below));
    if (__builtin_expect(k == 4, 0)) { /* 6% of nodes pop 4 or more */
        while (top[-1 - (int)k] < below) { /* stops at the sentinels */
            ++k;
        }
    }
    nl[nd] = (uint32_t)top[-(int)k]; /* the lowest popped entry, or the mark above the top */
    sp -= k;
    uint32_t par = (uint32_t)stk[sp - 1];
    par = par == PMI_NONE ? nd : par; /* a sentinel: the spine was empty */
    nr[par] = nd;
    nr[nd] = PMI_NONE;
    stk[sp] = below | nd;
    stk[sp + 1] = UINT64_MAX;
    return sp + 1;
}

/* the treap merge of x and y (every key of x below y's) along x's right and y's left spine */
static uint32_t zip(pmi_cells *c, uint32_t x, uint32_t y) {
    uint32_t root = PMI_NONE, *link = &root;
    while (x != PMI_NONE && y != PMI_NONE) {
        if (c->nprio[x] > c->nprio[y]) {
            *link = x;
            link = &c->nr[x];
            x = c->nr[x];
        } else {
            *link = y;
            link = &c->nl[y];
            y = c->nl[y];
        }
    }
    *link = x != PMI_NONE ? x : y;
    return root;
}

/* a part built on its own stack stk[bot..top) joins the stack stk[..sp) of the nodes before
 * it: the entries below the part's root pop, their subtree merges with it, and the part's
 * spine goes on top (the treap of the union); returns the new top */
static uint32_t join_part(pmi_cells *c, uint64_t *stk, uint32_t sp, uint32_t bot, uint32_t top) {
    uint64_t rb = stk[bot], below = rb & ~(uint64_t)UINT32_MAX;
    uint32_t x = PMI_NONE;
    while (stk[sp - 1] < below) { /* stops at the sentinels */
        x = (uint32_t)stk[--sp];
    }
    uint32_t under = (uint32_t)stk[sp - 1];
    uint32_t root = zip(c, x, (uint32_t)rb);
    if (under != PMI_NONE) {
        c->nr[under] = root;
    }
    memmove(stk + sp, stk + bot, sizeof(uint64_t) * (top - bot));
    sp += top - bot;
    stk[sp] = UINT64_MAX; /* the mark above the top */
    return sp;
}

/* the bottom of a stack of n entries ending at hi, its sentinels under it */
static uint32_t part_stack(uint64_t *stk, uint32_t hi, uint32_t n) {
    for (uint32_t k = 0; k <= PMI_BULK_SENTINELS; ++k) { /* and the mark above the empty top */
        stk[hi - n - k] = UINT64_MAX;
    }
    return hi - n;
}

/* Nodes nd0..nd0+n-1 (priorities pr[0..n)) onto the stack stk[..sp): a long run as 4 (or 2)
 * parts at once (independent dependency chains), part 0 on that stack and the others on
 * stacks of their own at the end of the region (below end), joined in order after. */
static uint32_t build_parts(pmi_cells *c, uint64_t *restrict stk, uint32_t sp, uint32_t end, uint32_t nd0,
                            const uint32_t *restrict pr, uint32_t n) {
    uint32_t *restrict nl = c->nl;
    uint32_t *restrict nr = c->nr;
    if (n >= 256) {
        const uint32_t len = n / 4, l3 = n - 3 * len;
        const uint32_t b3 = part_stack(stk, end, l3);
        const uint32_t b2 = part_stack(stk, b3 - PMI_BULK_SENTINELS, len);
        const uint32_t b1 = part_stack(stk, b2 - PMI_BULK_SENTINELS, len);
        uint32_t t1 = b1, t2 = b2, t3 = b3;
        for (uint32_t t = 0; t < len; ++t) {
            sp = bulk_push(stk, sp, nl, nr, nd0 + t, pr[t]);
            t1 = bulk_push(stk, t1, nl, nr, nd0 + len + t, pr[len + t]);
            t2 = bulk_push(stk, t2, nl, nr, nd0 + 2 * len + t, pr[2 * len + t]);
            t3 = bulk_push(stk, t3, nl, nr, nd0 + 3 * len + t, pr[3 * len + t]);
        }
        for (uint32_t t = len; t < l3; ++t) {
            t3 = bulk_push(stk, t3, nl, nr, nd0 + 3 * len + t, pr[3 * len + t]);
        }
        sp = join_part(c, stk, sp, b1, t1);
        sp = join_part(c, stk, sp, b2, t2);
        return join_part(c, stk, sp, b3, t3);
    }
    if (n >= 64) {
        const uint32_t len = n / 2, l1 = n - len;
        const uint32_t b1 = part_stack(stk, end, l1);
        uint32_t t1 = b1;
        for (uint32_t t = 0; t < len; ++t) {
            sp = bulk_push(stk, sp, nl, nr, nd0 + t, pr[t]);
            t1 = bulk_push(stk, t1, nl, nr, nd0 + len + t, pr[len + t]);
        }
        if (l1 > len) {
            t1 = bulk_push(stk, t1, nl, nr, nd0 + n - 1, pr[n - 1]);
        }
        return join_part(c, stk, sp, b1, t1);
    }
    for (uint32_t t = 0; t < n; ++t) {
        sp = bulk_push(stk, sp, nl, nr, nd0 + t, pr[t]);
    }
    return sp;
}

/* Cells i..j-1, each a member of s alone, onto s's stack, as nodes nfresh.. in cell order.
 * Keys, priorities and the order check first, in loops the compiler vectorizes; then the
 * stack loops (build_parts). */
void pmi_cells_bulk_run(pmi_cells *c, pmi_bulk *b, uint32_t s, uint32_t i, uint32_t j) {
    uint64_t *restrict stk = b->stack;
    const uint32_t nd0 = c->nfresh, n = j - i;
    uint64_t *restrict nkey = c->nkey + nd0;
    uint32_t *restrict nprio = c->nprio + nd0;
    const pm_pos *restrict pos = c->pos + i;
    for (uint32_t t = 0; t < n; ++t) {
        nkey[t] = ((uint64_t)((uint32_t)pos[t] ^ 0x80000000u) << 32) | (i + t); /* key_of */
    }
    for (uint32_t t = 0; t < n; ++t) {
        nprio[t] = prio_of(i + t); /* a hash of the cell: the low half of the key */
    }
    uint32_t down = nkey[0] < b->last[s];
    for (uint32_t t = 1; t < n; ++t) {
        down |= pos[t] < pos[t - 1]; /* cells ascend: keys ascend unless positions go down */
    }
    b->sp[s] = build_parts(c, stk, b->sp[s], b->end[s], nd0, nprio, n);
    c->nfresh = nd0 + n;
    c->cnt[s] += n;
    b->last[s] = nkey[n - 1];
    b->unsorted[s >> 6] |= (uint64_t)down << (s & 63);
}

void pmi_cells_bulk_cells(pmi_cells *c, pmi_bulk *b, uint32_t i0, uint32_t i1) {
    uint32_t i = i0;
    while (i < i1) {
        const uint64_t *sw = c->seq + (size_t)i * PMI_SEQ_WORDS;
        uint32_t j = i + 1;
        if (pmi_cells_seq_multi(c, i)) {
            /* several sequences: one run of one cell for each */
            for (uint32_t k = 0; k < PMI_SEQ_WORDS; ++k) {
                for (uint64_t bits = sw[k]; bits; bits &= bits - 1) {
                    pmi_cells_bulk_run(c, b, k * 64 + (uint32_t)__builtin_ctzll(bits), i, j);
                }
            }
        } else if (!pmi_cells_seq_none(c, i)) {
            while (j < i1 && memcmp(c->seq + (size_t)j * PMI_SEQ_WORDS, sw, sizeof(uint64_t) * PMI_SEQ_WORDS) == 0) {
                ++j;
            }
            pmi_cells_bulk_run(c, b, (uint32_t)pmi_cells_seq_get(c, i), i, j);
        }
        i = j;
    }
}

void pmi_cells_bulk_finish(pmi_cells *c, pmi_bulk *b) {
    c->nlive = c->nfresh;
    for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
        if (c->cnt[s] != 0) {
            c->root[s] = (uint32_t)b->stack[b->base[s]]; /* the bottom of the right spine */
        }
    }
    /* where positions went down, the same nodes get the keys in ascending order and the tree
     * is built again (in c->tmp: nodes, the build's stack, keys; the spent stacks may have
     * been there) */
    uint64_t *keys = (uint64_t *)(c->tmp + 2 * (size_t)c->size);
    for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
        if (c->cnt[s] == 0 || !((b->unsorted[s >> 6] >> (s & 63)) & 1)) {
            continue;
        }
        uint32_t n = pmi_tr_collect(c, c->root[s], c->tmp, 0);
        for (uint32_t j = 0; j < n; ++j) {
            keys[j] = c->nkey[c->tmp[j]];
        }
        qsort(keys, n, sizeof(uint64_t), pmi_cmp_u64);
        for (uint32_t j = 0; j < n; ++j) {
            c->nkey[c->tmp[j]] = keys[j];
            c->nprio[c->tmp[j]] = prio_of(keys[j]);
        }
        c->root[s] = pmi_tr_build(c, c->tmp, n);
    }
}

/* In order without recursion: the pending ancestors are kept at the end of out, below
 * out[cnt[s]] (the cells found and the nodes pending never exceed the cnt[s] nodes, so the
 * stack never reaches a cell still to be read). */
uint32_t pmi_cells_seq_all(const pmi_cells *c, pm_seq_id s, uint32_t *out) {
    const uint32_t n = c->cnt[s];
    uint32_t o = 0, top = n, t = c->root[s];
    for (;;) {
        while (t != PMI_NONE) {
            out[--top] = t;
            t = c->nl[t];
        }
        if (top == n) {
            return o;
        }
        t = out[top++];
        out[o++] = (uint32_t)c->nkey[t];
        t = c->nr[t];
    }
}
