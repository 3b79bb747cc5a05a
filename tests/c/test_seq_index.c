/* test_seq_index.c - the bulk index build of whole restores (pmi_cells_reset_packed / load /
 * bulk_*) against the index repeated inserts give (pmi_cells_seq_add): the same treap node for
 * node (key, left, right) for every sequence, on random packed cells (several sequences per
 * cell, ids in every word, positions that go down, long pop runs, random chunking) and after
 * a reuse of the same cells (the pool is taken fresh again). */
#include "check.h"
#include "memory/kv_cells.h"

#include <stdlib.h>

/* the subtrees at a (in x) and b (in y) are the same: keys and shape */
static bool same_tree(const pmi_cells *x, uint32_t a, const pmi_cells *y, uint32_t b, uint32_t *n) {
    if (a == PMI_NONE || b == PMI_NONE) {
        return a == b;
    }
    ++*n;
    return x->nkey[a] == y->nkey[b] && same_tree(x, x->nl[a], y, y->nl[b], n) &&
           same_tree(x, x->nr[a], y, y->nr[b], n);
}

typedef struct cellrec {
    pm_pos pos;
    uint64_t w[PMI_SEQ_WORDS];
} cellrec;

static void bulk_load(pmi_cells *c, const cellrec *cells, uint32_t cc, uint64_t *stack, const uint32_t *cap,
                      bool by_runs) {
    pmi_bulk b;
    pmi_cells_reset_packed(c, cc);
    pmi_cells_bulk_start(c, &b, cap, stack);
    uint32_t i0 = 0;
    while (i0 < cc) {
        /* short chunks, and long ones (runs built as 2 or 4 parts at once) */
        uint32_t i1 = i0 + 1 + (check_rand32() % 3 == 0 ? check_rand32() % 3000 : check_rand32() % 80);
        i1 = i1 < cc ? i1 : cc;
        for (uint32_t i = i0; i < i1; ++i) {
            pmi_ext e = {(int32_t)i, -(int32_t)i, (int32_t)(i * 7)};
            pmi_cells_load(c, i, cells[i].pos, i % 3 ? &e : NULL, cells[i].w[0], cells[i].w[1], cells[i].w[2],
                           cells[i].w[3]);
        }
        if (by_runs) { /* as the whole restore calls it: runs of one sequence, other cells alone */
            uint32_t i = i0;
            while (i < i1) {
                uint32_t j = i + 1;
                const uint64_t *w = cells[i].w;
                uint64_t x = w[0] | w[1] | w[2] | w[3];
                bool one = x != 0 && (x & (x - 1)) == 0 && (w[0] != 0) + (w[1] != 0) + (w[2] != 0) + (w[3] != 0) == 1;
                if (one) {
                    while (j < i1 && memcmp(cells[j].w, w, sizeof cells[j].w) == 0) {
                        ++j;
                    }
                    pm_seq_id s = 0;
                    while (!((w[s >> 6] >> (s & 63)) & 1)) {
                        ++s;
                    }
                    pmi_cells_bulk_run(c, &b, (uint32_t)s, i, j);
                } else {
                    pmi_cells_bulk_cells(c, &b, i, j);
                }
                i = j;
            }
        } else {
            pmi_cells_bulk_cells(c, &b, i0, i1);
        }
        i0 = i1;
    }
    pmi_cells_load_end();
    pmi_cells_bulk_finish(c, &b);
}

