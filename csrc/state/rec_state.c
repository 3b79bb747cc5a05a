/* rec_state.c - the recurrent memory's state section (SPEC section 8.3): write, and restore as
 * parse (validates a copy of the cell records) / meta (cells) / data (rows).
 */
#include "state/rec_state.h"

#include <stdio.h>
#include <stdlib.h>

/* ---- state ---------------------------------------------------------------------------------------- */

pm_status pmi_rec_state_write(const pmi_rec *r, pmi_writer *w, pm_seq_id seq) {
    uint32_t rows[PM_MAX_SEQ], cells[PM_MAX_SEQ], cc = 0;
    for (uint32_t i = 0; i < r->size; ++i) {
        const pmi_rcell *c = &r->cells[i];
        if (!((seq == -1 && !rc_empty(c)) || rc_has(c, seq))) {
            continue;
        }
        uint32_t plane = 0;
        if (r->n_rs_seq != 0) {
            if (seq != -1) {
                if ((uint32_t)seq >= r->n_seq_max) {
                    return pmi_fail(PM_E_STATE, "seq %d has no rollback index", seq);
                }
                plane = r->rs_idx[seq];
            } else {
                bool have = false;
                for (pm_seq_id q = 0; q < PM_MAX_SEQ; ++q) {
                    if (!rc_has(c, q)) {
                        continue;
                    }
                    if ((uint32_t)q >= r->n_seq_max) {
                        return pmi_fail(PM_E_STATE, "seq %d has no rollback index", q);
                    }
                    if (!have) {
                        plane = r->rs_idx[q];
                        have = true;
                    } else if (plane != r->rs_idx[q]) {
                        return pmi_fail(PM_E_STATE,
                                        "cannot write shared recurrent state with different rollback indices");
                    }
                }
            }
        }
        cells[cc] = i;
        rows[cc] = plane * r->size + (c->src >= 0 ? (uint32_t)c->src : i);
        cc++;
    }
    pmi_w_u32(w, cc);
    for (uint32_t k = 0; k < cc; ++k) {
        const pmi_rcell *c = &r->cells[cells[k]];
        pmi_w_i32(w, c->pos);
        if (seq == -1) {
            pmi_w_u32(w, rc_count(c));
            for (pm_seq_id q = 0; q < PM_MAX_SEQ; ++q) {
                if (rc_has(c, q)) {
                    pmi_w_i32(w, q);
                }
            }
        } else {
            pmi_w_u32(w, 0);
        }
    }
    pmi_w_u32(w, 0); /* s_trans */
    pmi_w_u32(w, r->n_layer_model);
    for (int pass = 0; pass < 2; ++pass) {
        for (uint32_t l = 0; l < r->n_layer; ++l) {
            const pmi_rec_layer *L = &r->layers[l];
            for (int t = pass == 0 ? PMI_REC_R : PMI_REC_S; t < PMI_REC_NROW; t += 2) {
                /* pass 0: r (t = 0) then p (t = 2); pass 1: s (t = 1) */
                if (t == PMI_REC_P && !L->has_p) {
                    continue;
                }
                if (t == PMI_REC_P) {
                    pmi_w_u64(w, L->row[PMI_REC_P]);
                } else {
                    pmi_w_i32(w, t == PMI_REC_R ? r->type_r : r->type_s);
                    pmi_w_u64(w, L->row[t]);
                }
                uint8_t *dst = pmi_w_reserve(w, L->row[t] * cc);
                if (dst != NULL) {
                    for (uint32_t k = 0; k < cc; ++k) {
                        if (L->row[t]) {
                            memcpy(dst + k * L->row[t], L->data[t] + (uint64_t)rows[k] * L->row[t],
                                   (size_t)L->row[t]);
                        }
                    }
                }
                if (pass == 1) {
                    break;
                }
            }
        }
    }
    return PM_OK;
}

