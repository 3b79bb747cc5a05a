/* fuzz_common.h - shared helpers of the fuzz targets: cache configurations, a snapshot of
 * everything observable, invariants and round trips.  A violated invariant prints what
 * and aborts (libFuzzer and the replay programs report it as a crash). */
#ifndef PM_FUZZ_COMMON_H
#define PM_FUZZ_COMMON_H

#include <pymem.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../common/kv_fixture.h"

/* Save the current input before dying: replay_main.c defines it; under libFuzzer (which saves
 * crashing inputs itself) this weak no-op is used. */
__attribute__((weak)) void pm_fuzz_dump_input(void) {}

#define FZ_ASSERT(cond, ...)                                                                 \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "fuzz invariant failed at %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                                    \
            fprintf(stderr, " (last error: %s)\n", pm_last_error());                         \
            pm_fuzz_dump_input();                                                            \
            abort();                                                                         \
        }                                                                                    \
    } while (0)

/* the cache configurations: tests/common/kv_fixture.h (shared with tests/c) */
typedef pmt_kv_cfg fz_cfg;

static pm_kv_layer fz_layers[2];
static float fz_ff[64];

static pm_memory *fz_make(const fz_cfg *c) {
    pm_kv_params p = pmt_kv_params(c, fz_layers, fz_ff);
    pm_memory *m = NULL;
    pm_status st = pm_kv_new(&p, &m);
    FZ_ASSERT(st == PM_OK, "pm_kv_new: %s", pm_status_str(st));
    return m;
}

typedef struct fz_buf {
    uint8_t *b;
    size_t n, cap;
} fz_buf;

static void fz_put(fz_buf *s, const void *src, size_t n) {
    if (s->n + n > s->cap) {
        s->cap = (s->n + n) * 2 + 256;
        uint8_t *nb = realloc(s->b, s->cap);
        FZ_ASSERT(nb != NULL, "out of memory");
        s->b = nb;
    }
    if (n > 0) {
        memcpy(s->b + s->n, src, n);
    }
    s->n += n;
}

static uint8_t *fz_write(pm_memory *m, pm_seq_id seq, uint32_t env, uint64_t *n) {
    uint64_t size = 0, w = 0;
    pm_status st = pm_mem_state_size(m, seq, 0, env, &size);
    FZ_ASSERT(st == PM_OK, "state_size(%d)", seq);
    uint8_t *b = malloc(size + 1);
    FZ_ASSERT(b != NULL, "out of memory");
    st = pm_mem_state_write(m, seq, 0, env, b, size, &w);
    FZ_ASSERT(st == PM_OK && w == size, "state_write(%d): %llu of %llu", seq, (unsigned long long)w,
              (unsigned long long)size);
    if (size > 0) {
        uint64_t need = 0;
        st = pm_mem_state_write(m, seq, 0, env, b, size - 1, &need);
        FZ_ASSERT(st == PM_E_BUFFER_SMALL && need == size, "short buffer: %s", pm_status_str(st));
    }
    *n = size;
    return b;
}

/* Everything observable: bare whole state, cell metadata, stream counters, K/V bytes,
 * positions of every sequence, update_pending. */
static fz_buf fz_snapshot(pm_memory *m) {
    fz_buf s = {NULL, 0, 0};
    uint64_t n;
    uint8_t *st = fz_write(m, -1, PM_ENVELOPE_NONE, &n);
    fz_put(&s, st, (size_t)n);
    free(st);
    pm_kv_info info;
    pm_kv_info_get(m, 0, &info);
    size_t sz = info.size;
    uint8_t *cells = malloc(sz * 52 + 1);
    FZ_ASSERT(cells != NULL, "out of memory");
    for (uint32_t k = 0; k < info.n_stream; ++k) {
        pm_kv_cells_get(m, 0, k, (pm_pos *)cells, (int32_t *)(cells + 4 * sz), (uint64_t *)(cells + 8 * sz),
                        (int32_t *)(cells + 40 * sz));
        fz_put(&s, cells, sz * 52);
        uint32_t cnt[3];
        bool hs;
        pm_kv_stream_get(m, 0, k, &cnt[0], &cnt[1], &cnt[2], &hs);
        fz_put(&s, cnt, sizeof cnt);
        fz_put(&s, &hs, 1);
        for (uint32_t l = 0; l < info.n_layer; ++l) {
            for (uint32_t which = 0; which < 2; ++which) {
                uint8_t *p;
                uint64_t nb;
                if (pm_kv_tensor(m, 0, l, k, which, &p, &nb) == PM_OK) {
                    fz_put(&s, p, (size_t)nb);
                }
            }
        }
    }
    free(cells);
    for (pm_seq_id q = 0; q < (pm_seq_id)info.n_seq_max; ++q) {
        pm_pos mm[2];
        pm_mem_seq_pos_min(m, q, &mm[0]);
        pm_mem_seq_pos_max(m, q, &mm[1]);
        fz_put(&s, mm, sizeof mm);
    }
    bool pend = pm_mem_update_pending(m);
    fz_put(&s, &pend, 1);
    return s;
}

