/* test_kv.c - the KV cache, batch and state API through the public header: argument errors
 * (status codes, nothing changed: full snapshots compared), failed restores, the sequence-id
 * order of llama.cpp's unordered_set, state_size == state_write, and random operation
 * sequences with invariants (deterministic PRNG, bounded work). */
#include "check.h"
#include "../common/kv_fixture.h"

#include <pymem.h>
#include <stdbool.h>
#include <stdlib.h>

/* ---- configurations and helpers ---------------------------------------------------------- */
/* configurations: tests/common/kv_fixture.h (shared with tests/fuzz); model layers 0 and 2 of
 * 3 (1 and 2 KV heads of 32), NORM and NEOX RoPE, no frequency factors */
typedef pmt_kv_cfg cfg;

/* size, n_seq_max, unified, v_trans, format, n_swa, n_pos, type_k, type_v, swa_type, head_k,
 * n_layer_model, cell_ext, arch, neox_layer1, n_ctx_orig, no_freq_factors */
static const cfg CFGS[] = {
    {32, 3, 1, 1, 11, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 3, 0, "llama", 1, 4096, 1},
    {16, 3, 0, 0, 11, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 3, 0, "llama", 1, 4096, 1},
    {24, 2, 1, 0, 11, 0, 1, PM_TYPE_F32, PM_TYPE_F32, PM_SWA_NONE, 32, 3, 0, "llama", 1, 4096, 1},
    {16, 4, 0, 1, 10, 0, 1, PM_TYPE_F32, PM_TYPE_F16, PM_SWA_NONE, 32, 3, 0, "llama", 1, 4096, 1},
    {32, 2, 1, 0, 11, 0, 1, PM_TYPE_Q8_0, PM_TYPE_Q8_0, PM_SWA_NONE, 32, 3, 0, NULL, 1, 4096, 1},
    {32, 3, 1, 1, 11, 6, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_STANDARD, 32, 3, 0, "gemma", 1, 4096, 1},
    {20, 2, 1, 0, 11, 5, 1, PM_TYPE_BF16, PM_TYPE_F16, PM_SWA_CHUNKED, 32, 3, 0, "x", 1, 4096, 1},
};
#define N_CFGS (sizeof CFGS / sizeof CFGS[0])

static pm_kv_layer g_layers[2];
static float g_ff[64];

static pm_kv_params params_of(const cfg *c) { return pmt_kv_params(c, g_layers, g_ff); }

static pm_memory *make(const cfg *c) {
    pm_kv_params p = params_of(c);
    pm_memory *m = NULL;
    pm_status st = pm_kv_new(&p, &m);
    CHECK_MSG(st == PM_OK && m != NULL, "pm_kv_new: %s (%s)", pm_status_str(st), pm_last_error());
    return m;
}

/* Everything observable: bare whole state, cells, stream counters, tensors, positions. */
typedef struct snap {
    uint8_t *b;
    size_t n;
} snap;

static void put(snap *s, size_t *cap, const void *src, size_t n) {
    if (s->n + n > *cap) {
        *cap = (s->n + n) * 2 + 256;
        s->b = realloc(s->b, *cap);
    }
    memcpy(s->b + s->n, src, n);
    s->n += n;
}

static snap take(pm_memory *m) {
    snap s = {NULL, 0};
    size_t cap = 0;
    uint64_t n = 0, w = 0;
    pm_mem_state_size(m, -1, 0, PM_ENVELOPE_NONE, &n);
    uint8_t *st = malloc(n + 1);
    pm_mem_state_write(m, -1, 0, PM_ENVELOPE_NONE, st, n, &w);
    put(&s, &cap, st, (size_t)w);
    free(st);
    pm_kv_info info;
    pm_kv_info_get(m, 0, &info);
    size_t sz = info.size;
    uint8_t *cells = malloc(sz * 52 + 1);
    for (uint32_t k = 0; k < info.n_stream; ++k) {
        pm_kv_cells_get(m, 0, k, (pm_pos *)cells, (int32_t *)(cells + 4 * sz), (uint64_t *)(cells + 8 * sz),
                        (int32_t *)(cells + 40 * sz));
        put(&s, &cap, cells, sz * 52);
        uint32_t cnt[3];
        bool hs;
        pm_kv_stream_get(m, 0, k, &cnt[0], &cnt[1], &cnt[2], &hs);
        put(&s, &cap, cnt, sizeof cnt);
        put(&s, &cap, &hs, 1);
        for (uint32_t l = 0; l < info.n_layer; ++l) {
            for (uint32_t which = 0; which < 2; ++which) {
                uint8_t *p;
                uint64_t nb;
                if (pm_kv_tensor(m, 0, l, k, which, &p, &nb) == PM_OK) {
                    put(&s, &cap, p, (size_t)nb);
                }
            }
        }
    }
    free(cells);
    for (pm_seq_id q = 0; q < (pm_seq_id)info.n_seq_max; ++q) {
        pm_pos mm[2];
        pm_mem_seq_pos_min(m, q, &mm[0]);
        pm_mem_seq_pos_max(m, q, &mm[1]);
        put(&s, &cap, mm, sizeof mm);
    }
    bool pend = pm_mem_update_pending(m);
    put(&s, &cap, &pend, 1);
    return s;
}

static bool same(snap a, snap b) { return a.n == b.n && memcmp(a.b, b.b, a.n) == 0; }

/* Checks that the call fails with `want` and leaves the memory exactly as it was. */
#define CHECK_FAILS_UNCHANGED(m, want, call)                                                 \
    do {                                                                                     \
        snap b_ = take(m);                                                                   \
        pm_status st_ = (call);                                                              \
        CHECK_MSG(st_ == (want), "%s: %s, expected %s (%s)", #call, pm_status_str(st_),      \
                  pm_status_str(want), pm_last_error());                                     \
        snap a_ = take(m);                                                                   \
        CHECK_MSG(same(b_, a_), "%s changed the memory", #call);                             \
        free(b_.b);                                                                          \
        free(a_.b);                                                                          \
    } while (0)

/* Deterministic float rows for a token. */
static void row_values(float *dst, uint32_t n, pm_token tok, pm_pos pos, uint32_t il, uint32_t which) {
    uint64_t x = ((uint64_t)(uint32_t)tok * 1315423911u) ^ ((uint64_t)(uint32_t)pos << 20) ^ (il << 8) ^ which;
    for (uint32_t i = 0; i < n; ++i) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        dst[i] = (float)((int32_t)(x >> 40) % 2000) / 500.0f;
    }
}

