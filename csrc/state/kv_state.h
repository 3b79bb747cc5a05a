/* kv_state.h - the KV cache's state section: write, and restore as parse / meta /
 * data (kv_state.c). */
#ifndef PM_KV_STATE_H
#define PM_KV_STATE_H

#include "memory/kv_cache.h"

/* With PM_STATE_PARTIAL_ONLY a cache without a sliding window has no partial state: it writes
 * and reads nothing (b11739; the SWA cache of an iSWA memory is the partial part). */
bool pmi_kv_partial_skips(const pmi_kv *kv, uint32_t flags);
pm_status pmi_kv_state_write(const pmi_kv *kv, pmi_writer *w, pm_seq_id seq, uint32_t flags);
/* runs of consecutive cells of cells[0..n): (first cell, length) pairs into runs; the count */
uint32_t pmi_kv_make_runs(const uint32_t *cells, uint32_t n, uint32_t *runs);

/* One stream section of a KV blob, parsed and validated (pointers into the blob). */
typedef struct pmi_kv_section {
    uint32_t cc;
    const uint8_t *meta;  /* cell records: copy.buf (validated copy, never the caller's bytes) */
    uint64_t meta_len;
    pmi_copy copy;
    const uint8_t **k;    /* per layer: rows */
    const uint8_t **v;    /* per layer: rows or transposed elements */
    uint32_t *ids;        /* whole restores: the ids listed for each sequence (PM_MAX_SEQ
                           * entries; a repeated id counts twice) */
} pmi_kv_section;

/* A restore in three steps: parse (validates, changes nothing), meta (cells and heads; a
 * per-sequence restore can fail with PM_E_NO_SLOT: wrap it in a transaction), data. */
typedef struct pmi_kv_plan {
    pm_seq_id seq;
    bool skip;            /* nothing to restore (PARTIAL_ONLY on a non-SWA cache) */
    uint32_t n_stream;
    pmi_kv_section *secs; /* per stream */
    uint32_t **slots;     /* per stream section: the cells it went to (meta) */
} pmi_kv_plan;

pm_status pmi_kv_state_parse(const pmi_kv *kv, pmi_reader *r, pm_seq_id seq, uint32_t flags,
                             pmi_kv_plan *plan);
pm_status pmi_kv_state_meta(pmi_kv *kv, pmi_kv_plan *plan);
void pmi_kv_state_data(pmi_kv *kv, const pmi_kv_plan *plan);
void pmi_kv_plan_free(pmi_kv_plan *plan);

#endif /* PM_KV_STATE_H */
