/* recurrent.c - llama.cpp's recurrent memory (Mamba / RWKV / short-conv state; SPEC section 6).
 *
 * One cell per sequence slot holds the whole state of the sequences sharing it.  Cells have
 * pos, src, src0, a tail pointer (indexed by sequence id) and a sequence set.  Every recurrent
 * layer has r and s rows (and optionally a PLE p row) for size * (1 + n_rs_seq) rows: plane 0
 * is the current state, planes 1..n_rs_seq the rollback snapshots.
 *
 * Applying a ubatch does what llama.cpp's memory and graph inputs do to the rows: find_slot,
 * then zero the rs_z row and gather every cell of the range from its staged source
 * (s_copy, which consumes pending rollbacks).  The model's new states are stored by the
 * caller (pm_mctx_store_rs).  The state section is in state/rec_state.c.
 */
#include "memory/recurrent.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

static void norm_range(pm_pos *p0, pm_pos *p1) {
    if (*p0 < 0) {
        *p0 = 0;
    }
    if (*p1 < 0) {
        *p1 = INT32_MAX;
    }
}

/* ---- construction ------------------------------------------------------------------------ */

static pm_status rec_create(const pm_rec_params *p, pmi_rec **out) {
    *out = NULL;
    if (p == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "params is NULL");
    }
    if (p->n_seq_max == 0 || p->n_seq_max > PM_MAX_SEQ) {
        return pmi_fail(PM_E_INVALID_ARG, "n_seq_max %u must be in [1, %d]", p->n_seq_max, PM_MAX_SEQ);
    }
    if (p->size == 0 || p->size > PM_MAX_SEQ) {
        return pmi_fail(PM_E_INVALID_ARG, "recurrent size %u must be in [1, %d]", p->size, PM_MAX_SEQ);
    }
    if (p->n_rs_seq > 64) {
        return pmi_fail(PM_E_INVALID_ARG, "n_rs_seq %u is too large", p->n_rs_seq);
    }
    if (!pmi_type_known(p->type_r) || !pmi_type_known(p->type_s)) {
        return pmi_fail(PM_E_UNSUPPORTED, "unsupported state type (r %d, s %d)", p->type_r, p->type_s);
    }
    if (p->n_layer > p->n_layer_model || (p->n_layer > 0 && p->layers == NULL)) {
        return pmi_fail(PM_E_INVALID_ARG, "n_layer %u with n_layer_model %u", p->n_layer, p->n_layer_model);
    }
    for (uint32_t l = 0; l < p->n_layer; ++l) {
        const pm_rec_layer *L = &p->layers[l];
        if (L->il >= p->n_layer_model || (l > 0 && L->il <= p->layers[l - 1].il)) {
            return pmi_fail(PM_E_INVALID_ARG, "recurrent layers must be ascending model layer ids < %u",
                            p->n_layer_model);
        }
        if (L->n_embd_r % pm_type_block_size(p->type_r) || L->n_embd_s % pm_type_block_size(p->type_s) ||
            L->n_embd_p % pm_type_block_size(p->type_r)) {
            return pmi_fail(PM_E_INVALID_ARG, "layer %u: state widths are not multiples of the type's block",
                            L->il);
        }
    }
    pmi_rec *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    r->size = p->size;
    r->n_seq_max = p->n_seq_max;
    r->n_rs_seq = p->n_rs_seq;
    r->n_layer_model = p->n_layer_model;
    r->n_layer = p->n_layer;
    r->type_r = p->type_r;
    r->type_s = p->type_s;
    r->rs_z = -1;
    r->n_rows = p->size * (1 + p->n_rs_seq);
    r->cells = calloc(r->size, sizeof(pmi_rcell));
    r->tx_cells = calloc(r->size, sizeof(pmi_rcell));
    r->rs_idx = calloc(r->n_seq_max, sizeof(uint32_t));
    r->tx_rs_idx = calloc(r->n_seq_max, sizeof(uint32_t));
    r->layers = calloc(r->n_layer ? r->n_layer : 1, sizeof(pmi_rec_layer));
    if (!r->cells || !r->tx_cells || !r->rs_idx || !r->tx_rs_idx || !r->layers) {
        pmi_rec_destroy(r);
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    for (uint32_t i = 0; i < r->size; ++i) {
        r->cells[i].pos = -1;
        r->cells[i].src = -1;
        r->cells[i].src0 = -1;
        r->cells[i].tail = -1;
    }
    for (uint32_t l = 0; l < r->n_layer; ++l) {
        pmi_rec_layer *L = &r->layers[l];
        L->il = p->layers[l].il;
        L->row[PMI_REC_R] = pmi_row_size(r->type_r, p->layers[l].n_embd_r);
        L->row[PMI_REC_S] = pmi_row_size(r->type_s, p->layers[l].n_embd_s);
        L->row[PMI_REC_P] = p->layers[l].n_embd_p ? pmi_row_size(r->type_r, p->layers[l].n_embd_p) : 0;
        L->has_p = p->layers[l].n_embd_p > 0;
        for (int t = 0; t < PMI_REC_NROW; ++t) {
            if (t == PMI_REC_P && !L->has_p) {
                continue;
            }
            uint64_t nb = L->row[t] * r->n_rows;
            if (nb > 0) {
                L->data[t] = pmi_aligned_calloc(nb);
                if (L->data[t] == NULL) {
                    uint32_t il = L->il; /* r (and L with it) is freed first */
                    pmi_rec_destroy(r);
                    return pmi_fail(PM_E_NOMEM, "out of memory for recurrent layer %u (%llu bytes)", il,
                                    (unsigned long long)nb);
                }
            }
        }
    }
    *out = r;
    return PM_OK;
}