/* llama_decode's memory steps; stores float rows for every held layer. */
static pm_status decode(pm_memory *m, uint32_t n, const pm_token *tok, const pm_pos *pos, const int32_t *nsid,
                        const pm_seq_id *sid, uint32_t n_ubatch, snap *after_update) {
    pm_batch *b = NULL;
    pm_status st = pm_batch_new(n, tok, pos, 1, nsid, sid, NULL, &b);
    if (st == PM_OK) {
        st = pm_mem_check_batch(m, b, 128, false);
    }
    if (st == PM_OK) {
        st = pm_mem_update(m, NULL);
    }
    if (after_update != NULL && st == PM_OK) {
        free(after_update->b);
        *after_update = take(m);
    }
    pm_mctx *ctx = NULL;
    if (st == PM_OK) {
        st = pm_mem_init_batch(m, b, n_ubatch, 128, false, &ctx);
    }
    pm_kv_info info;
    pm_kv_info_get(m, 0, &info);
    for (uint32_t u = 0; st == PM_OK && u < pm_mctx_n_ubatch(ctx); ++u) {
        pm_ubatch_info ui;
        pm_mctx_ubatch_info(ctx, u, &ui);
        uint32_t *idx = malloc(sizeof(uint32_t) * ui.n_tokens);
        pm_pos *upos = malloc(sizeof(pm_pos) * ui.n_tokens);
        pm_mctx_ubatch_tokens(ctx, u, idx, upos, NULL, NULL);
        st = pm_mctx_apply(ctx, u);
        for (uint32_t l = 0; st == PM_OK && l < info.n_layer; ++l) {
            pm_kv_layer_info li;
            pm_kv_layer_info_get(m, 0, l, &li);
            float *k = malloc(sizeof(float) * ui.n_tokens * li.n_embd_k_gqa);
            float *v = malloc(sizeof(float) * ui.n_tokens * li.n_embd_v_gqa);
            for (uint32_t t = 0; t < ui.n_tokens; ++t) {
                pm_token tk = tok ? tok[idx[t]] : 0;
                row_values(k + (size_t)t * li.n_embd_k_gqa, li.n_embd_k_gqa, tk, upos[t], li.il, 0);
                row_values(v + (size_t)t * li.n_embd_v_gqa, li.n_embd_v_gqa, tk, upos[t], li.il, 1);
            }
            st = pm_mctx_store(ctx, u, li.il, k, 4ull * ui.n_tokens * li.n_embd_k_gqa, v,
                               4ull * ui.n_tokens * li.n_embd_v_gqa, true);
            CHECK_MSG(st == PM_OK, "store: %s", pm_last_error());
            free(k);
            free(v);
        }
        if (st == PM_OK) {
            uint32_t n_kv = 0;
            pm_mctx_kq_mask(ctx, u, 0, true, 0, false, NULL, 0, &n_kv);
            float *mask = malloc(sizeof(float) * ((size_t)ui.n_tokens * n_kv + 1));
            pm_status ms = pm_mctx_kq_mask(ctx, u, 0, true, 0, false, mask, (uint64_t)ui.n_tokens * n_kv, &n_kv);
            CHECK_MSG(ms == PM_OK, "kq_mask: %s", pm_last_error());
            free(mask);
        }
        free(idx);
        free(upos);
    }
    pm_mctx_free(ctx);
    pm_batch_free(b);
    return st;
}

/* n tokens of one sequence at consecutive positions from p0. */
static pm_status fill(pm_memory *m, pm_seq_id s, uint32_t n, pm_pos p0) {
    pm_token tok[256];
    pm_pos pos[256];
    pm_seq_id sid[256];
    for (uint32_t i = 0; i < n; ++i) {
        tok[i] = (pm_token)((p0 + i * 7 + s) % 128);
        pos[i] = p0 + (pm_pos)i;
        sid[i] = s;
    }
    return decode(m, n, tok, pos, NULL, sid, 512, NULL);
}

static uint8_t *write_state(pm_memory *m, pm_seq_id s, uint32_t env, uint64_t *n) {
    uint64_t size = 0, w = 0;
    pm_status st = pm_mem_state_size(m, s, 0, env, &size);
    CHECK_MSG(st == PM_OK, "state_size(%d): %s", s, pm_last_error());
    uint8_t *b = malloc(size + 1);
    st = pm_mem_state_write(m, s, 0, env, b, size, &w);
    CHECK_MSG(st == PM_OK && w == size, "state_write(%d): %s, %llu of %llu", s, pm_status_str(st),
              (unsigned long long)w, (unsigned long long)size);
    *n = size;
    return b;
}

/* ---- invariants ---------------------------------------------------------------------------- */
static void check_invariants(pm_memory *m, const char *where) {
    pm_kv_info info;
    pm_kv_info_get(m, 0, &info);
    uint32_t sz = info.size;
    pm_pos *pos = malloc(sizeof(pm_pos) * sz);
    uint64_t *bits = malloc(sizeof(uint64_t) * 4 * sz);
    int32_t *shift = malloc(sizeof(int32_t) * sz);
    for (uint32_t k = 0; k < info.n_stream; ++k) {
        pm_kv_cells_get(m, 0, k, pos, shift, bits, NULL);
        uint32_t head, used, mx;
        bool hs;
        pm_kv_stream_get(m, 0, k, &head, &used, &mx, &hs);
        uint32_t cnt = 0, last = 0;
        for (uint32_t i = 0; i < sz; ++i) {
            bool any = bits[4 * i] | bits[4 * i + 1] | bits[4 * i + 2] | bits[4 * i + 3];
            if (pos[i] != -1) {
                cnt++;
                last = i + 1;
                CHECK_MSG(pos[i] >= 0, "%s: stream %u cell %u has position %d", where, k, i, pos[i]);
            } else {
                CHECK_MSG(!any, "%s: empty cell %u of stream %u has sequences", where, i, k);
            }
        }
        CHECK_MSG(cnt == used, "%s: stream %u used %u, cells say %u", where, k, used, cnt);
        CHECK_MSG(mx == last, "%s: stream %u used_max_p1 %u, cells say %u", where, k, mx, last);
        CHECK_MSG(head <= sz, "%s: head %u > size %u", where, head, sz);
        /* positions of the sequences of this stream */
        uint32_t s_lo = info.n_stream > 1 ? k : 0, s_hi = info.n_stream > 1 ? k + 1 : PM_MAX_SEQ;
        for (uint32_t s = s_lo; s < s_hi; ++s) {
            pm_pos lo = -1, hi = -1;
            for (uint32_t i = 0; i < sz; ++i) {
                if (pos[i] != -1 && ((bits[4 * i + (s >> 6)] >> (s & 63)) & 1)) {
                    lo = (lo == -1 || pos[i] < lo) ? pos[i] : lo;
                    hi = pos[i] > hi ? pos[i] : hi;
                }
            }
            pm_pos a = -2, b = -2;
            pm_mem_seq_pos_min(m, (pm_seq_id)s, &a);
            pm_mem_seq_pos_max(m, (pm_seq_id)s, &b);
            CHECK_MSG(a == lo && b == hi, "%s: seq %u positions %d..%d, cells say %d..%d", where, s, a, b, lo, hi);
        }
    }
    /* state_size == state_write, whole and per sequence, both envelopes */
    for (int32_t s = -1; s < (int32_t)info.n_seq_max; ++s) {
        for (uint32_t env = 0; env < 2; ++env) {
            uint64_t size = 0, w = 0;
            pm_status st = pm_mem_state_size(m, s, 0, env, &size);
            if (st != PM_OK) {
                CHECK_MSG(s == -1 && env == PM_ENVELOPE_LLAMA, "%s: state_size(%d, %u): %s", where, s, env,
                          pm_last_error());
                continue;
            }
            uint8_t *b = malloc(size + 1);
            st = pm_mem_state_write(m, s, 0, env, b, size, &w);
            CHECK_MSG(st == PM_OK && w == size, "%s: state_write(%d) %llu vs size %llu", where, s,
                      (unsigned long long)w, (unsigned long long)size);
            if (size > 0) {
                st = pm_mem_state_write(m, s, 0, env, b, size - 1, &w);
                CHECK_MSG(st == PM_E_BUFFER_SMALL && w == size, "%s: short buffer: %s, needed %llu", where,
                          pm_status_str(st), (unsigned long long)w);
            }
            free(b);
        }
    }
    free(pos);
    free(bits);
    free(shift);
}

