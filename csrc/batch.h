/* batch.h - batches, ubatches and the batch splitter (batch.c). */
#ifndef PM_BATCH_H
#define PM_BATCH_H

#include "memory/kv_cells.h"

struct pm_batch {
    uint32_t n_tokens;
    pm_token *token;     /* NULL: embedding batch */
    pm_pos *pos;         /* NULL: automatic; else n_tokens * n_pos, section-major */
    uint32_t n_pos;
    uint32_t *seq_off;   /* n_tokens + 1 offsets into seq_id */
    pm_seq_id *seq_id;   /* per token in llama.cpp's order (primary first) */
    pm_seq_id *first_id; /* per token: first id as given (drives automatic positions) */
    int8_t *output;
};

typedef struct pmi_ubatch {
    uint32_t n_tokens;
    uint32_t n_seq_tokens;
    uint32_t n_seqs;
    uint32_t n_seqs_unq;
    uint32_t n_pos;          /* sections in pos */
    bool equal_seqs;
    bool has_token;
    uint32_t *idx;           /* batch index of each token */
    pm_token *token;         /* n_tokens (zeros for an embedding batch: never read) */
    pm_pos *pos;             /* n_tokens * n_pos, section-major */
    uint32_t *seq_off;       /* n_tokens + 1 */
    pm_seq_id *seq_id;
    int8_t *output;
    pm_seq_id seq_id_unq[PM_MAX_SEQ];
    int32_t seq_idx[PM_MAX_SEQ];
} pmi_ubatch;

static inline pm_seq_id pmi_ub_primary(const pmi_ubatch *ub, uint32_t t) {
    return ub->seq_id[ub->seq_off[t]];
}
static inline uint32_t pmi_ub_n_seq_id(const pmi_ubatch *ub, uint32_t t) {
    return ub->seq_off[t + 1] - ub->seq_off[t];
}

/* A validated batch with resolved positions and the splitter's state. */
typedef struct pmi_balloc {
    const pm_batch *batch;
    uint32_t n_tokens;
    uint32_t n_pos;          /* n_pos_per_embd of the memory */
    pm_pos *pos;             /* resolved: n_tokens * n_pos section-major */
    uint64_t *seq_set;       /* PMI_SEQ_WORDS per token */
    bool has_cpl;
    bool *used;
    uint32_t n_used;
    /* distinct sequence sets: set id per token, entries of each set in batch order */
    uint32_t n_sets;
    uint32_t *set_of;        /* per token */
    uint32_t *set_start;     /* n_sets + 1 offsets into set_tok */
    uint32_t *set_tok;
} pmi_balloc;

struct pmi_mem_ops;
/* Validate (llama_batch_allocr::init) against memory `mem`; fills ba.  PM_E_BATCH with
 * llama.cpp's reason when it would reject the batch. */
pm_status pmi_balloc_init(pmi_balloc *ba, const pm_batch *batch, const pm_memory *mem,
                          uint32_t n_seq_max, uint32_t n_pos_per_embd, uint32_t n_vocab,
                          bool output_all);
void pmi_balloc_free(pmi_balloc *ba);
void pmi_balloc_reset(pmi_balloc *ba);
/* Splits; an ubatch with n_tokens == 0 ends the run.  PM_E_NOMEM / PM_E_INVALID_ARG. */
pm_status pmi_split_simple(pmi_balloc *ba, uint32_t n_ubatch, pmi_ubatch *out);
pm_status pmi_split_equal(pmi_balloc *ba, uint32_t n_ubatch, bool sequential,
                          uint32_t n_keep_tail, pmi_ubatch *out);
pm_status pmi_split_seq(pmi_balloc *ba, uint32_t n_ubatch, pmi_ubatch *out);
void pmi_ubatch_free(pmi_ubatch *ub);
/* An ubatch of n_tokens tokens in one sequence set {seq} (ubatch_reserve + fill). */
pm_status pmi_ubatch_reserve(pmi_ubatch *ub, uint32_t n_tokens, uint32_t n_pos, pm_seq_id seq);

#endif /* PM_BATCH_H */
