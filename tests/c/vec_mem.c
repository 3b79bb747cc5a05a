/* vec_mem.c - memories of every kind from a shared-vector case (see vec_mem.h). */
#include "vec_mem.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const VM_PARAMS[] = {
    /* common */
    "kind", "arch", "n_layer", "n_seq_max", "n_vocab", "n_ubatch",
    /* KV part (the first one: kv, iSWA base, hybrid attn) */
    "layers", "n_head_kv", "n_embd_head_k", "n_embd_head_v", "size", "type_k", "type_v", "v_trans", "unified",
    "n_swa", "swa_type", "n_pos_per_embd", "cell_ext", "n_embd_v_gqa_max", "k_rot", "v_rot", "can_shift",
    "format", "rope_mode", "rope_n_rot", "rope_n_ctx_orig", "rope_freq_base", "rope_freq_scale",
    "rope_ext_factor", "rope_attn_factor", "rope_beta_fast", "rope_beta_slow", "rope_freq_factors",
    /* the iSWA SWA half */
    "swa_layers", "swa_size", "swa_n_swa", "swa_swa_type", "swa_k_rot", "swa_v_rot",
    /* the recurrent part */
    "rec_layers", "n_embd_r", "n_embd_s", "rec_size", "type_r", "type_s", "n_rs_seq", NULL};
#define N_COMMON 6
#define N_KV 28   /* VM_PARAMS[6..34) */
#define N_SWA 6   /* [34..40) */

static int word_index(const char *w, const char *const *words) {
    for (int i = 0; words[i] != NULL; ++i) {
        if (strcmp(w, words[i]) == 0) {
            return i;
        }
    }
    return -1;
}

/* "none" = an empty list */
static int layer_list(const char *v, int64_t *out) {
    if (v == NULL) {
        return -1;
    }
    return strcmp(v, "none") == 0 ? 0 : vec_ints(v, ' ', out, VM_MAX_LAYERS);
}

static int get_int(const vec_case *c, const char *key, int64_t dflt, int64_t *out, char *err, size_t cap) {
    const char *v = vec_param(c, key);
    *out = dflt;
    if (v == NULL) {
        return dflt == INT64_MIN ? vec_fail(err, cap, "case %s: parameter %s missing", c->name, key) : 0;
    }
    return vec_ints(v, ' ', out, 1) == 1 ? 0 : vec_fail(err, cap, "case %s: parameter %s: %s", c->name, key, v);
}

static int get_ints(const vec_case *c, const char *key, int64_t *out, int need, char *err, size_t cap) {
    const char *v = vec_param(c, key);
    int n = v ? vec_ints(v, ' ', out, VM_MAX_LAYERS) : -1;
    if (n < 0 || (need >= 0 && n != need)) {
        return vec_fail(err, cap, "case %s: parameter %s: %s", c->name, key, v ? v : "(missing)");
    }
    return n;
}

/* storage that must outlive the pm_kv_params until the constructor ran */
typedef struct kv_buf {
    pm_kv_layer layers[VM_MAX_LAYERS];
    float ff[1024];
} kv_buf;

#define REQ(x)                                                                               \
    do {                                                                                     \
        if ((x) < 0) {                                                                       \
            return -1;                                                                       \
        }                                                                                    \
    } while (0)

/* One KV part's parameters: prefix "" (first part) or "swa_" (the iSWA SWA half: its own
 * layers, size, n_swa, swa_type, k_rot, v_rot; everything else shared). */