/* whole write -> read into a fresh cache -> write gives the same bytes; per sequence too */
static void check_round_trip(pm_memory *m, const cfg *c, const char *where) {
    uint64_t n1, n2;
    uint8_t *w1 = write_state(m, -1, PM_ENVELOPE_NONE, &n1);
    pm_memory *f = make(c);
    pm_status st = pm_mem_state_read(f, -1, 0, PM_ENVELOPE_NONE, w1, n1, false, NULL);
    CHECK_MSG(st == PM_OK, "%s: whole round trip read: %s", where, pm_last_error());
    uint8_t *w2 = write_state(f, -1, PM_ENVELOPE_NONE, &n2);
    CHECK_MSG(n1 == n2 && memcmp(w1, w2, (size_t)n1) == 0, "%s: whole round trip differs", where);
    free(w1);
    free(w2);
    for (pm_seq_id s = 0; s < (pm_seq_id)c->n_seq_max; ++s) {
        pm_memory *g = make(c);
        w1 = write_state(m, s, PM_ENVELOPE_LLAMA, &n1);
        st = pm_mem_state_read(g, s, 0, PM_ENVELOPE_LLAMA, w1, n1, false, NULL);
        CHECK_MSG(st == PM_OK, "%s: seq %d round trip read: %s", where, s, pm_last_error());
        w2 = write_state(g, s, PM_ENVELOPE_LLAMA, &n2);
        CHECK_MSG(n1 == n2 && memcmp(w1, w2, (size_t)n1) == 0, "%s: seq %d round trip differs", where, s);
        free(w1);
        free(w2);
        pm_memory_free(g);
    }
    pm_memory_free(f);
}

/* ---- tests ------------------------------------------------------------------------------- */
static void test_kv_new_errors(void) {
    const cfg *c = &CFGS[0];
    struct {
        const char *what;
        pm_status want;
        int field;
    } cases[] = {
        {"n_seq_max 0", PM_E_INVALID_ARG, 0},       {"n_seq_max 257", PM_E_INVALID_ARG, 1},
        {"size 0", PM_E_INVALID_ARG, 2},            {"unknown type", PM_E_UNSUPPORTED, 3},
        {"v_trans q8_0 V", PM_E_UNSUPPORTED, 4},    {"swa without n_swa", PM_E_INVALID_ARG, 5},
        {"swa_type 9", PM_E_INVALID_ARG, 6},        {"n_pos_per_embd 2", PM_E_INVALID_ARG, 7},
        {"format 9", PM_E_INVALID_ARG, 8},          {"layers NULL", PM_E_INVALID_ARG, 9},
        {"n_layer > model", PM_E_INVALID_ARG, 10},  {"layer order", PM_E_INVALID_ARG, 11},
        {"layer id >= model", PM_E_INVALID_ARG, 12}, {"n_head_kv 0", PM_E_INVALID_ARG, 13},
        {"odd n_rot", PM_E_INVALID_ARG, 14},        {"n_rot > head", PM_E_INVALID_ARG, 15},
        {"rope mode 5", PM_E_INVALID_ARG, 16},      {"freq_base 0", PM_E_INVALID_ARG, 17},
        {"K width vs q8_0 block", PM_E_INVALID_ARG, 18}, {"freq factors missing", PM_E_INVALID_ARG, 19},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
        pm_kv_params p = params_of(c);
        switch (cases[i].field) {
        case 0: p.n_seq_max = 0; break;
        case 1: p.n_seq_max = 257; break;
        case 2: p.size = 0; break;
        case 3: p.type_k = 77; break;
        case 4: p.type_v = PM_TYPE_Q8_0; p.v_trans = 1; break;
        case 5: p.swa_type = PM_SWA_STANDARD; p.n_swa = 0; break;
        case 6: p.swa_type = 9; p.n_swa = 4; break;
        case 7: p.n_pos_per_embd = 2; break;
        case 8: p.format = 9; break;
        case 9: p.layers = NULL; break;
        case 10: p.n_layer = 4; break;
        case 11: g_layers[1].il = 0; break;
        case 12: g_layers[1].il = 3; break;
        case 13: g_layers[0].n_head_kv = 0; break;
        case 14: g_layers[0].rope.n_rot = 31; break;
        case 15: g_layers[0].rope.n_rot = 34; break;
        case 16: g_layers[0].rope.mode = 5; break;
        case 17: g_layers[0].rope.freq_base = 0.0f; break;
        case 18: p.type_k = PM_TYPE_Q8_0; g_layers[0].n_embd_head_k = 16; g_layers[0].rope.n_rot = 16; break;
        case 19: g_layers[0].rope.n_freq_factors = 16; g_layers[0].rope.freq_factors = NULL; break;
        }
        pm_memory *m = (pm_memory *)&p; /* must be overwritten with NULL */
        pm_status st = pm_kv_new(&p, &m);
        CHECK_MSG(st == cases[i].want && m == NULL, "%s: %s", cases[i].what, pm_status_str(st));
        CHECK_MSG(strlen(pm_last_error()) > 0, "%s: no message", cases[i].what);
        pm_memory_free(m);
    }
    CHECK_EQ_INT(pm_kv_new(NULL, NULL), PM_E_INVALID_ARG);
    pm_memory *m = NULL;
    CHECK_EQ_INT(pm_kv_new(NULL, &m), PM_E_INVALID_ARG);
    CHECK(m == NULL);
    /* the derived Hadamard sizes: quantized K/V with head 64 */
    pm_kv_params p = params_of(c);
    g_layers[0].n_embd_head_k = g_layers[1].n_embd_head_k = 128;
    g_layers[0].n_embd_head_v = g_layers[1].n_embd_head_v = 64;
    p.type_k = p.type_v = PM_TYPE_Q8_0;
    p.v_trans = 0;
    CHECK_EQ_INT(pm_kv_new(&p, &m), PM_OK);
    pm_kv_info info;
    pm_kv_info_get(m, 0, &info);
    CHECK_EQ_INT(info.k_rot, 128);
    CHECK_EQ_INT(info.v_rot, 64);
    CHECK_EQ_INT(pm_memory_kind(m), PM_MEM_KV);
    CHECK(pm_memory_nbytes(m) > 0);
    pm_memory_free(m);
    pm_memory_free(NULL);
}

