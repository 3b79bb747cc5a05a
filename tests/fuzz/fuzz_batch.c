/* fuzz_batch.c - batches from arbitrary bytes: pm_batch_new, pm_mem_check_batch,
 * pm_mem_init_batch, pm_mctx_apply / store / kq_mask, interleaved with sequence operations,
 * updates and state round trips.
 *
 * Input: byte 0 selects the cache configuration, byte 1 n_ubatch (bits 0-2) and n_vocab
 * (bit 3: 0 = no token check), then commands until the input ends (at most 48):
 *   c % 10 in 0..4: a batch: n_tokens (byte % 24; 0 = empty), flags (bit 0 positions, bit 1
 *                   sequence ids, bit 2 output flags, bit 3 embeddings (no tokens), bit 4 raw
 *                   32-bit positions, bits 5-7 KQ-mask mode), then per token: token byte,
 *                   position (1 or 4 bytes), id count and ids, output bit
 *   5: seq_rm   6: seq_cp   7: seq_add / seq_div   8: seq_keep / update / clear
 *   9: state round trips and a per-sequence restore into another id
 *
 * Checked after every command: a failure changed nothing (full snapshot; a decode is
 * compared after its update step, as llama.cpp keeps that), the cell/position invariants. */
#include "fuzz_common.h"

static const fz_cfg CONFIGS[] = {
    /* size seq unif vtr fmt swa npos  type_k       type_v       swa_type           head nl ext arch (neox1 ctx no_ff: tests/common/kv_fixture.h) */
    {8, 2, 1, 1, 11, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 0, "a", 0, 0, 0},
    {16, 3, 0, 0, 11, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 0, "a", 0, 0, 0},
    {32, 4, 1, 1, 11, 0, 1, PM_TYPE_F32, PM_TYPE_F32, PM_SWA_NONE, 32, 3, 0, "a", 0, 0, 0},
    {16, 2, 1, 0, 11, 0, 1, PM_TYPE_Q8_0, PM_TYPE_Q8_0, PM_SWA_NONE, 32, 2, 0, "a", 0, 0, 0},
    {32, 3, 1, 1, 11, 4, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_STANDARD, 32, 2, 0, "a", 0, 0, 0},
    {16, 2, 0, 0, 10, 3, 1, PM_TYPE_F16, PM_TYPE_BF16, PM_SWA_CHUNKED, 32, 2, 0, "a", 0, 0, 0},
    {16, 2, 1, 0, 11, 0, 4, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 1, "a", 0, 0, 0},
    {256, 4, 1, 1, 11, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 0, "a", 0, 0, 0},
    {8, 4, 0, 1, 11, 5, 1, PM_TYPE_F32, PM_TYPE_F16, PM_SWA_SYMMETRIC, 64, 2, 0, "a", 0, 0, 0},
    {12, 3, 1, 0, 11, 0, 1, PM_TYPE_BF16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 1, NULL, 0, 0, 0},
};
#define N_CONFIGS (sizeof CONFIGS / sizeof CONFIGS[0])
#define MAX_TOK 24

static int g_trace = -1; /* $PYMEM_FUZZ_TRACE: print every command (for reproducers) */

#define TRACE(...)                                                                           \
    do {                                                                                     \
        if (g_trace > 0) {                                                                   \
            fprintf(stderr, __VA_ARGS__);                                                    \
        }                                                                                    \
    } while (0)

typedef struct rd {
    const uint8_t *p;
    size_t n;
} rd;

static uint8_t u8(rd *r) {
    if (r->n == 0) {
        return 0;
    }
    r->n--;
    return *r->p++;
}

static int32_t i32(rd *r) {
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
        v |= (uint32_t)u8(r) << (8 * k);
    }
    return (int32_t)v;
}

/* a sequence id: mostly valid, sometimes -1, n_seq_max or a large id */
static pm_seq_id seq_of(rd *r, const fz_cfg *c) {
    uint8_t b = u8(r);
    if (b >= 250) {
        return b == 250 ? -1 : b == 251 ? (pm_seq_id)c->n_seq_max : b == 252 ? 255 : b == 253 ? 256 : -2;
    }
    return (pm_seq_id)(b % c->n_seq_max);
}

/* a position: small, or relative to the end, or a hostile 32-bit value */
static pm_pos pos_of(rd *r) {
    uint8_t b = u8(r);
    if (b >= 248) {
        static const pm_pos hostile[8] = {INT32_MAX, INT32_MAX - 1, INT32_MIN, -2, 1 << 30, 65535, -1, 0};
        return hostile[b - 248];
    }
    return (pm_pos)(b % 64) - 1;
}

