/* rec_state.h - the recurrent memory's state section (rec_state.c). */
#ifndef PM_REC_STATE_H
#define PM_REC_STATE_H

#include "memory/recurrent.h"

/* A parsed recurrent section; meta places the cells, data copies the rows. */
typedef struct pmi_rec_plan {
    pm_seq_id seq;
    uint32_t cc;
    pm_pos last_pos;
    const uint8_t *meta;  /* cell records: copy.buf (validated copy) */
    pmi_copy copy;
    const uint8_t **rows; /* n_layer * 3 */
    uint32_t head;        /* set by meta */
} pmi_rec_plan;

pm_status pmi_rec_state_write(const pmi_rec *r, pmi_writer *w, pm_seq_id seq);
pm_status pmi_rec_state_parse(const pmi_rec *r, pmi_reader *rd, pm_seq_id seq, pmi_rec_plan *plan);
pm_status pmi_rec_state_meta(pmi_rec *r, pmi_rec_plan *plan);
void pmi_rec_state_data(pmi_rec *r, const pmi_rec_plan *plan);
void pmi_rec_plan_free(pmi_rec_plan *plan);

#endif /* PM_REC_STATE_H */