static int kv_params(const vec_case *c, const char *prefix, int64_t nl, pm_kv_params *p, kv_buf *buf, char *err,
                     size_t cap) {
    char key[64];
#define OWN(k) (snprintf(key, sizeof key, "%s%s", prefix, k), key)
    int64_t held[VM_MAX_LAYERS], hkv[VM_MAX_LAYERS], hk[VM_MAX_LAYERS], hv[VM_MAX_LAYERS], nrot[VM_MAX_LAYERS],
        orig[VM_MAX_LAYERS], x;
    float fc[6][VM_MAX_LAYERS];
    int n_held = layer_list(vec_param(c, OWN("layers")), held);
    if (n_held < 0) {
        return vec_fail(err, cap, "case %s: parameter %s", c->name, key);
    }
    REQ(get_ints(c, "n_head_kv", hkv, (int)nl, err, cap));
    REQ(get_ints(c, "n_embd_head_k", hk, (int)nl, err, cap));
    REQ(get_ints(c, "n_embd_head_v", hv, (int)nl, err, cap));
    REQ(get_ints(c, "rope_n_rot", nrot, (int)nl, err, cap));
    REQ(get_ints(c, "rope_n_ctx_orig", orig, (int)nl, err, cap));
    static const char *const FKEYS[6] = {"rope_freq_base", "rope_freq_scale", "rope_ext_factor",
                                         "rope_attn_factor", "rope_beta_fast", "rope_beta_slow"};
    for (int k = 0; k < 6; ++k) {
        const char *v = vec_param(c, FKEYS[k]);
        if (v == NULL || vec_floats(v, fc[k], VM_MAX_LAYERS) != nl) {
            return vec_fail(err, cap, "case %s: parameter %s", c->name, FKEYS[k]);
        }
    }
    int n_ff = 0;
    if (vec_param(c, "rope_freq_factors") != NULL) {
        n_ff = vec_floats(vec_param(c, "rope_freq_factors"), buf->ff, 1024);
        if (n_ff <= 0) {
            return vec_fail(err, cap, "case %s: rope_freq_factors", c->name);
        }
    }
    char modes_buf[1024];
    char *modes[VM_MAX_LAYERS];
    const char *mv = vec_param(c, "rope_mode");
    if (mv == NULL || strlen(mv) >= sizeof modes_buf) {
        return vec_fail(err, cap, "case %s: rope_mode", c->name);
    }
    strcpy(modes_buf, mv);
    if (vec_split(modes_buf, modes, VM_MAX_LAYERS) != nl) {
        return vec_fail(err, cap, "case %s: rope_mode needs %lld words", c->name, (long long)nl);
    }
    static const char *const MODE_W[] = {"norm", "neox", "mrope", "imrope", "vision", "none", "off", NULL};
    static const int32_t MODE_V[] = {PM_ROPE_NORM, PM_ROPE_NEOX, PM_ROPE_MROPE, PM_ROPE_IMROPE,
                                     PM_ROPE_VISION, PM_ROPE_NONE, PM_ROPE_NONE};
    memset(buf->layers, 0, sizeof buf->layers);
    for (int k = 0; k < n_held; ++k) {
        int64_t il = held[k];
        if (il < 0 || il >= nl) {
            return vec_fail(err, cap, "case %s: layer %lld", c->name, (long long)il);
        }
        pm_kv_layer *L = &buf->layers[k];
        L->il = (uint32_t)il;
        L->n_head_kv = (uint32_t)hkv[il];
        L->n_embd_head_k = (uint32_t)hk[il];
        L->n_embd_head_v = (uint32_t)hv[il];
        int m = word_index(modes[il], MODE_W);
        if (m < 0) {
            return vec_fail(err, cap, "case %s: rope mode %s", c->name, modes[il]);
        }
        L->has_rope = strcmp(modes[il], "off") != 0;
        L->rope.mode = MODE_V[m];
        L->rope.n_rot = (uint32_t)nrot[il];
        L->rope.freq_base = fc[0][il];
        L->rope.freq_scale = fc[1][il];
        L->rope.ext_factor = fc[2][il];
        L->rope.attn_factor = fc[3][il];
        L->rope.beta_fast = fc[4][il];
        L->rope.beta_slow = fc[5][il];
        L->rope.n_ctx_orig = (uint32_t)orig[il];
        if (L->has_rope && n_ff > 0) {
            L->rope.n_freq_factors = (uint32_t)n_ff;
            L->rope.freq_factors = buf->ff;
        }
    }
    static const char *const SWA_W[] = {"none", "standard", "chunked", "symmetric", NULL};
    const char *tk = vec_param(c, "type_k"), *tv = vec_param(c, "type_v");
    const char *sw = vec_param(c, OWN("swa_type"));
    memset(p, 0, sizeof *p);
    if (!tk || !tv || pm_type_from_name(tk, &p->type_k) != PM_OK || pm_type_from_name(tv, &p->type_v) != PM_OK) {
        return vec_fail(err, cap, "case %s: cache types", c->name);
    }
    if (sw == NULL || word_index(sw, SWA_W) < 0) {
        return vec_fail(err, cap, "case %s: %s", c->name, key);
    }
    p->swa_type = word_index(sw, SWA_W);
    p->n_layer_model = (uint32_t)nl;
    p->n_layer = (uint32_t)n_held;
    p->layers = buf->layers;
    REQ(get_int(c, OWN("size"), INT64_MIN, &x, err, cap));
    p->size = (uint32_t)x;
    REQ(get_int(c, "n_seq_max", INT64_MIN, &x, err, cap));
    p->n_seq_max = (uint32_t)x;
    REQ(get_int(c, "v_trans", 0, &x, err, cap));
    p->v_trans = (uint32_t)x;
    REQ(get_int(c, "unified", 1, &x, err, cap));
    p->unified = (uint32_t)x;
    REQ(get_int(c, OWN("n_swa"), 0, &x, err, cap));
    p->n_swa = (uint32_t)x;
    REQ(get_int(c, "n_pos_per_embd", 1, &x, err, cap));
    p->n_pos_per_embd = (uint32_t)x;
    REQ(get_int(c, "cell_ext", 0, &x, err, cap));
    p->cell_ext = (uint32_t)x;
    REQ(get_int(c, "n_embd_v_gqa_max", 0, &x, err, cap));
    p->n_embd_v_gqa_max = (uint32_t)x;
    REQ(get_int(c, OWN("k_rot"), -1, &x, err, cap));
    p->k_rot = (int32_t)x;
    REQ(get_int(c, OWN("v_rot"), -1, &x, err, cap));
    p->v_rot = (int32_t)x;
    REQ(get_int(c, "can_shift", 1, &x, err, cap));
    p->can_shift = (uint32_t)x;
    REQ(get_int(c, "format", 11, &x, err, cap));
    p->format = (uint32_t)x;
    p->arch = vec_param(c, "arch");
#undef OWN
    return 0;
}