static void do_batch(pm_memory *m, const fz_cfg *c, rd *r, uint32_t n_ubatch, uint32_t n_vocab) {
    uint32_t n = u8(r) % MAX_TOK;
    uint8_t fl = u8(r);
    pm_token tok[MAX_TOK];
    pm_pos pos[MAX_TOK * 4];
    int32_t nsid[MAX_TOK];
    pm_seq_id sid[MAX_TOK * 4];
    int8_t out[MAX_TOK];
    uint32_t nf = 0;
    pm_pos next[PM_MAX_SEQ];
    for (uint32_t s = 0; s < c->n_seq_max; ++s) {
        pm_pos mx = -1;
        pm_mem_seq_pos_max(m, (pm_seq_id)s, &mx);
        next[s] = mx + (mx < INT32_MAX ? 1 : 0);
    }
    bool embd = (fl & 8) != 0;
    uint32_t n_pos = (embd && c->n_pos > 1) ? c->n_pos : 1;
    for (uint32_t i = 0; i < n; ++i) {
        tok[i] = (pm_token)(int8_t)u8(r);
        uint32_t k = 1 + (fl & 2 ? u8(r) % 3 : 0);
        nsid[i] = (int32_t)k;
        for (uint32_t q = 0; q < k; ++q) {
            sid[nf++] = seq_of(r, c);
        }
        pm_seq_id s0 = sid[nf - k];
        pm_pos base = (s0 >= 0 && (uint32_t)s0 < c->n_seq_max) ? next[s0] : 0;
        if (fl & 16) {
            pos[i] = i32(r);
        } else {
            int8_t d = (int8_t)u8(r);
            int64_t pv = (int64_t)base + (d >= -4 && d <= 4 ? 0 : d % 3);
            pos[i] = (pm_pos)(pv > INT32_MAX ? INT32_MAX : pv);
        }
        for (uint32_t q = nf - k; q < nf; ++q) {
            if (sid[q] >= 0 && (uint32_t)sid[q] < c->n_seq_max && pos[i] < INT32_MAX) {
                next[sid[q]] = pos[i] + 1;
            }
        }
        out[i] = (int8_t)(u8(r) & 1);
    }
    for (uint32_t j = 1; j < n_pos; ++j) {
        for (uint32_t i = 0; i < n; ++i) {
            int64_t pv = (int64_t)pos[i] + u8(r) % 3;
            pos[j * n + i] = (pm_pos)(pv > INT32_MAX ? INT32_MAX : pv);
        }
    }
    if (g_trace > 0) {
        fprintf(stderr, "batch n=%u flags=0x%02x:", n, fl);
        for (uint32_t i = 0, f = 0; i < n; ++i) {
            fprintf(stderr, " (tok %d pos %d seq", tok[i], (fl & 1) ? pos[i] : -999);
            for (int32_t q = 0; q < nsid[i]; ++q) {
                fprintf(stderr, " %d", sid[f++]);
            }
            fprintf(stderr, ")");
        }
        fprintf(stderr, "\n");
    }
    pm_batch *b = NULL;
    pm_status st = pm_batch_new(n, embd ? NULL : tok, (fl & 1) ? pos : NULL, n_pos, (fl & 2) ? nsid : NULL,
                                (fl & 2) ? sid : NULL, (fl & 4) ? out : NULL, &b);
    if (st != PM_OK) {
        FZ_ASSERT(st == PM_E_INVALID_ARG && b == NULL, "pm_batch_new: %s", pm_status_str(st));
        return;
    }
    FZ_ASSERT(pm_batch_n_tokens(b) == n, "n_tokens");
    pm_seq_id ids[4];
    for (uint32_t i = 0; i < n; ++i) {
        uint32_t k = pm_batch_seq_ids(b, i, ids, 4);
        FZ_ASSERT(k >= 1 && k <= (uint32_t)((fl & 2) ? nsid[i] : 1), "token %u has %u ids", i, k);
    }
    fz_buf before = fz_snapshot(m);
    st = pm_mem_check_batch(m, b, n_vocab, false);
    if (st == PM_OK) {
        st = pm_mem_update(m, NULL);
        FZ_ASSERT(st == PM_OK || st == PM_E_SHIFT, "update: %s", pm_status_str(st));
        if (st == PM_OK) {
            free(before.b);
            before = fz_snapshot(m);
        }
    }
    pm_mctx *ctx = NULL;
    if (st == PM_OK) {
        st = pm_mem_init_batch(m, b, n_ubatch, n_vocab, (fl & 0x20) != 0, &ctx);
        FZ_ASSERT(st == PM_OK || st == PM_E_BATCH || st == PM_E_NO_SLOT || st == PM_E_INVALID_ARG,
                  "init_batch: %s", pm_status_str(st));
    }
    TRACE("  -> %s\n", pm_status_str(st));
    if (st == PM_OK) {
        fz_apply_all(m, ctx, fl >> 5);
    } else {
        FZ_ASSERT(ctx == NULL, "context on failure");
        fz_buf after = fz_snapshot(m);
        fz_same(before, after, "a failed decode");
        free(after.b);
    }
    free(before.b);
    pm_mctx_free(ctx);
    pm_batch_free(b);
}