void pmi_rec_destroy(pmi_rec *r) {
    if (r == NULL) {
        return;
    }
    if (r->layers) {
        for (uint32_t l = 0; l < r->n_layer; ++l) {
            for (int t = 0; t < PMI_REC_NROW; ++t) {
                pmi_aligned_free(r->layers[l].data[t]);
            }
        }
    }
    free(r->layers);
    free(r->cells);
    free(r->tx_cells);
    free(r->rs_idx);
    free(r->tx_rs_idx);
    free(r);
}

uint64_t pmi_rec_nbytes(const pmi_rec *r) {
    uint64_t n = sizeof(*r) + (uint64_t)r->size * 2 * sizeof(pmi_rcell) + (uint64_t)r->n_seq_max * 8;
    for (uint32_t l = 0; l < r->n_layer; ++l) {
        n += (r->layers[l].row[PMI_REC_R] + r->layers[l].row[PMI_REC_S] + r->layers[l].row[PMI_REC_P]) * r->n_rows;
    }
    return n;
}

/* ---- transactions: the metadata is tiny, so snapshot it whole ----------------------------- */

void pmi_rec_tx_begin(pmi_rec *r) {
    memcpy(r->tx_cells, r->cells, sizeof(pmi_rcell) * r->size);
    memcpy(r->tx_rs_idx, r->rs_idx, sizeof(uint32_t) * r->n_seq_max);
    r->tx_head = r->head;
    r->tx_n = r->n;
    r->tx_used = r->used;
    r->tx_rs_z = r->rs_z;
}

void pmi_rec_tx_rollback(pmi_rec *r) {
    memcpy(r->cells, r->tx_cells, sizeof(pmi_rcell) * r->size);
    memcpy(r->rs_idx, r->tx_rs_idx, sizeof(uint32_t) * r->n_seq_max);
    r->head = r->tx_head;
    r->n = r->tx_n;
    r->used = r->tx_used;
    r->rs_z = r->tx_rs_z;
}

/* ---- operations ------------------------------------------------------------------------------ */

void pmi_rec_clear(pmi_rec *r, bool data) {
    for (uint32_t i = 0; i < r->size; ++i) {
        r->cells[i].pos = -1;
        memset(r->cells[i].seq, 0, sizeof(r->cells[i].seq));
        r->cells[i].src = -1;
        r->cells[i].tail = -1;
    }
    r->head = 0;
    r->used = 0;
    if (data) {
        for (uint32_t l = 0; l < r->n_layer; ++l) {
            for (int t = 0; t < PMI_REC_NROW; ++t) {
                if (r->layers[l].data[t]) {
                    memset(r->layers[l].data[t], 0, (size_t)(r->layers[l].row[t] * r->n_rows));
                }
            }
        }
    }
    memset(r->rs_idx, 0, sizeof(uint32_t) * r->n_seq_max);
}

