/* inspect.c - read-only views of a memory's parts: KV and recurrent parameters, layers,
 * cells, stream heads, and pointers to the tensors (numpy views on the Python side).
 */
#include "memory/memory.h"

#include <stdio.h>
#include <stdlib.h>

/* ==========================================================================================
 * KV inspection
 * ======================================================================================== */

static pm_status get_part(const pm_memory *m, uint32_t part, pmi_kv **out) {
    PMI_CHECK_MEM(m);
    *out = part < m->n_kv ? m->kv[part] : NULL;
    if (*out == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "this memory has no KV part %u", part);
    }
    return PM_OK;
}

pm_status pm_kv_info_get(const pm_memory *m, uint32_t part, pm_kv_info *out) {
    pmi_kv *kv;
    pm_status st = get_part(m, part, &kv);
    if (st != PM_OK) {
        return st;
    }
    memset(out, 0, sizeof(*out));
    out->size = kv->size;
    out->n_stream = kv->n_stream;
    out->n_seq_max = kv->n_seq_max;
    out->n_layer = kv->n_layer;
    out->n_layer_model = kv->n_layer_model;
    out->type_k = kv->type_k;
    out->type_v = kv->type_v;
    out->v_trans = kv->v_trans;
    out->n_swa = kv->n_swa;
    out->swa_type = kv->swa_type;
    out->n_pos_per_embd = kv->n_pos_per_embd;
    out->cell_ext = kv->cell_ext;
    out->n_embd_v_gqa_max = kv->n_embd_v_gqa_max;
    out->k_rot = kv->k_rot;
    out->v_rot = kv->v_rot;
    out->format = kv->format;
    return PM_OK;
}

pm_status pm_kv_layer_info_get(const pm_memory *m, uint32_t part, uint32_t layer, pm_kv_layer_info *out) {
    pmi_kv *kv;
    pm_status st = get_part(m, part, &kv);
    if (st != PM_OK) {
        return st;
    }
    if (layer >= kv->n_layer) {
        return pmi_fail(PM_E_INVALID_ARG, "layer index %u of %u", layer, kv->n_layer);
    }
    const pmi_kv_layer *L = &kv->layers[layer];
    out->il = L->p.il;
    out->n_embd_k_gqa = L->n_embd_k_gqa;
    out->n_embd_v_gqa = L->n_embd_v_gqa;
    out->k_row_bytes = L->k_row;
    out->v_row_bytes = L->v_row;
    out->k_stream_bytes = L->k_stream;
    out->v_stream_bytes = L->v_stream;
    return PM_OK;
}

pm_status pm_kv_tensor(pm_memory *m, uint32_t part, uint32_t layer, uint32_t stream, uint32_t which,
                       uint8_t **ptr, uint64_t *nbytes) {
    pmi_kv *kv;
    pm_status st = get_part(m, part, &kv);
    if (st != PM_OK) {
        return st;
    }
    if (layer >= kv->n_layer || stream >= kv->n_stream || which > PMI_KV_V) {
        return pmi_fail(PM_E_INVALID_ARG, "layer %u / stream %u / tensor %u out of range", layer, stream,
                        which);
    }
    const pmi_kv_layer *L = &kv->layers[layer];
    if (which == PMI_KV_V && L->v == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "layer %u has no V tensor", L->p.il);
    }
    uint64_t sb = which == PMI_KV_V ? L->v_stream : L->k_stream;
    *ptr = (which == PMI_KV_V ? L->v : L->k) + stream * sb;
    *nbytes = sb;
    return PM_OK;
}

pm_status pm_kv_cells_get(const pm_memory *m, uint32_t part, uint32_t stream, pm_pos *pos,
                          int32_t *shift, uint64_t *seq_bits, int32_t *ext) {
    pmi_kv *kv;
    pm_status st = get_part(m, part, &kv);
    if (st != PM_OK) {
        return st;
    }
    if (stream >= kv->n_stream) {
        return pmi_fail(PM_E_INVALID_ARG, "stream %u of %u", stream, kv->n_stream);
    }
    const pmi_cells *c = &kv->cells[stream];
    if (pos) {
        memcpy(pos, c->pos, sizeof(pm_pos) * c->size);
    }
    if (shift) {
        memcpy(shift, c->shift, sizeof(int32_t) * c->size);
    }
    if (seq_bits) {
        memcpy(seq_bits, c->seq, sizeof(uint64_t) * PMI_SEQ_WORDS * c->size);
    }
    if (ext) {
        memcpy(ext, c->ext, sizeof(pmi_ext) * c->size);
    }
    return PM_OK;
}