static int rec_params(const vec_case *c, int64_t nl, pm_rec_params *p, pm_rec_layer *layers, char *err,
                      size_t cap) {
    int64_t held[VM_MAX_LAYERS], er[VM_MAX_LAYERS], es[VM_MAX_LAYERS], x;
    int n = layer_list(vec_param(c, "rec_layers"), held);
    if (n < 0) {
        return vec_fail(err, cap, "case %s: parameter rec_layers", c->name);
    }
    REQ(get_ints(c, "n_embd_r", er, (int)nl, err, cap));
    REQ(get_ints(c, "n_embd_s", es, (int)nl, err, cap));
    memset(p, 0, sizeof *p);
    memset(layers, 0, sizeof(pm_rec_layer) * VM_MAX_LAYERS);
    for (int k = 0; k < n; ++k) {
        if (held[k] < 0 || held[k] >= nl) {
            return vec_fail(err, cap, "case %s: recurrent layer %lld", c->name, (long long)held[k]);
        }
        layers[k].il = (uint32_t)held[k];
        layers[k].n_embd_r = (uint32_t)er[held[k]];
        layers[k].n_embd_s = (uint32_t)es[held[k]];
    }
    const char *tr = vec_param(c, "type_r"), *ts = vec_param(c, "type_s");
    if (!tr || !ts || pm_type_from_name(tr, &p->type_r) != PM_OK || pm_type_from_name(ts, &p->type_s) != PM_OK) {
        return vec_fail(err, cap, "case %s: recurrent types", c->name);
    }
    p->n_layer_model = (uint32_t)nl;
    p->n_layer = (uint32_t)n;
    p->layers = layers;
    REQ(get_int(c, "rec_size", INT64_MIN, &x, err, cap));
    p->size = (uint32_t)x;
    REQ(get_int(c, "n_seq_max", INT64_MIN, &x, err, cap));
    p->n_seq_max = (uint32_t)x;
    REQ(get_int(c, "n_rs_seq", 0, &x, err, cap));
    p->n_rs_seq = (uint32_t)x;
    p->arch = vec_param(c, "arch");
    return 0;
}