static void test_null_memory(void) {
    bool b;
    pm_pos p;
    uint64_t n;
    uint8_t buf[8];
    CHECK_EQ_INT(pm_mem_clear(NULL, true), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mem_seq_rm(NULL, 0, -1, -1, &b), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mem_seq_cp(NULL, 0, 1, -1, -1), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mem_seq_keep(NULL, 0), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mem_seq_add(NULL, 0, 0, 1, 1), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mem_seq_div(NULL, 0, 0, 1, 2), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mem_seq_pos_min(NULL, 0, &p), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mem_seq_pos_max(NULL, 0, &p), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mem_update(NULL, &b), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mem_state_size(NULL, -1, 0, 0, &n), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mem_state_write(NULL, -1, 0, 0, buf, 8, &n), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mem_state_read(NULL, -1, 0, 0, buf, 8, false, &n), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mem_state_check(NULL, -1, 0, 0, buf, 8, &n), PM_E_INVALID_ARG);
    CHECK(!pm_mem_can_shift(NULL));
    CHECK(!pm_mem_update_pending(NULL));
    CHECK_EQ_INT(pm_memory_kind(NULL), 0);
    CHECK_EQ_INT(pm_memory_nbytes(NULL), 0);
    pm_kv_info info;
    CHECK_EQ_INT(pm_kv_info_get(NULL, 0, &info), PM_E_INVALID_ARG);
    pm_mctx *ctx = (pm_mctx *)buf;
    CHECK_EQ_INT(pm_mem_init_batch(NULL, NULL, 1, 0, false, &ctx), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mctx_n_ubatch(NULL), 0);
    CHECK_EQ_INT(pm_mctx_apply(NULL, 0), PM_E_INVALID_ARG);
    pm_mctx_free(NULL);
    pm_batch_free(NULL);
    CHECK_EQ_INT(pm_batch_n_tokens(NULL), 0);
}

/* A populated cache for the error tests: seq 0 at 0..9 with holes, seq 1 at 0..4. */
static pm_memory *populated(const cfg *c) {
    pm_memory *m = make(c);
    CHECK_EQ_INT(fill(m, 0, 10, 0), PM_OK);
    CHECK_EQ_INT(fill(m, 1, 5, 0), PM_OK);
    bool r;
    CHECK_EQ_INT(pm_mem_seq_rm(m, 0, 3, 5, &r), PM_OK);
    return m;
}

static void test_op_errors_unchanged(void) {
    for (size_t ci = 0; ci < 2; ++ci) {
        const cfg *c = &CFGS[ci]; /* unified, then one stream per sequence */
        pm_memory *m = populated(c);
        bool r;
        pm_pos p;
        pm_seq_id bad = c->unified ? PM_MAX_SEQ : (pm_seq_id)c->n_seq_max;
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_rm(m, -2, -1, -1, &r));
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_rm(m, bad, -1, -1, &r));
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_cp(m, -1, 1, -1, -1));
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_cp(m, 0, bad, -1, -1));
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_keep(m, -1));
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_keep(m, bad));
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_add(m, bad, 0, -1, 1));
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_add(m, 0, 0, -1, INT32_MAX));
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_div(m, 0, 0, -1, 0));
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_div(m, 0, 0, -1, -3));
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_div(m, bad, 0, -1, 2));
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_pos_min(m, bad, &p));
        CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_seq_pos_max(m, -1, &p));
        if (!c->unified) {
            CHECK_FAILS_UNCHANGED(m, PM_E_UNSUPPORTED, pm_mem_seq_cp(m, 0, 1, 2, -1));
            CHECK_FAILS_UNCHANGED(m, PM_E_UNSUPPORTED, pm_mem_seq_cp(m, 0, 1, -1, 3));
        }
        /* batches llama.cpp rejects: nothing changes */
        pm_token t[2] = {1, 2};
        pm_pos gap[2] = {10, 12}, dec[2] = {11, 10}, ok[1] = {10};
        pm_seq_id s0[2] = {0, 0}, s9[1] = {9};
        int32_t two[1] = {2};
        pm_seq_id s01[2] = {0, 1};
        pm_token vocab[1] = {128};
        CHECK_FAILS_UNCHANGED(m, PM_E_BATCH, decode(m, 2, t, gap, NULL, s0, 512, NULL));
        CHECK_FAILS_UNCHANGED(m, PM_E_BATCH, decode(m, 2, t, dec, NULL, s0, 512, NULL));
        CHECK_FAILS_UNCHANGED(m, PM_E_BATCH, decode(m, 1, t, ok, NULL, s9, 512, NULL));
        CHECK_FAILS_UNCHANGED(m, PM_E_BATCH, decode(m, 1, vocab, ok, NULL, s0, 512, NULL));
        CHECK_FAILS_UNCHANGED(m, PM_E_BATCH, decode(m, 1, t, ok, two, s01, 512, NULL));   /* diverged */
        CHECK_FAILS_UNCHANGED(m, PM_E_BATCH, decode(m, 0, t, ok, NULL, s0, 512, NULL));   /* empty */
        /* a batch that does not fit */
        pm_token many[64];
        pm_pos mpos[64];
        pm_seq_id msid[64];
        for (int i = 0; i < 64; ++i) {
            many[i] = i;
            mpos[i] = 10 + i;
            msid[i] = 0;
        }
        CHECK_FAILS_UNCHANGED(m, PM_E_NO_SLOT, decode(m, 64, many, mpos, NULL, msid, 512, NULL));
        CHECK_FAILS_UNCHANGED(m, PM_E_NO_SLOT, decode(m, 20, many, mpos, NULL, msid, 4, NULL));
        check_invariants(m, "op errors");
        pm_memory_free(m);
    }
}