static void do_op(pm_memory *m, const fz_cfg *c, rd *r, uint8_t cmd) {
    fz_buf before = fz_snapshot(m);
    pm_status st = PM_OK;
    pm_seq_id s = seq_of(r, c);
    pm_pos p0 = pos_of(r), p1 = pos_of(r);
    bool res;
    uint8_t sub = u8(r);
    switch (cmd) {
    case 5:
        st = pm_mem_seq_rm(m, s, p0, p1, &res);
        FZ_ASSERT(st != PM_OK || res, "KV seq_rm returns true");
        break;
    case 6:
        st = pm_mem_seq_cp(m, s, seq_of(r, c), (sub & 1) ? p0 : -1, (sub & 2) ? p1 : -1);
        break;
    case 7: {
        int32_t d = (sub & 0x80) ? i32(r) : (int32_t)(int8_t)sub;
        st = (sub & 1) ? pm_mem_seq_div(m, s, p0, p1, d) : pm_mem_seq_add(m, s, p0, p1, d);
        break;
    }
    case 8:
        if (sub % 3 == 0) {
            st = pm_mem_seq_keep(m, s);
        } else if (sub % 3 == 1) {
            st = pm_mem_update(m, &res);
        } else {
            st = pm_mem_clear(m, sub & 4);
        }
        break;
    default: {
        fz_round_trip(m, c);
        pm_seq_id dst = seq_of(r, c);
        if (s >= 0 && s < PM_MAX_SEQ) {
            uint64_t n;
            uint8_t *blob = fz_write(m, s, PM_ENVELOPE_LLAMA, &n);
            st = pm_mem_state_read(m, dst, 0, PM_ENVELOPE_LLAMA, blob, n, false, NULL);
            free(blob);
        }
        break;
    }
    }
    TRACE("op %u seq %d p0 %d p1 %d sub 0x%02x -> %s\n", cmd, s, p0, p1, sub, pm_status_str(st));
    FZ_ASSERT(st == PM_OK || st == PM_E_INVALID_ARG || st == PM_E_UNSUPPORTED || st == PM_E_SHIFT ||
                  st == PM_E_NO_SLOT || st == PM_E_FORMAT,
              "op %u: %s", cmd, pm_status_str(st));
    if (st != PM_OK) {
        fz_buf after = fz_snapshot(m);
        fz_same(before, after, "a failed operation");
        free(after.b);
    }
    free(before.b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) {
        return 0;
    }
    static const uint32_t UB[8] = {1, 2, 3, 4, 5, 8, 16, 512};
    if (g_trace < 0) {
        g_trace = getenv("PYMEM_FUZZ_TRACE") != NULL;
    }
    const fz_cfg *c = &CONFIGS[data[0] % N_CONFIGS];
    uint32_t n_ubatch = UB[data[1] & 7];
    TRACE("config %u n_ubatch %u n_vocab %u\n", data[0] % (unsigned)N_CONFIGS, UB[data[1] & 7],
          (data[1] & 8) ? 0u : 128u);
    uint32_t n_vocab = (data[1] & 8) ? 0 : 128;
    rd r = {data + 2, size - 2};
    pm_memory *m = fz_make(c);
    for (int k = 0; k < 48 && r.n > 0; ++k) {
        uint8_t cmd = u8(&r) % 10;
        if (cmd < 5) {
            do_batch(m, c, &r, n_ubatch, n_vocab);
        } else {
            do_op(m, c, &r, cmd);
        }
        fz_invariants(m);
    }
    pm_memory_free(m);
    return 0;
}