int vm_build(const vec_case *c, vm_mem *m, char *err, size_t cap) {
    static const char *const KINDS[] = {"kv", "iswa", "recurrent", "hybrid", "hybrid_iswa", NULL};
    /* per kind: has the first KV part, the SWA half, the recurrent part */
    static const bool HAS[5][3] = {{1, 0, 0}, {1, 1, 0}, {0, 0, 1}, {1, 0, 1}, {1, 1, 1}};
    memset(m, 0, sizeof *m);
    const char *kind = vec_param(c, "kind");
    int k = kind ? word_index(kind, KINDS) : -1;
    if (k < 0) {
        return vec_fail(err, cap, "case %s: unsupported kind %s", c->name, kind ? kind : "(none)");
    }
    m->kind = KINDS[k];
    for (size_t i = 0; i < c->n_items; ++i) {
        int w = c->items[i].is_event ? -1 : word_index(c->items[i].key, VM_PARAMS);
        bool ok = w < 0 || w < N_COMMON || (w < N_COMMON + N_KV ? HAS[k][0]
                                                                : w < N_COMMON + N_KV + N_SWA ? HAS[k][1] : HAS[k][2]);
        if (!ok) {
            return vec_fail(err, cap, "case %s line %d: %s does not belong to kind %s", c->name, c->items[i].line,
                        c->items[i].key, kind);
        }
    }
    int64_t nl = 0, x = 0;
    REQ(get_int(c, "n_layer", INT64_MIN, &nl, err, cap));
    if (nl <= 0 || nl > VM_MAX_LAYERS) {
        return vec_fail(err, cap, "case %s: n_layer %lld", c->name, (long long)nl);
    }
    static kv_buf kb0, kb1;
    static pm_rec_layer rl[VM_MAX_LAYERS];
    pm_kv_params p0, p1;
    pm_rec_params pr;
    if (HAS[k][0]) {
        REQ(kv_params(c, "", nl, &p0, &kb0, err, cap));
    }
    if (HAS[k][1]) {
        REQ(kv_params(c, "swa_", nl, &p1, &kb1, err, cap));
    }
    if (HAS[k][2]) {
        REQ(rec_params(c, nl, &pr, rl, err, cap));
    }
    REQ(get_int(c, "n_seq_max", INT64_MIN, &x, err, cap));
    m->n_seq_max = (uint32_t)x;
    REQ(get_int(c, "n_vocab", 0, &x, err, cap));
    m->n_vocab = (uint32_t)x;
    REQ(get_int(c, "n_ubatch", 512, &x, err, cap));
    m->n_ubatch = (uint32_t)x;
    pm_status st;
    switch (k) {
    case 0: st = pm_kv_new(&p0, &m->mem); break;
    case 1: st = pm_iswa_new(&p0, &p1, &m->mem); break;
    case 2: st = pm_recurrent_new(&pr, &m->mem); break;
    case 3: st = pm_hybrid_new(&p0, &pr, &m->mem); break;
    default: st = pm_hybrid_iswa_new(&p0, &p1, &pr, &m->mem); break;
    }
    if (st != PM_OK) {
        return vec_fail(err, cap, "case %s: constructing %s: %s (%s)", c->name, kind, pm_status_str(st), pm_last_error());
    }
    m->n_kv = pm_memory_n_kv(m->mem);
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        vm_kv_part *P = &m->kv[p];
        pm_kv_info_get(m->mem, p, &P->info);
        P->base = m->stride;
        for (uint32_t l = 0; l < P->info.n_layer; ++l) {
            pm_kv_layer_info_get(m->mem, p, l, &P->li[l]);
            P->kb[l] = P->li[l].k_row_bytes;
            P->vb[l] = P->li[l].v_row_bytes * (P->info.v_trans ? P->li[l].n_embd_v_gqa : 1);
            m->stride += P->kb[l] + P->vb[l];
        }
    }
    m->has_rec = pm_memory_has_rec(m->mem);
    if (m->has_rec) {
        pm_rec_info_get(m->mem, &m->rec);
        for (uint32_t l = 0; l < m->rec.n_layer; ++l) {
            pm_rec_layer_info_get(m->mem, l, &m->rli[l]);
            m->rs_stride += m->rli[l].row_bytes[0] + m->rli[l].row_bytes[1];
        }
    }
    return 0;
}