/* frees cell c if it has no sequence left */
static void drop_if_empty(pmi_rec *r, pmi_rcell *c) {
    if (rc_empty(c)) {
        c->pos = -1;
        c->src = -1;
        r->used -= 1;
    }
}

bool pmi_rec_seq_rm(pmi_rec *r, pm_seq_id s, pm_pos p0, pm_pos p1) {
    uint32_t new_head = r->size;
    norm_range(&p0, &p1);
    if ((uint32_t)s >= r->n_seq_max) {
        return false;
    }
    bool rm_all = p0 == 0 && p1 == INT32_MAX;
    if (rm_all) {
        r->rs_idx[s] = 0;
    }
    if ((uint32_t)s >= r->size) {
        return false;
    }
    int32_t *tail = &r->cells[s].tail;
    if (*tail >= 0) {
        pmi_rcell *c = &r->cells[*tail];
        if (0 < p0 && p0 <= c->pos && p1 > c->pos) {
            int64_t rollback = (int64_t)c->pos - (p0 - 1);
            bool pending = r->rs_idx[s] != 0;
            /* b11739 (not in 0c1e570): a state shared with other sequences is never rolled back */
            bool shared = rc_count(c) > 1;
            if (!pending && !shared && rollback >= 1 && rollback <= (int64_t)r->n_rs_seq) {
                r->rs_idx[s] = (uint32_t)rollback;
                c->pos = p0 - 1;
                return true;
            }
            return false;
        }
        if (p0 <= c->pos && c->pos < p1) {
            *tail = -1;
        }
    }
    for (uint32_t i = 0; i < r->size; ++i) {
        pmi_rcell *c = &r->cells[i];
        if (c->pos >= p0 && c->pos < p1 && rc_has(c, s)) {
            rc_clr(c, s);
            if (rc_empty(c)) {
                if (c->pos >= 0) {
                    r->used--;
                }
                c->pos = -1;
                c->src = -1;
                if (new_head == r->size) {
                    new_head = i;
                }
            }
        }
    }
    if (new_head != r->size && new_head < r->head) {
        r->head = new_head;
    }
    return true;
}

void pmi_rec_seq_cp(pmi_rec *r, pm_seq_id a, pm_seq_id b) {
    if (a == b) {
        return;
    }
    if ((uint32_t)b < r->size && (uint32_t)a < r->size) {
        pmi_rcell *ta = &r->cells[a], *tb = &r->cells[b];
        if (tb->tail >= 0) {
            pmi_rcell *d = &r->cells[tb->tail];
            rc_clr(d, b);
            tb->tail = -1;
            if (rc_empty(d)) {
                d->pos = -1;
                d->src = -1;
                r->used -= 1;
            }
        }
        if (ta->tail >= 0) {
            rc_set(&r->cells[ta->tail], b);
            tb->tail = ta->tail;
        }
    }
}

void pmi_rec_seq_keep(pmi_rec *r, pm_seq_id s) {
    uint32_t new_head = r->size;
    for (uint32_t i = 0; i < r->size; ++i) {
        pmi_rcell *c = &r->cells[i];
        if ((pm_seq_id)i != s) {
            c->tail = -1;
        }
        if (!rc_has(c, s)) {
            if (c->pos >= 0) {
                r->used--;
            }
            c->pos = -1;
            c->src = -1;
            memset(c->seq, 0, sizeof(c->seq));
            if (new_head == r->size) {
                new_head = i;
            }
        } else {
            memset(c->seq, 0, sizeof(c->seq));
            rc_set(c, s);
        }
    }
    if (new_head != r->size && new_head < r->head) {
        r->head = new_head;
    }
}

/* the tail cell of s if seq_add/seq_div apply to it, else NULL */
static pmi_rcell *tail_in_range(pmi_rec *r, pm_seq_id s, pm_pos p0, pm_pos p1) {
    if (s < 0 || (uint32_t)s >= r->size) {
        return NULL;
    }
    int32_t t = r->cells[s].tail;
    if (t < 0) {
        return NULL;
    }
    pmi_rcell *c = &r->cells[t];
    return rc_has(c, s) && p0 <= c->pos && c->pos < p1 ? c : NULL;
}