static void fz_same(fz_buf a, fz_buf b, const char *what) {
    FZ_ASSERT(a.n == b.n && memcmp(a.b, b.b, a.n) == 0, "%s changed the memory", what);
}

/* Cell metadata agrees with the counters and with every sequence's positions; state_size ==
 * state_write for the whole state and every sequence.  (A cell is occupied when it has a
 * position or sequences; a cell at position -1 with sequences - llama.cpp's result of a token
 * at position -1, which pymem rejects - would show up as a counting mismatch.) */
static void fz_invariants(pm_memory *m) {
    pm_kv_info info;
    pm_kv_info_get(m, 0, &info);
    uint32_t sz = info.size;
    pm_pos *pos = malloc(sizeof(pm_pos) * sz);
    uint64_t *bits = malloc(sizeof(uint64_t) * 4 * sz);
    FZ_ASSERT(pos != NULL && bits != NULL, "out of memory");
    for (uint32_t k = 0; k < info.n_stream; ++k) {
        pm_kv_cells_get(m, 0, k, pos, NULL, bits, NULL);
        uint32_t head, used, mx;
        bool hs;
        pm_kv_stream_get(m, 0, k, &head, &used, &mx, &hs);
        uint32_t cnt = 0, last = 0;
        uint64_t any[4] = {0, 0, 0, 0};
        for (uint32_t i = 0; i < sz; ++i) {
            uint64_t *w = bits + 4 * (size_t)i;
            bool has = (w[0] | w[1] | w[2] | w[3]) != 0;
            if (pos[i] != -1 || has) {
                FZ_ASSERT(pos[i] >= -1, "stream %u cell %u position %d", k, i, pos[i]);
                cnt++;
                last = i + 1;
                for (int q = 0; q < 4; ++q) {
                    any[q] |= w[q];
                }
            }
        }
        FZ_ASSERT(cnt == used && mx == last && head <= sz, "stream %u: used %u/%u, used_max_p1 %u/%u, head %u", k,
                  used, cnt, mx, last, head);
        for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
            bool in_stream = info.n_stream > 1 ? s == k : true;
            if (!in_stream || (info.n_stream > 1 && s >= info.n_seq_max)) {
                continue;
            }
            pm_pos lo = INT32_MAX, hi = -1;
            bool found = false;
            if ((any[s >> 6] >> (s & 63)) & 1) {
                for (uint32_t i = 0; i < sz; ++i) {
                    if ((bits[4 * (size_t)i + (s >> 6)] >> (s & 63)) & 1) {
                        found = true;
                        lo = pos[i] < lo ? pos[i] : lo;
                        hi = pos[i] > hi ? pos[i] : hi;
                    }
                }
            }
            if (!found) {
                lo = -1;
            }
            pm_pos a = -2, b = -2;
            pm_mem_seq_pos_min(m, (pm_seq_id)s, &a);
            pm_mem_seq_pos_max(m, (pm_seq_id)s, &b);
            FZ_ASSERT(a == lo && b == hi, "seq %u positions %d..%d, cells say %d..%d", s, a, b, lo, hi);
        }
    }
    free(pos);
    free(bits);
    for (int32_t s = -1; s < (int32_t)info.n_seq_max; ++s) {
        uint64_t n;
        free(fz_write(m, s, PM_ENVELOPE_NONE, &n));
    }
}

/* Does a stream other than its own hold cells of s?  (A whole restore into per-sequence
 * streams may put foreign ids in a stream; a sequence blob of s then has several non-empty
 * stream sections, and reading it restores only the last one, as llama.cpp does.) */
static bool fz_foreign(pm_memory *m, pm_seq_id s) {
    pm_kv_info info;
    pm_kv_info_get(m, 0, &info);
    bool found = false;
    uint64_t *bits = malloc(sizeof(uint64_t) * 4 * info.size);
    FZ_ASSERT(bits != NULL, "out of memory");
    for (uint32_t k = 0; k < info.n_stream && info.n_stream > 1 && !found; ++k) {
        if (k == (uint32_t)s) {
            continue;
        }
        pm_kv_cells_get(m, 0, k, NULL, NULL, bits, NULL);
        for (uint32_t i = 0; i < info.size && !found; ++i) {
            found = (bits[4 * (size_t)i + ((uint32_t)s >> 6)] >> ((uint32_t)s & 63)) & 1;
        }
    }
    free(bits);
    return found;
}