void vm_free(vm_mem *m) {
    pm_memory_free(m->mem);
    m->mem = NULL;
}

pm_status vm_store_kv(vm_mem *m, pm_mctx *ctx, uint32_t u, const uint32_t *idx, uint32_t n, const uint8_t *rows,
                      char *err, size_t cap) {
    uint8_t *kbuf = malloc(n * m->stride + 1), *vbuf = malloc(n * m->stride + 1);
    pm_status st = kbuf && vbuf ? PM_OK : PM_E_NOMEM;
    for (uint32_t p = 0; p < m->n_kv && st == PM_OK; ++p) {
        const vm_kv_part *P = &m->kv[p];
        uint64_t ko = P->base, vo = P->base;
        for (uint32_t q = 0; q < P->info.n_layer; ++q) {
            vo += P->kb[q];
        }
        for (uint32_t l = 0; l < P->info.n_layer && st == PM_OK; ++l) {
            for (uint32_t t = 0; t < n; ++t) {
                const uint8_t *row = rows + (uint64_t)idx[t] * m->stride;
                memcpy(kbuf + t * P->kb[l], row + ko, (size_t)P->kb[l]);
                memcpy(vbuf + t * P->vb[l], row + vo, (size_t)P->vb[l]);
            }
            st = pm_mctx_store(ctx, u, P->li[l].il, kbuf, n * P->kb[l], vbuf, n * P->vb[l], false);
            if (st != PM_OK) {
                vec_fail(err, cap, "pm_mctx_store(part %u, layer %u): %s", p, P->li[l].il, pm_last_error());
            }
            ko += P->kb[l];
            vo += P->vb[l];
        }
    }
    free(kbuf);
    free(vbuf);
    return st;
}

pm_status vm_store_rs(vm_mem *m, const pm_seq_id *seqs, uint32_t n, const uint8_t *rs, size_t len, bool rollback,
                      char *err, size_t cap) {
    if (!m->has_rec || len != m->rs_stride * n) {
        vec_fail(err, cap, "rs: %zu bytes for %u sequences, expected %llu each%s", len, n,
             (unsigned long long)m->rs_stride, m->has_rec ? "" : " (no recurrent part)");
        return PM_E_INVALID_ARG;
    }
    uint32_t size = m->rec.size;
    int32_t *tail = malloc(sizeof(int32_t) * size);
    uint32_t *plane = malloc(sizeof(uint32_t) * (m->n_seq_max + 1));
    pm_status st = tail && plane ? pm_rec_cells_get(m->mem, NULL, NULL, NULL, tail, NULL, plane) : PM_E_NOMEM;
    const uint8_t *src = rs;
    for (uint32_t i = 0; i < n && st == PM_OK; ++i) {
        pm_seq_id q = seqs[i];
        if (q < 0 || (uint32_t)q >= size || tail[q] < 0 || (rollback && plane[q] == 0)) {
            vec_fail(err, cap, "rs: sequence %d has no recurrent cell%s", q, rollback ? " with a pending rollback" : "");
            st = PM_E_INVALID_ARG;
            break;
        }
        uint64_t row = (uint64_t)(rollback ? plane[q] : 0) * size + (uint64_t)tail[q];
        for (uint32_t which = 0; which < 2 && st == PM_OK; ++which) {
            for (uint32_t l = 0; l < m->rec.n_layer && st == PM_OK; ++l) {
                uint64_t rb = m->rli[l].row_bytes[which], nb = 0;
                uint8_t *dst = NULL;
                if (rb == 0) {
                    continue;
                }
                st = pm_rec_tensor(m->mem, l, which, &dst, &nb);
                if (st == PM_OK && (row + 1) * rb <= nb) {
                    memcpy(dst + row * rb, src, (size_t)rb);
                } else if (st == PM_OK) {
                    st = PM_E_INVALID_ARG;
                }
                src += rb;
            }
        }
    }
    free(tail);
    free(plane);
    return st;
}