/* Parse and validate one REC section; fills plan (pointers into the reader's buffer). */
pm_status pmi_rec_state_parse(const pmi_rec *r, pmi_reader *rd, pm_seq_id seq, pmi_rec_plan *plan) {
    char what[80];
    memset(plan, 0, sizeof(*plan));
    plan->seq = seq;
    plan->rows = calloc((size_t)(r->n_layer ? r->n_layer : 1) * 3, sizeof(uint8_t *));
    if (plan->rows == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    if (seq != -1 && (uint32_t)seq >= r->size) {
        /* llama.cpp: seq_rm refuses, find_slot fails: the restore fails */
        return pmi_fail(PM_E_INVALID_ARG, "state_read: seq_id %d is not in [0, %u)", seq, r->size);
    }
    if (!pmi_r_u32(rd, &plan->cc, "recurrent cell_count")) {
        return PM_E_FORMAT;
    }
    if (plan->cc > r->size) {
        return pmi_fail(PM_E_FORMAT, "recurrent section: %u cells do not fit in %u (offset %llu)", plan->cc,
                        r->size, (unsigned long long)(rd->off - 4));
    }
    /* cell records are copied (plan->copy) and validated from the copy, which is all the
     * apply step reads */
    uint64_t seen[4] = {0, 0, 0, 0};
    for (uint32_t i = 0; i < plan->cc; ++i) {
        int32_t pos;
        uint32_t nid;
        const uint8_t *p;
        snprintf(what, sizeof what, "recurrent cell %u", i);
        if (rd->len - rd->off < 8) {
            if (!pmi_r_i32(rd, &pos, what) || !pmi_r_u32(rd, &nid, what)) {
                return PM_E_FORMAT;
            }
        }
        pm_status st = pmi_r_copy(rd, &plan->copy, 8, &p, what);
        if (st != PM_OK) {
            return st;
        }
        pos = pmi_rd_i32(p);
        nid = pmi_rd_u32(p + 4);
        if (seq != -1) {
            if (nid != 0) {
                return pmi_fail(PM_E_FORMAT, "%s: a sequence blob has n_seq_id 0, not %u (offset %llu)", what, nid,
                                (unsigned long long)(rd->off - 4));
            }
            plan->last_pos = pos;
            continue;
        }
        if ((uint64_t)nid * 4 > rd->len - rd->off) {
            return pmi_fail(PM_E_FORMAT, "truncated state: %s lists %u seq ids at offset %llu", what, nid,
                            (unsigned long long)rd->off);
        }
        uint64_t ids_at = rd->off;
        st = pmi_r_copy(rd, &plan->copy, 4ull * nid, &p, what);
        if (st != PM_OK) {
            return st;
        }
        for (uint32_t q = 0; q < nid; ++q) {
            int32_t id = pmi_rd_i32(p + 4ull * q);
            if (id < 0 || (uint32_t)id >= r->n_seq_max || (uint32_t)id >= r->size) {
                return pmi_fail(PM_E_FORMAT, "%s: seq id %d is out of range [0, %u) (offset %llu)", what, id,
                                PMI_MIN(r->n_seq_max, r->size), (unsigned long long)(ids_at + 4ull * q));
            }
            if ((seen[id >> 6] >> (id & 63)) & 1) {
                return pmi_fail(PM_E_FORMAT, "%s: duplicate tail for seq id %d (offset %llu)", what, id,
                                (unsigned long long)(ids_at + 4ull * q));
            }
            seen[id >> 6] |= 1ULL << (id & 63);
        }
    }
    plan->meta = plan->copy.buf;
    uint32_t s_trans, n_layer;
    if (!pmi_r_u32(rd, &s_trans, "recurrent s_trans") || !pmi_r_u32(rd, &n_layer, "recurrent n_layer")) {
        return PM_E_FORMAT;
    }
    if (n_layer != r->n_layer_model) {
        return pmi_fail(PM_E_FORMAT, "recurrent section: %u layers, the model has %u (offset %llu)", n_layer,
                        r->n_layer_model, (unsigned long long)(rd->off - 4));
    }
    if (s_trans != 0) {
        return pmi_fail(PM_E_FORMAT, "recurrent section: transposed s (s_trans %u) is not supported (offset %llu)",
                        s_trans, (unsigned long long)(rd->off - 8));
    }
    for (int pass = 0; pass < 2; ++pass) {
        for (uint32_t l = 0; l < r->n_layer; ++l) {
            const pmi_rec_layer *L = &r->layers[l];
            for (int t = pass == 0 ? PMI_REC_R : PMI_REC_S; t < PMI_REC_NROW; t += 2) {
                if (t == PMI_REC_P && !L->has_p) {
                    continue;
                }
                const char *nm = t == PMI_REC_R ? "r" : t == PMI_REC_S ? "s" : "p";
                snprintf(what, sizeof what, "recurrent layer %u %s", L->il, nm);
                if (t != 2) {
                    int32_t type;
                    if (!pmi_r_i32(rd, &type, what)) {
                        return PM_E_FORMAT;
                    }
                    int32_t want = t == PMI_REC_R ? r->type_r : r->type_s;
                    if (type != want) {
                        return pmi_fail(PM_E_FORMAT, "%s: type %d, this memory has %d (offset %llu)", what, type,
                                        want, (unsigned long long)(rd->off - 4));
                    }
                }
                uint64_t row;
                if (!pmi_r_u64(rd, &row, what)) {
                    return PM_E_FORMAT;
                }
                if (row != L->row[t]) {
                    return pmi_fail(PM_E_FORMAT, "%s: row size %llu, this memory has %llu (offset %llu)", what,
                                    (unsigned long long)row, (unsigned long long)L->row[t],
                                    (unsigned long long)(rd->off - 8));
                }
                if (!pmi_r_span(rd, row * plan->cc, &plan->rows[l * PMI_REC_NROW + t], what)) {
                    return PM_E_FORMAT;
                }
                if (pass == 1) {
                    break;
                }
            }
        }
    }
    return PM_OK;
}

pm_status pmi_rec_state_meta(pmi_rec *r, pmi_rec_plan *plan) {
    if (plan->seq != -1) {
        pmi_rec_seq_rm(r, plan->seq, -1, -1);
        if (plan->cc == 0) {
            return PM_OK;
        }
        pmi_ubatch ub;
        pm_status st = pmi_ubatch_reserve(&ub, plan->cc, 1, plan->seq);
        if (st != PM_OK) {
            return st;
        }
        const uint8_t *p = plan->meta;
        for (uint32_t i = 0; i < plan->cc; ++i) {
            ub.pos[i] = pmi_rd_i32(p);
            p += 8;
        }
        /* ubatch_reserve's single sequence set of cc tokens: only token 0 carries the id */
        st = pmi_rec_find_slot(r, &ub);
        pmi_ubatch_free(&ub);
        if (st != PM_OK) {
            return pmi_fail_ctx(st, "restoring seq %d", plan->seq);
        }
        if (r->head + plan->cc > r->size) {
            return pmi_fail(PM_E_NO_SLOT, "restored recurrent cells do not fit");
        }
    } else {
        pmi_rec_clear(r, false);
        const uint8_t *p = plan->meta;
        for (uint32_t i = 0; i < plan->cc; ++i) {
            pmi_rcell *c = &r->cells[i];
            c->pos = pmi_rd_i32(p);
            uint32_t nid = pmi_rd_u32(p + 4);
            p += 8;
            for (uint32_t q = 0; q < nid; ++q) {
                pm_seq_id id = pmi_rd_i32(p);
                p += 4;
                rc_set(c, id);
                r->cells[id].tail = (int32_t)i;
            }
        }
        r->head = 0;
        r->used = plan->cc;
    }
    for (uint32_t i = 0; i < plan->cc; ++i) {
        r->cells[r->head + i].src = (int32_t)(r->head + i);
    }
    plan->head = r->head;
    return PM_OK;
}

void pmi_rec_state_data(pmi_rec *r, const pmi_rec_plan *plan) {
    if (plan->seq == -1) {
        for (uint32_t l = 0; l < r->n_layer; ++l) {
            for (int t = 0; t < PMI_REC_NROW; ++t) {
                if (r->layers[l].data[t]) {
                    memset(r->layers[l].data[t], 0, (size_t)(r->layers[l].row[t] * r->n_rows));
                }
            }
        }
    }
    for (uint32_t l = 0; l < r->n_layer; ++l) {
        for (int t = 0; t < PMI_REC_NROW; ++t) {
            const pmi_rec_layer *L = &r->layers[l];
            if (L->data[t] && plan->cc && L->row[t]) {
                memcpy(L->data[t] + (uint64_t)plan->head * L->row[t], plan->rows[l * PMI_REC_NROW + t],
                       (size_t)(L->row[t] * plan->cc));
            }
        }
    }
    if (r->n_rs_seq != 0) {
        if (plan->seq == -1) {
            memset(r->rs_idx, 0, sizeof(uint32_t) * r->n_seq_max);
        } else if ((uint32_t)plan->seq < r->n_seq_max) {
            r->rs_idx[plan->seq] = 0;
        }
    }
}

void pmi_rec_plan_free(pmi_rec_plan *plan) {
    free((void *)plan->rows);
    plan->rows = NULL;
    pmi_copy_free(&plan->copy);
}
