/* fuzz_kv_state.c - pm_mem_state_check / pm_mem_state_read of arbitrary bytes.
 *
 * Input: byte 0 selects the cache configuration (CONFIGS below; 0-8 are the llama.cpp
 * configurations whose real blobs tests/vectors/regen.py puts in the seed corpus), byte 1 the
 * mode, the rest is the blob:
 *   mode bit 0: llama envelope      bit 1: per-sequence (else whole)
 *   bits 2-3:   target sequence     bit 4: allow trailing bytes
 *   bit 5:      prefill the cache   bit 6: PM_STATE_PARTIAL_ONLY
 *   bit 7:      read twice (the second read sees the first one's result)
 *
 * Checked: check and read agree (status, bytes consumed); a failed read changes nothing
 * (full snapshot); after a successful read the invariants hold and the state round-trips
 * (write -> read into a fresh cache -> write gives the same bytes, whole and per sequence). */
#include "fuzz_common.h"

static const fz_cfg CONFIGS[] = {
    /* size seq unif vtr fmt swa npos  type_k       type_v       swa_type        head nl ext arch (neox1 ctx no_ff: tests/common/kv_fixture.h) */
    {256, 4, 1, 1, 11, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 0, "llama", 0, 0, 0},      /* 0 */
    {256, 4, 1, 0, 11, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 0, "llama", 0, 0, 0},      /* 1 */
    {256, 4, 0, 1, 11, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 0, "llama", 0, 0, 0},      /* 2 */
    {256, 4, 0, 0, 11, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 0, "llama", 0, 0, 0},      /* 3 */
    {256, 2, 1, 0, 11, 0, 1, PM_TYPE_Q8_0, PM_TYPE_Q8_0, PM_SWA_NONE, 32, 2, 0, "llama", 0, 0, 0},    /* 4 */
    {256, 2, 1, 1, 11, 0, 1, PM_TYPE_Q8_0, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 0, "llama", 0, 0, 0},     /* 5 */
    {256, 3, 1, 1, 10, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 0, "llama", 0, 0, 0},      /* 6 */
    {256, 3, 0, 0, 10, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 0, "llama", 0, 0, 0},      /* 7 */
    {256, 2, 1, 0, 11, 0, 1, PM_TYPE_Q8_0, PM_TYPE_Q8_0, PM_SWA_NONE, 64, 2, 0, "llama", 0, 0, 0},    /* 8 */
    {16, 2, 1, 1, 11, 0, 1, PM_TYPE_F32, PM_TYPE_F32, PM_SWA_NONE, 32, 3, 0, "tiny", 0, 0, 0},        /* 9 */
    {8, 3, 0, 0, 11, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 0, "tiny", 0, 0, 0},         /* 10 */
    {32, 2, 1, 1, 11, 4, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_STANDARD, 32, 2, 0, "swa", 0, 0, 0},     /* 11 */
    {16, 2, 1, 0, 11, 0, 1, PM_TYPE_F16, PM_TYPE_F16, PM_SWA_NONE, 32, 2, 1, "ext", 0, 0, 0},         /* 12 */
    {16, 2, 1, 0, 11, 0, 4, PM_TYPE_F16, PM_TYPE_BF16, PM_SWA_NONE, 32, 2, 1, "mrope", 0, 0, 0},      /* 13 */
    {24, 3, 1, 0, 10, 3, 1, PM_TYPE_Q8_0, PM_TYPE_F32, PM_SWA_CHUNKED, 32, 3, 0, NULL, 0, 0, 0},      /* 14 */
};
#define N_CONFIGS (sizeof CONFIGS / sizeof CONFIGS[0])

/* A fixed start state: seq 0 at 0..4 with a hole, seq 1 at 0..2, a cell shared by seq 0 and 1. */
static void prefill(pm_memory *m, const fz_cfg *c) {
    pm_token tok[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    pm_pos pos[8] = {0, 1, 2, 3, 4, 0, 1, 2};
    int32_t nsid[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    pm_seq_id sid[8] = {0, 0, 0, 0, 0, 1, 1, 1};
    uint32_t n = c->n_seq_max > 1 ? 8 : 5;
    if (c->size < n) {
        n = c->size;
    }
    pm_batch *b = NULL;
    FZ_ASSERT(pm_batch_new(n, tok, pos, 1, nsid, sid, NULL, &b) == PM_OK, "prefill batch");
    pm_mctx *ctx = NULL;
    pm_status st = pm_mem_init_batch(m, b, c->unified ? 512 : 4, 128, false, &ctx);
    FZ_ASSERT(st == PM_OK, "prefill init_batch: %s", pm_status_str(st));
    fz_apply_all(m, ctx, 0);
    pm_mctx_free(ctx);
    pm_batch_free(b);
    bool r;
    pm_mem_seq_rm(m, 0, 1, 2, &r);
    if (c->unified && c->n_seq_max > 1) {
        pm_mem_seq_cp(m, 0, 1, 3, 4);
    }
}

static void one_read(pm_memory *m, const fz_cfg *c, pm_seq_id seq, uint32_t flags, uint32_t env, bool trailing,
                     const uint8_t *blob, size_t n) {
    fz_buf before = fz_snapshot(m);
    uint64_t c1 = 0, c2 = 0;
    pm_status s1 = pm_mem_state_check(m, seq, flags, env, blob, n, &c1);
    fz_buf mid = fz_snapshot(m);
    fz_same(before, mid, "state_check");
    free(mid.b);
    pm_status s2 = pm_mem_state_read(m, seq, flags, env, blob, n, trailing, &c2);
    if (s1 != PM_OK) {
        FZ_ASSERT(s2 == s1, "check %s, read %s", pm_status_str(s1), pm_status_str(s2));
    } else if (s2 == PM_OK) {
        FZ_ASSERT(c1 == c2 && (trailing || c2 == n), "consumed: check %llu, read %llu of %zu",
                  (unsigned long long)c1, (unsigned long long)c2, n);
    } else {
        FZ_ASSERT(s2 == PM_E_NO_SLOT || (s2 == PM_E_FORMAT && !trailing && c1 != n) || s2 == PM_E_NOMEM,
                  "check accepted, read %s", pm_status_str(s2));
    }
    FZ_ASSERT(s2 == PM_OK || s2 == PM_E_FORMAT || s2 == PM_E_NO_SLOT || s2 == PM_E_INVALID_ARG ||
                  s2 == PM_E_UNSUPPORTED,
              "unexpected status %s", pm_status_str(s2));
    if (s2 != PM_OK) {
        fz_buf after = fz_snapshot(m);
        fz_same(before, after, "a failed state_read");
        free(after.b);
    } else {
        fz_invariants(m);
        fz_round_trip(m, c);
    }
    free(before.b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) {
        return 0;
    }
    const fz_cfg *c = &CONFIGS[data[0] % N_CONFIGS];
    uint8_t mode = data[1];
    pm_memory *m = fz_make(c);
    if (mode & 0x20) {
        prefill(m, c);
    }
    uint32_t env = (mode & 1) ? PM_ENVELOPE_LLAMA : PM_ENVELOPE_NONE;
    pm_seq_id seq = (mode & 2) ? (pm_seq_id)((mode >> 2) & 3) : -1;
    uint32_t flags = (mode & 0x40) ? PM_STATE_PARTIAL_ONLY : 0;
    bool trailing = (mode & 0x10) != 0;
    one_read(m, c, seq, flags, env, trailing, data + 2, size - 2);
    if (mode & 0x80) {
        one_read(m, c, seq == -1 ? 0 : -1, flags, env, true, data + 2, size - 2);
    }
    pm_memory_free(m);
    return 0;
}