static void test_state_api_errors(void) {
    pm_memory *m = populated(&CFGS[1]);
    uint8_t buf[64];
    uint64_t n = 0, size = 0;
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_state_write(m, 256, 0, 0, buf, 64, &n));
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_state_write(m, -2, 0, 0, buf, 64, &n));
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_state_write(m, -1, 0, 7, buf, 64, &n));
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_state_write(m, -1, 8, 0, buf, 64, &n));
    CHECK_FAILS_UNCHANGED(m, PM_E_UNSUPPORTED, pm_mem_state_write(m, 0, PM_STATE_ON_DEVICE, 0, buf, 64, &n));
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_state_write(m, -1, 0, 0, NULL, 64, &n));
    CHECK_EQ_INT(pm_mem_state_size(m, -1, 0, 0, &size), PM_OK);
    CHECK_FAILS_UNCHANGED(m, PM_E_BUFFER_SMALL, pm_mem_state_write(m, -1, 0, 0, buf, 64, &n));
    CHECK_EQ_U64(n, size);
    CHECK_FAILS_UNCHANGED(m, PM_E_BUFFER_SMALL, pm_mem_state_write(m, -1, 0, 0, NULL, 0, &n));
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_state_read(m, -1, 0, 0, NULL, 4, false, &n));
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_state_check(m, -1, 0, 0, NULL, 4, &n));
    uint8_t *seq = write_state(m, 0, PM_ENVELOPE_LLAMA, &size);
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_state_read(m, 3, 0, PM_ENVELOPE_LLAMA, seq, size, false, &n));
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_state_read(m, -2, 0, PM_ENVELOPE_LLAMA, seq, size, false, &n));
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_state_read(m, 0, 0, 5, seq, size, false, &n));
    CHECK_FAILS_UNCHANGED(m, PM_E_FORMAT, pm_mem_state_read(m, 2, 0, PM_ENVELOPE_NONE, seq, size, false, &n));
    /* trailing bytes: an error unless allowed; consumed reports the state's length */
    uint8_t *longer = malloc(size + 3);
    memcpy(longer, seq, (size_t)size);
    memset(longer + size, 0xab, 3);
    CHECK_FAILS_UNCHANGED(m, PM_E_FORMAT, pm_mem_state_read(m, 2, 0, PM_ENVELOPE_LLAMA, longer, size + 3, false, &n));
    CHECK_EQ_INT(pm_mem_state_check(m, 2, 0, PM_ENVELOPE_LLAMA, longer, size + 3, &n), PM_OK);
    CHECK_EQ_U64(n, size);
    CHECK_EQ_INT(pm_mem_state_read(m, 2, 0, PM_ENVELOPE_LLAMA, longer, size + 3, true, &n), PM_OK);
    CHECK_EQ_U64(n, size);
    free(longer);
    free(seq);
    pm_memory_free(m);
    /* the whole llama envelope needs the architecture name */
    m = populated(&CFGS[4]);
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_state_size(m, -1, 0, PM_ENVELOPE_LLAMA, &n));
    CHECK_EQ_INT(pm_mem_state_size(m, 0, 0, PM_ENVELOPE_LLAMA, &n), PM_OK);
    pm_memory_free(m);
}

/* Every truncation and every single-field corruption of valid blobs: failures change nothing. */
static void test_restore_failures_unchanged(void) {
    for (size_t ci = 0; ci < N_CFGS; ++ci) {
        const cfg *c = &CFGS[ci];
        pm_memory *src = populated(c);
        pm_memory *m = make(c);
        CHECK_EQ_INT(fill(m, 1, 3, 0), PM_OK);
        CHECK_EQ_INT(fill(m, 0, 2, 0), PM_OK);
        for (int kind = 0; kind < 4; ++kind) {
            pm_seq_id seq = kind < 2 ? -1 : 0;
            uint32_t env = (kind & 1) ? PM_ENVELOPE_LLAMA : PM_ENVELOPE_NONE;
            if (seq == -1 && env == PM_ENVELOPE_LLAMA && c->arch == NULL) {
                continue;
            }
            uint64_t n;
            uint8_t *blob = write_state(src, seq, env, &n);
            pm_seq_id dst = seq == -1 ? -1 : (c->unified ? 2 : 0);
            snap before = take(m);
            uint64_t step = n > 600 ? n / 300 : 1;
            for (uint64_t cut = 0; cut < n; cut += (cut < 64 ? 1 : step)) {
                uint64_t used = 0;
                pm_status s1 = pm_mem_state_check(m, dst, 0, env, blob, cut, &used);
                pm_status s2 = pm_mem_state_read(m, dst, 0, env, blob, cut, true, &used);
                CHECK_MSG(s1 == PM_E_FORMAT && s2 == PM_E_FORMAT, "cfg %zu kind %d: %llu of %llu bytes: %s / %s", ci,
                          kind, (unsigned long long)cut, (unsigned long long)n, pm_status_str(s1),
                          pm_status_str(s2));
            }
            /* one 32-bit word at a time set to a few hostile values (metadata region) */
            uint8_t *bad = malloc(n + 1);
            static const uint32_t vals[] = {0, 1, 2, 0xffffffffu, 0x7fffffffu, 0x80000000u, 257, 64};
            uint64_t lim = n < 160 ? n : 160;
            for (uint64_t off = 0; off + 4 <= lim; off += 2) {
                for (size_t v = 0; v < sizeof vals / sizeof vals[0]; ++v) {
                    memcpy(bad, blob, (size_t)n);
                    memcpy(bad + off, &vals[v], 4);
                    uint64_t u1 = 0, u2 = 0;
                    pm_status s1 = pm_mem_state_check(m, dst, 0, env, bad, n, &u1);
                    pm_status s2 = pm_mem_state_read(m, dst, 0, env, bad, n, true, &u2);
                    CHECK_MSG(s1 == s2 || (s1 == PM_OK && s2 == PM_E_NO_SLOT), "check %s vs read %s",
                              pm_status_str(s1), pm_status_str(s2));
                    if (s2 == PM_OK) {
                        CHECK(u1 == u2);
                        check_invariants(m, "after a mutated restore");
                        free(before.b);
                        before = take(m);
                    } else {
                        snap after = take(m);
                        CHECK_MSG(same(before, after), "cfg %zu: failed restore (offset %llu) changed the memory", ci,
                                  (unsigned long long)off);
                        free(after.b);
                    }
                }
            }
            free(bad);
            free(before.b);
            free(blob);
        }
        pm_memory_free(src);
        pm_memory_free(m);
    }
    /* a per-sequence restore that does not fit: NO_SLOT, nothing changed */
    pm_memory *a = make(&CFGS[0]);
    CHECK_EQ_INT(fill(a, 1, 12, 0), PM_OK);
    uint64_t n;
    uint8_t *blob = write_state(a, 1, PM_ENVELOPE_LLAMA, &n);
    pm_memory *b = make(&CFGS[0]);
    CHECK_EQ_INT(fill(b, 0, 25, 0), PM_OK);
    CHECK_FAILS_UNCHANGED(b, PM_E_NO_SLOT, pm_mem_state_read(b, 2, 0, PM_ENVELOPE_LLAMA, blob, n, false, NULL));
    free(blob);
    pm_memory_free(a);
    pm_memory_free(b);
}