uint8_t *vm_snapshot(const vm_mem *m, size_t *n) {
    uint64_t ns = 0;
    pm_status sst = pm_mem_state_size(m->mem, -1, 0, PM_ENVELOPE_NONE, &ns);
    if (sst != PM_OK) {
        ns = 0; /* a whole write can fail (recurrent: differing rollback planes); the status is kept */
    }
    size_t total = ns + 8 + (size_t)m->n_seq_max * 8 + 1;
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        total += m->kv[p].info.n_stream * ((size_t)m->kv[p].info.size * 52 + 16);
    }
    if (m->has_rec) {
        total += (size_t)m->rec.size * 48 + (size_t)m->n_seq_max * 4 + 16;
    }
    uint8_t *b = calloc(1, total), *p = b;
    if (b == NULL) {
        return NULL;
    }
    memcpy(p, &sst, sizeof sst);
    p += 8;
    uint64_t w;
    if (ns > 0) {
        pm_mem_state_write(m->mem, -1, 0, PM_ENVELOPE_NONE, p, ns, &w);
        p += ns;
    }
    for (uint32_t q = 0; q < m->n_kv; ++q) {
        for (uint32_t s = 0; s < m->kv[q].info.n_stream; ++s) {
            uint32_t sz = m->kv[q].info.size;
            pm_kv_cells_get(m->mem, q, s, (pm_pos *)p, (int32_t *)(p + 4 * sz), (uint64_t *)(p + 8 * sz),
                            (int32_t *)(p + 40 * sz));
            p += 52 * (size_t)sz;
            bool hs = false;
            pm_kv_stream_get(m->mem, q, s, (uint32_t *)p, (uint32_t *)(p + 4), (uint32_t *)(p + 8), &hs);
            p[12] = hs;
            p += 16;
        }
    }
    if (m->has_rec) {
        uint32_t sz = m->rec.size;
        pm_rec_cells_get(m->mem, (pm_pos *)p, (int32_t *)(p + 4 * sz), (int32_t *)(p + 8 * sz),
                         (int32_t *)(p + 12 * sz), (uint64_t *)(p + 16 * sz), (uint32_t *)(p + 48 * sz));
        p += 48 * (size_t)sz + 4 * (size_t)m->n_seq_max;
        pm_rec_info ri;
        pm_rec_info_get(m->mem, &ri);
        memcpy(p, &ri.head, 4);
        memcpy(p + 4, &ri.n, 4);
        memcpy(p + 8, &ri.used, 4);
        memcpy(p + 12, &ri.rs_z, 4);
        p += 16;
    }
    for (uint32_t s = 0; s < m->n_seq_max; ++s) {
        pm_mem_seq_pos_min(m->mem, (pm_seq_id)s, (pm_pos *)p);
        pm_mem_seq_pos_max(m->mem, (pm_seq_id)s, (pm_pos *)(p + 4));
        p += 8;
    }
    *p++ = pm_mem_update_pending(m->mem);
    *n = (size_t)(p - b);
    return b;
}