pm_status pmi_rec_seq_add(pmi_rec *r, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d, bool check_only) {
    if (d == 0) {
        return PM_OK;
    }
    norm_range(&p0, &p1);
    if (p0 == p1) {
        return PM_OK;
    }
    pmi_rcell *c = tail_in_range(r, s, p0, p1);
    if (c == NULL) {
        return PM_OK;
    }
    int64_t np = (int64_t)c->pos + d;
    if (np > INT32_MAX || np < INT32_MIN) {
        return pmi_fail(PM_E_INVALID_ARG, "seq_add: position %d + %d overflows int32", c->pos, d);
    }
    if (!check_only) {
        c->pos = (pm_pos)np;
    }
    return PM_OK;
}

pm_status pmi_rec_seq_div(pmi_rec *r, pm_seq_id s, pm_pos p0, pm_pos p1, int32_t d, bool check_only) {
    if (d == 1) {
        return PM_OK;
    }
    if (d <= 0) {
        return pmi_fail(PM_E_INVALID_ARG, "seq_div: divisor %d must be >= 1", d);
    }
    norm_range(&p0, &p1);
    if (p0 == p1) {
        return PM_OK;
    }
    pmi_rcell *c = tail_in_range(r, s, p0, p1);
    if (c != NULL && !check_only) {
        c->pos /= d;
    }
    return PM_OK;
}

pm_pos pmi_rec_seq_pos_min(const pmi_rec *r, pm_seq_id s) {
    pm_pos res = INT32_MAX;
    for (uint32_t i = 0; i < r->size; ++i) {
        if (rc_has(&r->cells[i], s) && r->cells[i].pos < res) {
            res = r->cells[i].pos;
        }
    }
    return res == INT32_MAX ? -1 : res;
}

pm_pos pmi_rec_seq_pos_max(const pmi_rec *r, pm_seq_id s) {
    pm_pos res = -1;
    for (uint32_t i = 0; i < r->size; ++i) {
        if (rc_has(&r->cells[i], s) && r->cells[i].pos > res) {
            res = r->cells[i].pos;
        }
    }
    return res;
}

/* ---- slot search ------------------------------------------------------------------------------- */