static const struct {
    uint32_t n;
    pm_seq_id in[256];
    uint32_t n_out;
    pm_seq_id out[256];
} SET_ORDER[] = {
    /* recorded from libstdc++ (g++ 12): std::unordered_set<int> insertion order -> iteration order */
#include "seq_set_order.inc"
};

static void test_seq_set_order(void) {
    for (size_t i = 0; i < sizeof SET_ORDER / sizeof SET_ORDER[0]; ++i) {
        pm_seq_id out[256];
        uint32_t n = pm_seq_set_order(SET_ORDER[i].in, SET_ORDER[i].n, out);
        CHECK_MSG(n == SET_ORDER[i].n_out && memcmp(out, SET_ORDER[i].out, sizeof(pm_seq_id) * n) == 0,
                  "set order case %zu (%u ids)", i, SET_ORDER[i].n);
    }
    /* the batch keeps that order per token, primary id first */
    pm_token t[2] = {1, 2};
    int32_t nsid[2] = {3, 1};
    pm_seq_id sid[4] = {0, 1, 13, 2};
    pm_batch *b = NULL;
    CHECK_EQ_INT(pm_batch_new(2, t, NULL, 1, nsid, sid, NULL, &b), PM_OK);
    pm_seq_id ids[4];
    CHECK_EQ_INT(pm_batch_seq_ids(b, 0, ids, 4), 3);
    CHECK(ids[0] == 1 && ids[1] == 13 && ids[2] == 0);
    CHECK_EQ_INT(pm_batch_seq_ids(b, 1, ids, 4), 1);
    CHECK_EQ_INT(ids[0], 2);
    CHECK_EQ_INT(pm_batch_seq_ids(b, 2, ids, 4), 0);
    CHECK_EQ_INT(pm_batch_n_tokens(b), 2);
    pm_batch_free(b);
}

static void test_batch_api(void) {
    pm_batch *b = (pm_batch *)&b;
    pm_token t[4] = {1, 2, 3, 4};
    pm_pos p[4] = {0, 1, 2, 3};
    int32_t nsid_bad[1] = {0};
    CHECK_EQ_INT(pm_batch_new(1, t, p, 5, NULL, NULL, NULL, &b), PM_E_INVALID_ARG);
    CHECK(b == NULL);
    CHECK_EQ_INT(pm_batch_new(1, t, p, 1, nsid_bad, t, NULL, &b), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_batch_new(1, t, p, 1, nsid_bad, NULL, NULL, &b), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_batch_new(1, t, p, 1, NULL, NULL, NULL, NULL), PM_E_INVALID_ARG);

    pm_memory *m = make(&CFGS[0]);
    CHECK_EQ_INT(pm_batch_new(4, t, p, 1, NULL, NULL, NULL, &b), PM_OK);
    pm_mctx *ctx = NULL;
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_init_batch(m, b, 0, 128, false, &ctx));
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mem_init_batch(m, NULL, 4, 128, false, &ctx));
    CHECK_EQ_INT(pm_mem_init_batch(m, b, 3, 128, false, &ctx), PM_OK);
    CHECK_EQ_INT(pm_mctx_n_ubatch(ctx), 2);
    pm_ubatch_info ui;
    CHECK_EQ_INT(pm_mctx_ubatch_info(ctx, 2, &ui), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_mctx_ubatch_info(ctx, 0, &ui), PM_OK);
    CHECK_EQ_INT(ui.n_tokens, 3);
    CHECK_EQ_INT(ui.applied, 0);
    CHECK_FAILS_UNCHANGED(m, PM_E_STATE, pm_mctx_apply(ctx, 1));          /* out of order */
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mctx_apply(ctx, 5));
    float k[3 * 64], v[3 * 64];
    memset(k, 0, sizeof k);
    memset(v, 0, sizeof v);
    CHECK_FAILS_UNCHANGED(m, PM_E_STATE, pm_mctx_store(ctx, 0, 0, k, 3 * 32 * 4, v, 3 * 32 * 4, true));
    CHECK_EQ_INT(pm_mctx_apply(ctx, 0), PM_OK);
    uint32_t streams[1], cells[3];
    CHECK_EQ_INT(pm_mctx_cells(ctx, 0, 0, streams, cells), PM_OK);
    CHECK(streams[0] == 0 && cells[0] == 0 && cells[1] == 1 && cells[2] == 2);
    CHECK_EQ_INT(pm_mctx_cells(ctx, 0, 1, streams, cells), PM_E_INVALID_ARG);
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mctx_store(ctx, 0, 0, k, 3 * 32 * 4 - 4, v, 3 * 32 * 4, true));
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mctx_store(ctx, 0, 0, k, 3 * 32 * 4, v, 3 * 32 * 4 + 4, true));
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mctx_store(ctx, 0, 1, k, 3 * 32 * 4, v, 3 * 32 * 4, true));
    CHECK_FAILS_UNCHANGED(m, PM_E_INVALID_ARG, pm_mctx_store(ctx, 0, 0, k, 3 * 64 + 2, v, 3 * 64, false));
    CHECK_EQ_INT(pm_mctx_store(ctx, 0, 0, k, 3 * 64, v, 3 * 64, false), PM_OK);  /* raw f16 rows */
    CHECK_EQ_INT(pm_mctx_store(ctx, 0, 0, k, 3 * 32 * 4, v, 3 * 32 * 4, true), PM_OK);
    CHECK_EQ_INT(pm_mctx_store(ctx, 0, 2, k, 3 * 64 * 4, NULL, 0, true), PM_OK);
    uint32_t n_kv = 0;
    float mask[3 * 32];
    CHECK_EQ_INT(pm_mctx_kq_mask(ctx, 0, 0, true, 0, false, mask, 3, &n_kv), PM_E_BUFFER_SMALL);
    CHECK_EQ_INT(n_kv, 32);
    CHECK_EQ_INT(pm_mctx_kq_mask(ctx, 0, 0, true, 0, false, mask, 3 * 32, &n_kv), PM_OK);
    CHECK(mask[0] == 0.0f && mask[1] < 0.0f && mask[32 + 1] == 0.0f);
    /* another change makes the context stale */
    bool r;
    CHECK_EQ_INT(pm_mem_seq_rm(m, 5, -1, -1, &r), PM_OK);
    CHECK_FAILS_UNCHANGED(m, PM_E_STATE, pm_mctx_apply(ctx, 1));
    CHECK_FAILS_UNCHANGED(m, PM_E_STATE, pm_mctx_store(ctx, 0, 0, k, 3 * 32 * 4, NULL, 0, true));
    pm_mctx_free(ctx);
    ctx = NULL;
    /* a pending K-shift must be applied before init_batch */
    CHECK_EQ_INT(pm_mem_seq_add(m, 0, 0, -1, 2), PM_OK);
    CHECK(pm_mem_update_pending(m));
    pm_pos p2[4] = {5, 6, 7, 8};
    pm_batch *b2 = NULL;
    CHECK_EQ_INT(pm_batch_new(4, t, p2, 1, NULL, NULL, NULL, &b2), PM_OK);
    CHECK_FAILS_UNCHANGED(m, PM_E_STATE, pm_mem_init_batch(m, b2, 4, 128, false, &ctx));
    CHECK(ctx == NULL);
    bool did = false;
    CHECK_EQ_INT(pm_mem_update(m, &did), PM_OK);
    CHECK(did && !pm_mem_update_pending(m));
    CHECK_EQ_INT(pm_mem_update(m, &did), PM_OK);
    CHECK(!did);
    CHECK_EQ_INT(pm_mem_init_batch(m, b2, 4, 128, false, &ctx), PM_OK);
    pm_mctx_free(ctx);   /* never applied: nothing placed */
    pm_pos lo, hi;
    pm_mem_seq_pos_min(m, 0, &lo);
    pm_mem_seq_pos_max(m, 0, &hi);
    CHECK(lo == 2 && hi == 4);
    /* an embedding batch (no tokens) with automatic positions */
    pm_batch *e = NULL;
    CHECK_EQ_INT(pm_batch_new(3, NULL, NULL, 0, NULL, NULL, NULL, &e), PM_OK);
    CHECK_EQ_INT(pm_mem_init_batch(m, e, 8, 128, false, &ctx), PM_OK);
    CHECK_EQ_INT(pm_mctx_apply(ctx, 0), PM_OK);
    pm_pos upos[3];
    CHECK_EQ_INT(pm_mctx_ubatch_tokens(ctx, 0, NULL, upos, NULL, NULL), PM_OK);
    CHECK(upos[0] == 5 && upos[2] == 7);
    pm_mctx_free(ctx);
    pm_batch_free(e);
    pm_batch_free(b);
    pm_batch_free(b2);
    check_invariants(m, "batch api");
    pm_memory_free(m);
}

