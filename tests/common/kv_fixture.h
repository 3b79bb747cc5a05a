/* kv_fixture.h - the KV-cache parameters fixture shared by the C tests (tests/c) and the fuzz
 * targets (tests/fuzz): one description of a test cache, one function that fills
 * pm_kv_params from it.  Header-only (static inline): include it from one translation unit
 * per program. */
#ifndef PM_TESTS_KV_FIXTURE_H
#define PM_TESTS_KV_FIXTURE_H

#include <pymem.h>
#include <stdint.h>
#include <string.h>

typedef struct pmt_kv_cfg {
    uint32_t size, n_seq_max, unified, v_trans, format, n_swa, n_pos;
    int32_t type_k, type_v, swa_type;
    uint32_t head_k, n_layer_model, cell_ext;
    const char *arch;
    uint32_t neox_layer1;     /* the second layer rotates NEOX (else as the first) */
    uint32_t n_ctx_orig;      /* 0: 131072 */
    uint32_t no_freq_factors; /* else head_k / 2 frequency factors of 1 */
} pmt_kv_cfg;

/* Two cache layers, model layers 0 and n_layer_model - 1 (at least 2 model layers): 1 KV
 * head, 2 for the last layer of a model of more than two layers; heads of head_k, all of it
 * rotated (NORM, M-RoPE with n_pos > 1).  layers[2] and ff[64] are the caller's storage the
 * parameters point to. */
static inline pm_kv_params pmt_kv_params(const pmt_kv_cfg *c, pm_kv_layer layers[2], float ff[64]) {
    memset(layers, 0, 2 * sizeof(pm_kv_layer));
    for (int i = 0; i < 64; ++i) {
        ff[i] = 1.0f;
    }
    uint32_t nl = c->n_layer_model < 2 ? 2 : c->n_layer_model;
    for (uint32_t l = 0; l < 2; ++l) {
        pm_kv_layer *L = &layers[l];
        L->il = l == 0 ? 0 : nl - 1;
        L->n_head_kv = (nl > 2 && l == 1) ? 2 : 1;
        L->n_embd_head_k = c->head_k;
        L->n_embd_head_v = c->head_k;
        L->has_rope = 1;
        L->rope.mode = c->n_pos > 1 ? PM_ROPE_MROPE : (l == 1 && c->neox_layer1) ? PM_ROPE_NEOX : PM_ROPE_NORM;
        L->rope.n_rot = c->head_k;
        L->rope.freq_base = 10000.0f;
        L->rope.freq_scale = 1.0f;
        L->rope.attn_factor = 1.0f;
        L->rope.beta_fast = 32.0f;
        L->rope.beta_slow = 1.0f;
        L->rope.n_ctx_orig = c->n_ctx_orig ? c->n_ctx_orig : 131072;
        if (!c->no_freq_factors) {
            L->rope.n_freq_factors = c->head_k / 2;
            L->rope.freq_factors = ff;
        }
    }
    pm_kv_params p;
    memset(&p, 0, sizeof p);
    p.n_layer_model = nl;
    p.n_layer = 2;
    p.layers = layers;
    p.size = c->size;
    p.n_seq_max = c->n_seq_max;
    p.type_k = c->type_k;
    p.type_v = c->type_v;
    p.v_trans = c->v_trans;
    p.unified = c->unified;
    p.n_swa = c->n_swa;
    p.swa_type = c->swa_type;
    p.n_pos_per_embd = c->n_pos ? c->n_pos : 1;
    p.cell_ext = c->cell_ext;
    p.k_rot = -1;
    p.v_rot = -1;
    p.can_shift = 1;
    p.format = c->format;
    p.arch = c->arch;
    return p;
}

#endif /* PM_TESTS_KV_FIXTURE_H */