static void one_case(uint32_t size, uint32_t cc, uint32_t mode) {
    cellrec *cells = calloc(cc ? cc : 1, sizeof(cellrec));
    uint32_t cap[PM_MAX_SEQ] = {0};
    static const pm_seq_id IDS[] = {0, 1, 2, 63, 64, 130, 255};
    uint64_t members = 0;
    for (uint32_t i = 0; i < cc; ++i) {
        /* mode 0: runs of one sequence with ascending positions; 1: random; 2: positions down */
        uint32_t run = i / (1 + size / (size > 4096 ? 2 : 8));
        cells[i].pos = mode == 2 ? (pm_pos)(cc - i) : mode == 1 ? (pm_pos)(check_rand32() % 50) : (pm_pos)i;
        uint32_t nid = mode == 0 ? 1 : check_rand32() % 4;
        for (uint32_t q = 0; q < nid; ++q) {
            pm_seq_id s = mode == 0 ? IDS[run % 7] : IDS[check_rand32() % 7];
            uint64_t bit = 1ULL << (s & 63);
            if (!(cells[i].w[s >> 6] & bit)) {
                cells[i].w[s >> 6] |= bit;
                cap[s]++;
                members++;
            }
        }
    }
    pmi_cells bulk, ref;
    CHECK(pmi_cells_init(&bulk, size) == PM_OK && pmi_cells_init(&ref, size) == PM_OK);
    CHECK(pmi_cells_reserve(&bulk, members) == PM_OK && pmi_cells_reserve(&ref, members) == PM_OK);
    uint64_t *stack = malloc(sizeof(uint64_t) * (pmi_cells_bulk_stack_len(cap) + 1));
    for (uint32_t i = 0; i < cc; ++i) {
        pmi_cells_pos_set(&ref, i, cells[i].pos);
        for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
            if ((cells[i].w[s >> 6] >> (s & 63)) & 1) {
                pmi_cells_seq_add(&ref, i, (pm_seq_id)s);
            }
        }
    }
    /* twice: the second build reuses a pool whose nodes are all taken, and goes by runs */
    for (int rep = 0; rep < 2; ++rep) {
        /* the second time the stacks sit in the cells' scratch when they fit (as restores do) */
        bool in_tmp = rep == 1 && pmi_cells_bulk_stack_len(cap) <= pmi_cells_scratch_u64(&bulk);
        bulk_load(&bulk, cells, cc, in_tmp ? (uint64_t *)bulk.tmp : stack, cap, rep == 1);
        CHECK_MSG(bulk.used == cc && bulk.nlive == members, "size %u cc %u: used %u nlive %u", size, cc, bulk.used,
                  bulk.nlive);
        for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
            uint32_t n = 0;
            CHECK_MSG(bulk.cnt[s] == ref.cnt[s] && same_tree(&bulk, bulk.root[s], &ref, ref.root[s], &n) &&
                          n == ref.cnt[s],
                      "size %u cc %u mode %u rep %d: seq %u differs (%u vs %u members)", size, cc, mode, rep, s,
                      bulk.cnt[s], ref.cnt[s]);
            CHECK(pmi_cells_seq_pos_min(&bulk, (pm_seq_id)s) == pmi_cells_seq_pos_min(&ref, (pm_seq_id)s));
            CHECK(pmi_cells_seq_pos_max(&bulk, (pm_seq_id)s) == pmi_cells_seq_pos_max(&ref, (pm_seq_id)s));
        }
        for (uint32_t i = 0; i < size; ++i) {
            CHECK(bulk.pos[i] == (i < cc ? cells[i].pos : -1) && bulk.shift[i] == 0);
            CHECK(memcmp(bulk.seq + (size_t)i * PMI_SEQ_WORDS, ref.seq + (size_t)i * PMI_SEQ_WORDS,
                         sizeof(uint64_t) * PMI_SEQ_WORDS) == 0);
            CHECK(((bulk.used_bits[i >> 6] >> (i & 63)) & 1) == (i < cc));
        }
        /* the index stays usable: a membership more and one less through the incremental path */
        if (cc > 0) {
            CHECK(pmi_cells_reserve(&bulk, 1) == PM_OK);
            pm_seq_id s = IDS[check_rand32() % 7];
            uint32_t i = check_rand32() % cc;
            pmi_cells_seq_add(&bulk, i, s);
            pmi_cells_rm(&bulk, i);
            CHECK(bulk.nlive == members - pmi_cells_seq_count(&ref, i));
        }
    }
    free(stack);
    free(cells);
    pmi_cells_free(&bulk);
    pmi_cells_free(&ref);
}

static void test_bulk_build_matches_inserts(void) {
    static const uint32_t SIZES[] = {1, 2, 7, 64, 65, 200, 1000, 4096, 5000};
    for (size_t k = 0; k < sizeof SIZES / sizeof SIZES[0]; ++k) {
        for (uint32_t mode = 0; mode < 3; ++mode) {
            uint32_t size = SIZES[k];
            one_case(size, size, mode);
            one_case(size, size / 2, mode);
            one_case(size, 0, mode);
        }
    }
}

int main(void) {
    (void)check_randf;
    RUN(test_bulk_build_matches_inserts);
    return check_report("test_seq_index");
}
