/* fuzz_mem_state.c - pm_mem_state_check / pm_mem_state_read of arbitrary bytes into the
 * recurrent and composite memories (iSWA, recurrent, hybrid, hybrid-iSWA): every section
 * parser behind one memory, and the transactional restore across parts.
 *
 * Input: byte 0 selects the memory (KINDS below), byte 1 the mode, the rest is the blob:
 *   bit 0: llama envelope     bit 1: per-sequence (else whole)    bits 2-3: target sequence
 *   bit 4: allow trailing     bit 5: prefill the memory           bit 6: PM_STATE_PARTIAL_ONLY
 *
 * Checked: check and read agree; a failed read changes nothing (whole state, every sequence
 * state, positions); after a successful read the state round-trips through a fresh memory. */
#include "fuzz_common.h"

#define N_SEQ 3

static pm_kv_layer mk_layers[4];

static void kv_params(pm_kv_params *p, pm_kv_layer *layers, const uint32_t *ils, uint32_t n, uint32_t size,
                      uint32_t unified, uint32_t v_trans, int32_t swa_type) {
    memset(p, 0, sizeof *p);
    for (uint32_t l = 0; l < n; ++l) {
        pm_kv_layer *L = &layers[l];
        memset(L, 0, sizeof *L);
        L->il = ils[l];
        L->n_head_kv = 1 + (l & 1);
        L->n_embd_head_k = 32;
        L->n_embd_head_v = 32;
        L->has_rope = 1;
        L->rope.mode = PM_ROPE_NEOX;
        L->rope.n_rot = 32;
        L->rope.freq_base = 10000.0f;
        L->rope.freq_scale = 1.0f;
        L->rope.attn_factor = 1.0f;
        L->rope.beta_fast = 32.0f;
        L->rope.beta_slow = 1.0f;
    }
    p->n_layer_model = 4;
    p->n_layer = n;
    p->layers = layers;
    p->size = size;
    p->n_seq_max = N_SEQ;
    p->type_k = PM_TYPE_F16;
    p->type_v = PM_TYPE_F16;
    p->v_trans = v_trans;
    p->unified = unified;
    p->swa_type = swa_type;
    p->n_swa = swa_type == PM_SWA_NONE ? 0 : 4;
    p->n_pos_per_embd = 1;
    p->k_rot = -1;
    p->v_rot = -1;
    p->can_shift = 1;
    p->format = 11;
    p->arch = "fz";
}

static pm_rec_layer rec_layers[2] = {{1, 32, 64, 0}, {3, 32, 64, 0}};

static void rec_params(pm_rec_params *r, uint32_t n_rs_seq) {
    memset(r, 0, sizeof *r);
    r->n_layer_model = 4;
    r->n_layer = 2;
    r->layers = rec_layers;
    r->size = N_SEQ;
    r->n_seq_max = N_SEQ;
    r->type_r = PM_TYPE_F32;
    r->type_s = PM_TYPE_F32;
    r->n_rs_seq = n_rs_seq;
    r->arch = "fz";
}

/* kind 0..7: iswa u/nu, recurrent (+rollback), hybrid u/nu, hybrid-iswa u/nu */
#define N_KINDS 8

static pm_memory *make(uint32_t kind) {
    pm_kv_params a, b;
    pm_rec_params r;
    pm_memory *m = NULL;
    pm_status st;
    static const uint32_t base_il[2] = {1, 3}, swa_il[2] = {0, 2}, attn_il[2] = {0, 2};
    uint32_t unified = kind % 2 == 0;
    switch (kind) {
    case 0:
    case 1:
        kv_params(&a, mk_layers, base_il, 2, 16, unified, 1, PM_SWA_NONE);
        kv_params(&b, mk_layers + 2, swa_il, 2, 16, unified, 1, PM_SWA_STANDARD);
        st = pm_iswa_new(&a, &b, &m);
        break;
    case 2:
    case 3:
        rec_params(&r, kind == 3 ? 2 : 0);
        st = pm_recurrent_new(&r, &m);
        break;
    case 4:
    case 5:
        kv_params(&a, mk_layers, attn_il, 2, 16, unified, 0, PM_SWA_NONE);
        rec_params(&r, 2);
        st = pm_hybrid_new(&a, &r, &m);
        break;
    default:
        kv_params(&a, mk_layers, attn_il, 0, 16, unified, 0, PM_SWA_NONE);
        kv_params(&b, mk_layers + 2, attn_il, 2, 16, unified, 0, PM_SWA_STANDARD);
        rec_params(&r, 0);
        st = pm_hybrid_iswa_new(&a, &b, &r, &m);
        break;
    }
    FZ_ASSERT(st == PM_OK, "make kind %u: %s (%s)", kind, pm_status_str(st), pm_last_error());
    return m;
}

