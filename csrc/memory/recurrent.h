/* recurrent.h - the recurrent memory (recurrent.c): one cell per sequence slot,
 * state rows per layer. */
#ifndef PM_RECURRENT_H
#define PM_RECURRENT_H

#include "batch.h"

typedef struct pmi_rcell {
    pm_pos pos;
    int32_t src, src0, tail;
    uint64_t seq[4];
} pmi_rcell;

/* the row kinds of a recurrent layer (the `which` of pm_rec_tensor): r, s and the optional
 * per-layer-embedding p */
typedef enum pmi_rec_row { PMI_REC_R = 0, PMI_REC_S = 1, PMI_REC_P = 2, PMI_REC_NROW = 3 } pmi_rec_row;

typedef struct pmi_rec_layer {
    uint32_t il;
    bool has_p;
    uint64_t row[PMI_REC_NROW];      /* bytes per row of r, s, p */
    uint8_t *data[PMI_REC_NROW];     /* size * (1 + n_rs_seq) rows each */
} pmi_rec_layer;

typedef struct pmi_rec {
    uint32_t size;
    uint32_t n_seq_max;
    uint32_t n_rs_seq;
    uint32_t n_rows;      /* size * (1 + n_rs_seq) */
    uint32_t n_layer_model;
    uint32_t n_layer;
    int32_t type_r, type_s;
    uint32_t head, n, used;
    int32_t rs_z;
    uint32_t *rs_idx;     /* n_seq_max */
    pmi_rcell *cells;
    pmi_rec_layer *layers;
    /* transaction snapshot */
    pmi_rcell *tx_cells;
    uint32_t *tx_rs_idx;
    uint32_t tx_head, tx_n, tx_used;
    int32_t tx_rs_z;
} pmi_rec;

/* sequence sets of a recurrent cell */
static inline bool rc_has(const pmi_rcell *c, pm_seq_id s) {
    return s >= 0 && s < PM_MAX_SEQ && ((c->seq[(uint32_t)s >> 6] >> ((uint32_t)s & 63)) & 1u);
}
static inline void rc_set(pmi_rcell *c, pm_seq_id s) { c->seq[(uint32_t)s >> 6] |= 1ULL << ((uint32_t)s & 63); }
static inline void rc_clr(pmi_rcell *c, pm_seq_id s) { c->seq[(uint32_t)s >> 6] &= ~(1ULL << ((uint32_t)s & 63)); }
static inline bool rc_empty(const pmi_rcell *c) { return !(c->seq[0] | c->seq[1] | c->seq[2] | c->seq[3]); }
static inline uint32_t rc_count(const pmi_rcell *c) {
    return pmi_popcount64(c->seq[0]) + pmi_popcount64(c->seq[1]) + pmi_popcount64(c->seq[2]) +
           pmi_popcount64(c->seq[3]);
}
static inline pm_seq_id rc_first(const pmi_rcell *c) {
    for (uint32_t k = 0; k < 4; ++k) {
        if (c->seq[k]) {
            return (pm_seq_id)(k * 64 + (uint32_t)__builtin_ctzll(c->seq[k]));
        }
    }
    return -1;
}

pm_status pmi_rec_create(const pm_rec_params *p, pmi_rec **out);
void pmi_rec_destroy(pmi_rec *r);
uint64_t pmi_rec_nbytes(const pmi_rec *r);
void pmi_rec_tx_begin(pmi_rec *r);
void pmi_rec_tx_rollback(pmi_rec *r);
void pmi_rec_clear(pmi_rec *r, bool data);
bool pmi_rec_seq_rm(pmi_rec *r, pm_seq_id s, pm_pos p0, pm_pos p1);
void pmi_rec_seq_cp(pmi_rec *r, pm_seq_id a, pm_seq_id b);
void pmi_rec_seq_keep(pmi_rec *r, pm_seq_id s);
pm_status pmi_rec_seq_add(pmi_rec *r, pm_seq_id s, pm_pos p0, pm_pos p1, pm_pos d, bool check_only);
pm_status pmi_rec_seq_div(pmi_rec *r, pm_seq_id s, pm_pos p0, pm_pos p1, int32_t d, bool check_only);
pm_pos pmi_rec_seq_pos_min(const pmi_rec *r, pm_seq_id s);
pm_pos pmi_rec_seq_pos_max(const pmi_rec *r, pm_seq_id s);
pm_status pmi_rec_find_slot(pmi_rec *r, const pmi_ubatch *ub);
pm_status pmi_rec_prepare(pmi_rec *r, const pmi_ubatch *ubs, uint32_t n);
void pmi_rec_move_states(pmi_rec *r, uint8_t *tmp);
uint64_t pmi_rec_max_row(const pmi_rec *r);

#endif /* PM_RECURRENT_H */