pm_status pmi_rec_find_slot(pmi_rec *r, const pmi_ubatch *ub) {
    const uint32_t nst = ub->n_seq_tokens, n_seqs = ub->n_seqs;
    if (r->head > r->used + 2 * n_seqs) {
        r->head = 0;
    }
    if (!ub->equal_seqs || n_seqs == 0 || nst == 0) {
        return pmi_fail(PM_E_INVALID_ARG, "recurrent memory needs an equal-split ubatch");
    }
    int32_t min = (int32_t)r->size - 1, max = 0;
    for (uint32_t s = 0; s < n_seqs; ++s) {
        uint32_t i = s * nst;
        for (uint32_t k = ub->seq_off[i]; k < ub->seq_off[i + 1]; ++k) {
            pm_seq_id q = ub->seq_id[k];
            if (q < 0 || (uint32_t)q >= r->size) {
                return pmi_fail(PM_E_NO_SLOT, "seq_id %d >= recurrent size %u", q, r->size);
            }
            if (k > ub->seq_off[i]) {
                pmi_rcell *seq = &r->cells[q];
                if (seq->tail >= 0) {
                    pmi_rcell *c = &r->cells[seq->tail];
                    rc_clr(c, q);
                    seq->tail = -1;
                    drop_if_empty(r, c);
                }
            }
        }
    }
    uint32_t next_empty = r->head;
    for (uint32_t i = 0; i < r->size; ++i) {
        if (next_empty >= r->size) {
            next_empty -= r->size;
        }
        if (rc_empty(&r->cells[next_empty])) {
            break;
        }
        next_empty += 1;
    }
    for (uint32_t s = 0; s < n_seqs; ++s) {
        pm_seq_id q = pmi_ub_primary(ub, s * nst);
        pmi_rcell *meta = &r->cells[q];
        bool has_cell = false;
        if (meta->tail >= 0) {
            pmi_rcell *c = &r->cells[meta->tail];
            if (!rc_has(c, q)) {
                return pmi_fail(PM_E_STATE, "recurrent tail of seq %d does not hold it", q);
            }
            has_cell = rc_count(c) == 1;
        }
        if (!has_cell) {
            if (next_empty >= r->size || !rc_empty(&r->cells[next_empty])) {
                return pmi_fail(PM_E_NO_SLOT, "no free recurrent cell for seq %d", q);
            }
            pmi_rcell *e = &r->cells[next_empty];
            if (meta->tail >= 0) {
                pmi_rcell *o = &r->cells[meta->tail];
                e->pos = o->pos;
                e->src = o->src;
                rc_clr(o, q);
                rc_set(e, q);
            }
            meta->tail = (int32_t)next_empty;
            if (s + 1 < n_seqs) {
                for (uint32_t j = 0; j < r->size; ++j) {
                    next_empty += 1;
                    if (next_empty >= r->size) {
                        next_empty -= r->size;
                    }
                    if (rc_empty(&r->cells[next_empty])) {
                        break;
                    }
                }
            }
        }
        if (min > meta->tail) {
            min = meta->tail;
        }
        if (max < meta->tail) {
            max = meta->tail;
        }
    }
    for (uint32_t s = 0; s < n_seqs; ++s) {
        int32_t dst = (int32_t)s + min;
        int32_t src = r->cells[pmi_ub_primary(ub, s * nst)].tail;
        if (dst >= (int32_t)r->size) {
            return pmi_fail(PM_E_NO_SLOT, "recurrent cells %d..%d do not fit", min, min + (int32_t)n_seqs - 1);
        }
        if (dst != src) {
            pmi_rcell *a = &r->cells[dst], *b = &r->cells[src];
            pm_pos tp = a->pos;
            int32_t ts = a->src;
            uint64_t tq[4];
            a->pos = b->pos;
            b->pos = tp;
            a->src = b->src;
            b->src = ts;
            memcpy(tq, a->seq, sizeof(tq));
            memcpy(a->seq, b->seq, sizeof(tq));
            memcpy(b->seq, tq, sizeof(tq));
            for (uint32_t j = 0; j < r->size; ++j) {
                if (r->cells[j].tail == src) {
                    r->cells[j].tail = dst;
                } else if (r->cells[j].tail == dst) {
                    r->cells[j].tail = src;
                }
            }
        }
    }
    for (uint32_t s = 0; s < n_seqs; ++s) {
        uint32_t i = s * nst;
        pmi_rcell *c = &r->cells[(int32_t)s + min];
        c->pos = ub->pos[i + nst - 1];
        memset(c->seq, 0, sizeof(c->seq));
        for (uint32_t k = ub->seq_off[i]; k < ub->seq_off[i + 1]; ++k) {
            rc_set(c, ub->seq_id[k]);
            r->cells[ub->seq_id[k]].tail = (int32_t)s + min;
        }
    }
    {
        uint32_t refcount[PM_MAX_SEQ];
        memset(refcount, 0, sizeof(refcount));
        for (uint32_t i = 0; i < r->size; ++i) {
            if (r->cells[i].src >= 0 && (uint32_t)r->cells[i].src < r->size) {
                refcount[r->cells[i].src] += 1;
            }
        }
        r->rs_z = -1;
        for (int32_t i = min; i <= max; ++i) {
            if (refcount[i] == 0) {
                r->rs_z = i;
                break;
            }
        }
        for (int32_t i = min; i <= max; ++i) {
            if (r->cells[i].src < 0) {
                if (r->rs_z < 0) {
                    return pmi_fail(PM_E_STATE, "no zero state available for a new recurrent sequence");
                }
                r->cells[i].src0 = r->rs_z;
            } else {
                r->cells[i].src0 = r->cells[i].src;
            }
            r->cells[i].src = i;
        }
    }
    r->head = (uint32_t)min;
    r->n = (uint32_t)(max - min + 1);
    uint32_t used = 0;
    for (uint32_t i = 0; i < r->size; ++i) {
        used += !rc_empty(&r->cells[i]);
    }
    r->used = used;
    if (r->n < n_seqs) {
        return pmi_fail(PM_E_NO_SLOT, "recurrent slot range %u < %u sequences", r->n, n_seqs);
    }
    return PM_OK;
}