static void test_update_errors(void) {
    /* quantized K without a Hadamard size cannot shift: can_shift says so, and seq_add /
     * seq_div that would move cells are refused (UNSUPPORTED, nothing changed) instead of being
     * accepted and wedging every later update; moves of no cell are still accepted */
    pm_memory *m = make(&CFGS[4]);
    CHECK_EQ_INT(fill(m, 0, 6, 0), PM_OK);
    CHECK(!pm_mem_can_shift(m));
    CHECK_FAILS_UNCHANGED(m, PM_E_UNSUPPORTED, pm_mem_seq_add(m, 0, 0, -1, 3));
    CHECK_FAILS_UNCHANGED(m, PM_E_UNSUPPORTED, pm_mem_seq_div(m, 0, 0, -1, 2));
    CHECK_EQ_INT(pm_mem_seq_add(m, 0, 100, 200, 3), PM_OK);
    CHECK_EQ_INT(pm_mem_seq_add(m, 1, 0, -1, 3), PM_OK);
    CHECK(!pm_mem_update_pending(m));
    bool did = true;
    CHECK_EQ_INT(pm_mem_update(m, &did), PM_OK);
    pm_token t[1] = {1};
    pm_pos p[1] = {6};
    pm_seq_id s[1] = {0};
    CHECK_EQ_INT(decode(m, 1, t, p, NULL, s, 512, NULL), PM_OK);
    pm_memory_free(m);
    /* format 10 writes no k_rot / v_rot words: 8 bytes less per non-empty stream */
    cfg c10 = CFGS[0], c11 = CFGS[0];
    c10.format = 10;
    pm_memory *a = make(&c10), *b = make(&c11);
    CHECK_EQ_INT(fill(a, 0, 4, 0), PM_OK);
    CHECK_EQ_INT(fill(b, 0, 4, 0), PM_OK);
    uint64_t na, nb;
    pm_mem_state_size(a, -1, 0, 0, &na);
    pm_mem_state_size(b, -1, 0, 0, &nb);
    CHECK_EQ_U64(na + 8, nb);
    uint8_t *wb = write_state(b, -1, 0, &nb);
    CHECK_FAILS_UNCHANGED(a, PM_E_FORMAT, pm_mem_state_read(a, -1, 0, 0, wb, nb, false, NULL));
    free(wb);
    pm_memory_free(a);
    pm_memory_free(b);
}

static long g_ok[8], g_fail[8];
static const char *const OP_NAMES[8] = {"decode", "seq_rm", "seq_cp", "seq_keep", "seq_add", "seq_div", "update",
                                        "restore"};

/* Regression (fuzz_batch): a token at position -1 passes llama.cpp's checks but leaves a cell
 * at position -1 holding a sequence; reusing it corrupted the sequence index and a later
 * state write overflowed a heap buffer.  pymem rejects the batch (BATCH, nothing changed). */
static void test_negative_position(void) {
    cfg c = CFGS[0];
    c.size = 16;
    pm_memory *m = make(&c);
    pm_token t[6] = {1, 2, 3, 4, 5, 6};
    pm_pos p[6] = {-1, 0, 1, 2, 3, 4};
    pm_seq_id s[6] = {0, 0, 0, 0, 0, 0};
    CHECK_FAILS_UNCHANGED(m, PM_E_BATCH, decode(m, 6, t, p, NULL, s, 8, NULL));
    pm_pos q[2] = {-2, -1};
    CHECK_FAILS_UNCHANGED(m, PM_E_BATCH, decode(m, 2, t, q, NULL, s, 8, NULL));
    CHECK_EQ_INT(decode(m, 6, t, NULL, NULL, s, 8, NULL), PM_OK);
    CHECK_EQ_INT(decode(m, 6, t, NULL, NULL, s, 8, NULL), PM_OK);
    check_invariants(m, "negative position");
    check_round_trip(m, &c, "negative position");
    pm_memory_free(m);
}