/* whole write -> read into a fresh cache -> write: the same bytes; per sequence the same */
static void fz_round_trip(pm_memory *m, const fz_cfg *c) {
    uint64_t n1, n2;
    uint8_t *w1 = fz_write(m, -1, PM_ENVELOPE_NONE, &n1);
    pm_memory *f = fz_make(c);
    pm_status st = pm_mem_state_read(f, -1, 0, PM_ENVELOPE_NONE, w1, n1, false, NULL);
    FZ_ASSERT(st == PM_OK, "round trip: whole read %s", pm_status_str(st));
    uint8_t *w2 = fz_write(f, -1, PM_ENVELOPE_NONE, &n2);
    FZ_ASSERT(n1 == n2 && memcmp(w1, w2, (size_t)n1) == 0, "round trip: whole state differs");
    free(w1);
    free(w2);
    pm_memory_free(f);
    for (pm_seq_id s = 0; s < (pm_seq_id)c->n_seq_max; ++s) {
        if (fz_foreign(m, s)) {
            continue;
        }
        w1 = fz_write(m, s, PM_ENVELOPE_LLAMA, &n1);
        f = fz_make(c);
        st = pm_mem_state_read(f, s, 0, PM_ENVELOPE_LLAMA, w1, n1, false, NULL);
        FZ_ASSERT(st == PM_OK, "round trip: seq %d read %s", s, pm_status_str(st));
        w2 = fz_write(f, s, PM_ENVELOPE_LLAMA, &n2);
        FZ_ASSERT(n1 == n2 && memcmp(w1, w2, (size_t)n1) == 0, "round trip: seq %d state differs", s);
        free(w1);
        free(w2);
        pm_memory_free(f);
    }
}

/* Deterministic float rows. */
static void fz_rows(float *dst, uint32_t n, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (uint32_t i = 0; i < n; ++i) {
        x = x * 1103515245u + 12345u;
        dst[i] = (float)((int32_t)(x >> 8) % 4096) / 1024.0f;
    }
}

/* Apply every ubatch of ctx, store rows, compute the KQ mask; returns the first failure. */
static pm_status fz_apply_all(pm_memory *m, pm_mctx *ctx, uint32_t mask_mode) {
    pm_kv_info info;
    pm_kv_info_get(m, 0, &info);
    pm_status st = PM_OK;
    for (uint32_t u = 0; st == PM_OK && u < pm_mctx_n_ubatch(ctx); ++u) {
        pm_ubatch_info ui;
        st = pm_mctx_ubatch_info(ctx, u, &ui);
        FZ_ASSERT(st == PM_OK, "ubatch_info");
        uint32_t *idx = malloc(sizeof(uint32_t) * (ui.n_tokens + 1));
        pm_pos *upos = malloc(sizeof(pm_pos) * (ui.n_tokens + 1));
        FZ_ASSERT(idx && upos, "out of memory");
        pm_mctx_ubatch_tokens(ctx, u, idx, upos, NULL, NULL);
        st = pm_mctx_apply(ctx, u);
        FZ_ASSERT(st == PM_OK, "apply failed after a successful init_batch: %s", pm_status_str(st));
        uint32_t streams[PM_MAX_SEQ];
        uint32_t *cells = malloc(sizeof(uint32_t) * (ui.n_tokens + 1));
        FZ_ASSERT(cells != NULL && pm_mctx_cells(ctx, u, 0, streams, cells) == PM_OK, "cells");
        for (uint32_t t = 0; t < ui.n_tokens; ++t) {
            FZ_ASSERT(cells[t] < info.size, "cell %u out of range", cells[t]);
        }
        free(cells);
        for (uint32_t l = 0; l < info.n_layer; ++l) {
            pm_kv_layer_info li;
            pm_kv_layer_info_get(m, 0, l, &li);
            size_t nk = (size_t)ui.n_tokens * li.n_embd_k_gqa, nv = (size_t)ui.n_tokens * li.n_embd_v_gqa;
            float *k = malloc(sizeof(float) * (nk + 1)), *v = malloc(sizeof(float) * (nv + 1));
            FZ_ASSERT(k && v, "out of memory");
            for (uint32_t t = 0; t < ui.n_tokens; ++t) {
                fz_rows(k + (size_t)t * li.n_embd_k_gqa, li.n_embd_k_gqa, (uint32_t)upos[t] * 31 + l);
                fz_rows(v + (size_t)t * li.n_embd_v_gqa, li.n_embd_v_gqa, (uint32_t)upos[t] * 37 + l);
            }
            pm_status ss = pm_mctx_store(ctx, u, li.il, k, 4 * nk, v, 4 * nv, true);
            FZ_ASSERT(ss == PM_OK, "store: %s", pm_status_str(ss));
            free(k);
            free(v);
        }
        uint32_t n_kv = 0;
        pm_mctx_kq_mask(ctx, u, 0, true, 0, false, NULL, 0, &n_kv);
        size_t nm = (size_t)ui.n_tokens * n_kv;
        float *mask = malloc(sizeof(float) * (nm + 1));
        FZ_ASSERT(mask != NULL, "out of memory");
        pm_status ms = pm_mctx_kq_mask(ctx, u, 0, (mask_mode & 1) == 0, (int32_t)((mask_mode >> 1) % 3),
                                       (mask_mode & 8) != 0, mask, nm, &n_kv);
        FZ_ASSERT(ms == PM_OK, "kq_mask: %s", pm_status_str(ms));
        free(mask);
        free(idx);
        free(upos);
    }
    return st;
}

#endif /* PM_FUZZ_COMMON_H */