/* seq 0 at 0..4, seq 1 at 0..2 (one decode each) */
static void prefill(pm_memory *m) {
    for (pm_seq_id s = 0; s < 2; ++s) {
        pm_token tok[5] = {1, 2, 3, 4, 5};
        pm_pos pos[5] = {0, 1, 2, 3, 4};
        int32_t nsid[5] = {1, 1, 1, 1, 1};
        pm_seq_id sid[5] = {s, s, s, s, s};
        uint32_t n = s == 0 ? 5 : 3;
        pm_batch *b = NULL;
        FZ_ASSERT(pm_batch_new(n, tok, pos, 1, nsid, sid, NULL, &b) == PM_OK, "prefill batch");
        pm_mctx *ctx = NULL;
        pm_status st = pm_mem_init_batch(m, b, 8, 0, false, &ctx);
        FZ_ASSERT(st == PM_OK, "prefill: %s (%s)", pm_status_str(st), pm_last_error());
        for (uint32_t i = 0; i < pm_mctx_n_ubatch(ctx); ++i) {
            FZ_ASSERT(pm_mctx_apply(ctx, i) == PM_OK, "prefill apply");
        }
        pm_mctx_free(ctx);
        pm_batch_free(b);
    }
}

static uint8_t *write_all(pm_memory *m, pm_seq_id seq, uint32_t flags, uint32_t env, uint64_t *n) {
    uint64_t size = 0, w = 0;
    pm_status st = pm_mem_state_size(m, seq, flags, env, &size);
    FZ_ASSERT(st == PM_OK, "state_size(%d): %s", seq, pm_last_error());
    uint8_t *b = malloc(size + 1);
    FZ_ASSERT(b != NULL, "out of memory");
    st = pm_mem_state_write(m, seq, flags, env, b, size, &w);
    FZ_ASSERT(st == PM_OK && w == size, "state_write(%d)", seq);
    *n = size;
    return b;
}

/* whole state, every sequence state (also partial), positions */
static fz_buf snapshot(pm_memory *m) {
    fz_buf s = {NULL, 0, 0};
    uint64_t n;
    uint8_t *w = write_all(m, -1, 0, PM_ENVELOPE_NONE, &n);
    fz_put(&s, w, n);
    free(w);
    for (pm_seq_id q = 0; q < N_SEQ; ++q) {
        for (uint32_t f = 0; f < 2; ++f) {
            w = write_all(m, q, f, PM_ENVELOPE_NONE, &n);
            fz_put(&s, w, n);
            free(w);
        }
        pm_pos p[2] = {0, 0};
        pm_mem_seq_pos_min(m, q, &p[0]);
        pm_mem_seq_pos_max(m, q, &p[1]);
        fz_put(&s, p, sizeof p);
    }
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) {
        return 0;
    }
    uint32_t kind = data[0] % N_KINDS;
    uint8_t mode = data[1];
    const uint8_t *blob = data + 2;
    size_t n = size - 2;
    pm_memory *m = make(kind);
    if (mode & 0x20) {
        prefill(m);
    }
    uint32_t env = (mode & 1) ? PM_ENVELOPE_LLAMA : PM_ENVELOPE_NONE;
    pm_seq_id seq = (mode & 2) ? (pm_seq_id)((mode >> 2) & 3) % N_SEQ : -1;
    uint32_t flags = (mode & 0x40) ? PM_STATE_PARTIAL_ONLY : 0;
    bool trailing = (mode & 0x10) != 0;

    fz_buf before = snapshot(m);
    uint64_t c1 = 0, c2 = 0;
    pm_status s1 = pm_mem_state_check(m, seq, flags, env, blob, n, &c1);
    pm_status s2 = pm_mem_state_read(m, seq, flags, env, blob, n, trailing, &c2);
    if (s1 != PM_OK) {
        FZ_ASSERT(s2 == s1, "check %s, read %s", pm_status_str(s1), pm_status_str(s2));
    } else if (s2 == PM_OK) {
        FZ_ASSERT(c1 == c2 && (trailing || c2 == n), "consumed: check %llu, read %llu of %zu",
                  (unsigned long long)c1, (unsigned long long)c2, n);
    } else {
        FZ_ASSERT(s2 == PM_E_NO_SLOT || (s2 == PM_E_FORMAT && !trailing && c1 != n),
                  "check accepted, read %s (%s)", pm_status_str(s2), pm_last_error());
    }
    if (s2 != PM_OK) {
        fz_buf after = snapshot(m);
        fz_same(before, after, "a failed state_read");
        free(after.b);
    } else {
        /* round trip through a fresh memory of the same kind */
        uint64_t n1, n2;
        uint8_t *w1 = write_all(m, -1, 0, PM_ENVELOPE_NONE, &n1);
        pm_memory *f = make(kind);
        pm_status st = pm_mem_state_read(f, -1, 0, PM_ENVELOPE_NONE, w1, n1, false, NULL);
        FZ_ASSERT(st == PM_OK, "round trip read: %s (%s)", pm_status_str(st), pm_last_error());
        uint8_t *w2 = write_all(f, -1, 0, PM_ENVELOPE_NONE, &n2);
        FZ_ASSERT(n1 == n2 && memcmp(w1, w2, n1) == 0, "round trip changed the state");
        free(w1);
        free(w2);
        pm_memory_free(f);
    }
    free(before.b);
    pm_memory_free(m);
    return 0;
}