/* Random operation sequences; after every operation: invariants, and a failure changed nothing. */
static void random_ops(const cfg *c, int n_ops) {
    pm_memory *m = make(c);
    if (m == NULL) {
        return;
    }
    char where[96];
    pm_pos next[PM_MAX_SEQ];
    for (int it = 0; it < n_ops; ++it) {
        for (uint32_t s = 0; s < c->n_seq_max; ++s) {
            pm_pos mx = -1;
            pm_mem_seq_pos_max(m, (pm_seq_id)s, &mx);
            next[s] = mx + 1;
        }
        uint32_t ns = c->n_seq_max;
        pm_seq_id seq = (pm_seq_id)(check_rand32() % (ns + 1)) - (check_rand32() % 8 == 0 ? 1 : 0);
        pm_pos p0 = (pm_pos)(check_rand32() % 40) - 1, p1 = (pm_pos)(check_rand32() % 40) - 1;
        int op = (int)(check_rand32() % 16);
        snap before = take(m);
        pm_status st = PM_OK;
        bool r;
        const char *name = "?";
        if (op < 6) {
            name = "decode";
            uint32_t n = 1 + check_rand32() % 9;
            pm_token tok[16];
            pm_pos pos[16];
            int32_t nsid[16];
            pm_seq_id sid[64];
            uint32_t nf = 0;
            bool autopos = check_rand32() % 4 == 0;
            for (uint32_t i = 0; i < n; ++i) {
                pm_seq_id s0 = (pm_seq_id)(check_rand32() % ns);
                tok[i] = (pm_token)(check_rand32() % 130);
                nsid[i] = 1;
                sid[nf++] = s0;
                if (ns > 1 && check_rand32() % 10 == 0) {
                    pm_seq_id s1 = (pm_seq_id)((s0 + 1 + check_rand32() % (ns - 1)) % ns);
                    sid[nf++] = s1;
                    nsid[i] = 2;
                    next[s1] = next[s0] > next[s1] ? next[s0] : next[s1];
                }
                pos[i] = next[s0];
                for (int32_t k = 0; k < nsid[i]; ++k) {
                    next[sid[nf - 1 - k]] = pos[i] + 1;
                }
                if (check_rand32() % 25 == 0) {
                    pos[i] += 2; /* a gap: BATCH */
                }
            }
            uint32_t n_ub = (check_rand32() % 3 == 0) ? 1 + check_rand32() % 4 : 512;
            st = decode(m, n, tok, autopos ? NULL : pos, nsid, sid, n_ub, &before);
        } else if (op == 6 || op == 7) {
            name = "seq_rm";
            st = pm_mem_seq_rm(m, seq, p0, p1, &r);
        } else if (op == 8) {
            name = "seq_cp";
            pm_seq_id dst = (pm_seq_id)(check_rand32() % ns);
            if (!c->unified && check_rand32() % 3 != 0) {
                p0 = p1 = -1;
            }
            if (c->unified && check_rand32() % 8 == 0) {
                dst = 200; /* a foreign id: accepted in a unified cache */
            }
            st = pm_mem_seq_cp(m, seq, dst, p0, p1);
        } else if (op == 9) {
            name = "seq_keep";
            st = pm_mem_seq_keep(m, seq);
        } else if (op == 10) {
            name = "seq_add";
            st = pm_mem_seq_add(m, seq, p0, p1, (pm_pos)(check_rand32() % 21) - 10);
        } else if (op == 11) {
            name = "seq_div";
            st = pm_mem_seq_div(m, seq, p0, p1, (int32_t)(check_rand32() % 5));
        } else if (op == 12) {
            name = "update";
            st = pm_mem_update(m, &r);
        } else if (op == 13) {
            name = "clear";
            if (check_rand32() % 4 == 0) {
                st = pm_mem_clear(m, check_rand32() % 2);
            }
        } else {
            /* restore a sequence of this cache into another id, or the whole state */
            name = "restore";
            pm_seq_id src = (pm_seq_id)(check_rand32() % ns), dst = (pm_seq_id)(check_rand32() % ns);
            uint64_t n;
            if (op == 14) {
                uint8_t *b = write_state(m, src, PM_ENVELOPE_LLAMA, &n);
                if (check_rand32() % 3 == 0 && n > 12) {
                    b[8 + check_rand32() % (n - 8)] ^= (uint8_t)(1u << (check_rand32() % 8));
                }
                st = pm_mem_state_read(m, dst, 0, PM_ENVELOPE_LLAMA, b, n, false, NULL);
                free(b);
            } else {
                uint8_t *b = write_state(m, -1, PM_ENVELOPE_NONE, &n);
                st = pm_mem_state_read(m, -1, 0, PM_ENVELOPE_NONE, b, n, false, NULL);
                uint64_t n2;
                uint8_t *b2 = write_state(m, -1, PM_ENVELOPE_NONE, &n2);
                CHECK_MSG(st == PM_OK && n == n2 && memcmp(b, b2, (size_t)n) == 0, "whole restore of itself");
                free(b);
                free(b2);
            }
        }
        snprintf(where, sizeof where, "cfg size %u op %d (%s) -> %s", c->size, it, name, pm_status_str(st));
        for (int k = 0; k < 8; ++k) {
            if (strcmp(name, OP_NAMES[k]) == 0) {
                (st == PM_OK ? g_ok : g_fail)[k]++;
            }
        }
        CHECK_MSG(st == PM_OK || st == PM_E_INVALID_ARG || st == PM_E_UNSUPPORTED || st == PM_E_NO_SLOT ||
                      st == PM_E_BATCH || st == PM_E_FORMAT || st == PM_E_SHIFT,
                  "%s: unexpected status (%s)", where, pm_last_error());
        if (st != PM_OK) {
            snap after = take(m);
            CHECK_MSG(same(before, after), "%s: the failure changed the memory", where);
            free(after.b);
        }
        free(before.b);
        check_invariants(m, where);
        if (it % 16 == 15) {
            check_round_trip(m, c, where);
        }
    }
    pm_memory_free(m);
}

static void test_random_ops(void) {
    const char *env = getenv("PYMEM_TEST_KV_OPS");
    int n = env != NULL ? atoi(env) : 250;
    for (int rep = 0; rep < 2; ++rep) {
        for (size_t ci = 0; ci < N_CFGS; ++ci) {
            check_rng_state = 0x9e3779b97f4a7c15ull ^ (ci * 7919u + (uint64_t)rep * 104729u);
            random_ops(&CFGS[ci], n);
        }
    }
    printf("    random ops (ok/failed):");
    for (int k = 0; k < 8; ++k) {
        printf(" %s %ld/%ld", OP_NAMES[k], g_ok[k], g_fail[k]);
    }
    printf("\n");
}

int main(void) {
    (void)check_randf; /* check.h helper this file does not need */
    RUN(test_kv_new_errors);
    RUN(test_null_memory);
    RUN(test_op_errors_unchanged);
    RUN(test_state_api_errors);
    RUN(test_restore_failures_unchanged);
    RUN(test_seq_set_order);
    RUN(test_batch_api);
    RUN(test_update_errors);
    RUN(test_negative_position);
    RUN(test_random_ops);
    return check_report("test_kv");
}