pm_status pm_kv_stream_get(const pm_memory *m, uint32_t part, uint32_t stream, uint32_t *head,
                           uint32_t *used, uint32_t *used_max_p1, bool *has_shift) {
    pmi_kv *kv;
    pm_status st = get_part(m, part, &kv);
    if (st != PM_OK) {
        return st;
    }
    if (stream >= kv->n_stream) {
        return pmi_fail(PM_E_INVALID_ARG, "stream %u of %u", stream, kv->n_stream);
    }
    const pmi_cells *c = &kv->cells[stream];
    if (head) {
        *head = kv->head[stream];
    }
    if (used) {
        *used = c->used;
    }
    if (used_max_p1) {
        *used_max_p1 = pmi_cells_used_max_p1(c);
    }
    if (has_shift) {
        *has_shift = c->has_shift;
    }
    return PM_OK;
}

/* ==========================================================================================
 * Recurrent inspection and state rows
 * ======================================================================================== */

static pm_status get_rec(const pm_memory *m, pmi_rec **out) {
    PMI_CHECK_MEM(m);
    *out = m->rec;
    if (*out == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "this memory has no recurrent part");
    }
    return PM_OK;
}

pm_status pm_rec_info_get(const pm_memory *m, pm_rec_info *out) {
    pmi_rec *r;
    pm_status st = get_rec(m, &r);
    if (st != PM_OK) {
        return st;
    }
    memset(out, 0, sizeof(*out));
    out->size = r->size;
    out->n_seq_max = r->n_seq_max;
    out->n_rs_seq = r->n_rs_seq;
    out->n_layer = r->n_layer;
    out->n_layer_model = r->n_layer_model;
    out->type_r = r->type_r;
    out->type_s = r->type_s;
    out->head = r->head;
    out->n = r->n;
    out->used = r->used;
    out->rs_z = r->rs_z;
    return PM_OK;
}

pm_status pm_rec_layer_info_get(const pm_memory *m, uint32_t layer, pm_rec_layer_info *out) {
    pmi_rec *r;
    pm_status st = get_rec(m, &r);
    if (st != PM_OK) {
        return st;
    }
    if (layer >= r->n_layer) {
        return pmi_fail(PM_E_INVALID_ARG, "recurrent layer index %u of %u", layer, r->n_layer);
    }
    out->il = r->layers[layer].il;
    for (int t = 0; t < PMI_REC_NROW; ++t) {
        out->row_bytes[t] = r->layers[layer].row[t];
    }
    out->n_rows = r->n_rows;
    return PM_OK;
}

pm_status pm_rec_cells_get(const pm_memory *m, pm_pos *pos, int32_t *src, int32_t *src0, int32_t *tail,
                           uint64_t *seq_bits, uint32_t *rs_idx) {
    pmi_rec *r;
    pm_status st = get_rec(m, &r);
    if (st != PM_OK) {
        return st;
    }
    for (uint32_t i = 0; i < r->size; ++i) {
        const pmi_rcell *c = &r->cells[i];
        if (pos) {
            pos[i] = c->pos;
        }
        if (src) {
            src[i] = c->src;
        }
        if (src0) {
            src0[i] = c->src0;
        }
        if (tail) {
            tail[i] = c->tail;
        }
        if (seq_bits) {
            memcpy(seq_bits + 4 * (size_t)i, c->seq, sizeof(c->seq));
        }
    }
    if (rs_idx) {
        memcpy(rs_idx, r->rs_idx, sizeof(uint32_t) * r->n_seq_max);
    }
    return PM_OK;
}

pm_status pm_rec_tensor(pm_memory *m, uint32_t layer, uint32_t which, uint8_t **ptr, uint64_t *nbytes) {
    pmi_rec *r;
    pm_status st = get_rec(m, &r);
    if (st != PM_OK) {
        return st;
    }
    if (layer >= r->n_layer || which >= PMI_REC_NROW) {
        return pmi_fail(PM_E_INVALID_ARG, "recurrent layer %u / tensor %u out of range", layer, which);
    }
    const pmi_rec_layer *L = &r->layers[layer];
    if (L->data[which] == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "layer %u has no %c rows", L->il, "rsp"[which]);
    }
    *ptr = L->data[which];
    *nbytes = L->row[which] * r->n_rows;
    return PM_OK;
}