pm_status pmi_rec_prepare(pmi_rec *r, const pmi_ubatch *ubs, uint32_t n) {
    pmi_rec_tx_begin(r);
    int32_t rs_z = r->rs_z;
    uint32_t nn = r->n;
    pm_status st = PM_OK;
    for (uint32_t u = 0; u < n && st == PM_OK; ++u) {
        st = pmi_rec_find_slot(r, &ubs[u]);
    }
    /* llama.cpp restores cells, used and head; rs_z and n keep the dry run's values on success */
    int32_t rs_z_after = r->rs_z;
    uint32_t n_after = r->n;
    pmi_rec_tx_rollback(r);
    if (st == PM_OK) {
        r->rs_z = rs_z_after;
        r->n = n_after;
    } else {
        r->rs_z = rs_z;
        r->n = nn;
    }
    return st;
}

/* The row gather of llama.cpp's graph for the ubatch just placed: zero row rs_z, then every
 * cell of [head, head + n) takes the row of its staged source (consuming rollbacks). */
void pmi_rec_move_states(pmi_rec *r, uint8_t *tmp) {
    int32_t src[PM_MAX_SEQ];
    for (uint32_t i = 0; i < r->n; ++i) {
        const pmi_rcell *c = &r->cells[r->head + i];
        uint32_t idx = 0;
        if (r->n_rs_seq > 0 && !rc_empty(c)) {
            pm_seq_id q = rc_first(c);
            if (q >= 0 && (uint32_t)q < r->n_seq_max) {
                idx = r->rs_idx[q];
                r->rs_idx[q] = 0;
            }
        }
        src[i] = (int32_t)(idx * r->size) + c->src0;
    }
    for (uint32_t l = 0; l < r->n_layer; ++l) {
        pmi_rec_layer *L = &r->layers[l];
        for (int t = 0; t < PMI_REC_NROW; ++t) {
            uint8_t *d = L->data[t];
            uint64_t row = L->row[t];
            if (d == NULL || row == 0) {
                continue;
            }
            if (r->rs_z >= 0) {
                memset(d + (uint64_t)r->rs_z * row, 0, (size_t)row);
            }
            for (uint32_t i = 0; i < r->n; ++i) {
                if (src[i] >= 0 && (uint32_t)src[i] < r->n_rows) {
                    memcpy(tmp + i * row, d + (uint64_t)src[i] * row, (size_t)row);
                } else {
                    memset(tmp + i * row, 0, (size_t)row);
                }
            }
            memcpy(d + (uint64_t)r->head * row, tmp, (size_t)(row * r->n));
        }
    }
}

uint64_t pmi_rec_max_row(const pmi_rec *r) {
    uint64_t m = 1;
    for (uint32_t l = 0; l < r->n_layer; ++l) {
        for (int t = 0; t < PMI_REC_NROW; ++t) {
            m = PMI_MAX(m, r->layers[l].row[t]);
        }
    }
    return m;
}

/* The parameters (and their layer array) are the caller's memory, read while the GIL is
 * released: validate and build from one snapshot, never from a second read. */
pm_status pmi_rec_create(const pm_rec_params *p, pmi_rec **out) {
    *out = NULL;
    if (p == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "params is NULL");
    }
    pm_rec_params snap = *p;
    pm_rec_layer *layers = NULL;
    if (snap.n_layer > 0 && snap.layers != NULL && snap.n_layer <= snap.n_layer_model) { /* else refused unread */
        layers = malloc(sizeof(pm_rec_layer) * (size_t)snap.n_layer);
        if (layers == NULL) {
            return pmi_fail(PM_E_NOMEM, "out of memory");
        }
        memcpy(layers, snap.layers, sizeof(pm_rec_layer) * (size_t)snap.n_layer);
        snap.layers = layers;
    }
    pm_status st = rec_create(&snap, out);
    free(layers);
    return st;
}
