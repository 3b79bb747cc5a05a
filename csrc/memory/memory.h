/* memory.h - the memory handle: parts, operation tables, memory contexts
 * (memory.c, composite.c, mctx.c, inspect.c, state/envelope.c). */
#ifndef PM_MEMORY_H
#define PM_MEMORY_H

#include "memory/kv_cache.h"
#include "memory/recurrent.h"

typedef struct pmi_mem_ops {
    pm_status (*seq_rm)(pm_memory *m, pm_seq_id s, pm_pos p0, pm_pos p1, bool *out);
    pm_status (*seq_pos_min)(const pm_memory *m, pm_seq_id s, pm_pos *out);
    pm_status (*seq_pos_max)(const pm_memory *m, pm_seq_id s, pm_pos *out);
    bool (*can_shift)(const pm_memory *m);
    /* split the batch and dry-run the placement of its ubatches into ctx */
    pm_status (*init_batch)(pm_memory *m, pmi_balloc *ba, uint32_t n_ubatch, bool embd_all,
                            pm_mctx *ctx);
} pmi_mem_ops;

/* A memory is a list of parts in state-section order: up to two KV caches (KV: the cache;
 * iSWA: base, swa; hybrid: attention; hybrid-iSWA: base, swa) and an optional recurrent
 * memory.  The kind's table decides how operations combine them, as llama.cpp's
 * composite memories do; everything else (clear, seq_cp/keep/add/div, update, state,
 * ubatch placement) applies to every part in order. */
struct pm_memory {
    const pmi_mem_ops *ops;
    int32_t kind;
    uint32_t n_seq_max;
    uint32_t n_pos_per_embd;
    uint64_t gen;        /* bumped by every change; memory contexts check it */
    char *arch;          /* for the context envelope; may be NULL */
    uint32_t n_kv;
    pmi_kv *kv[2];
    pmi_rec *rec;
    uint8_t *rec_tmp;    /* scratch rows for moving recurrent states */
};

/* A memory context: the ubatches of one batch and their placements. */
struct pm_mctx {
    pm_memory *mem;
    uint64_t gen;        /* memory generation this context is valid for */
    uint32_t n_ubatch;
    uint32_t next;       /* next ubatch to apply */
    pmi_ubatch *ubs;
    uint32_t n_parts;    /* KV parts with slots */
    pmi_slot *slots[2];  /* per part: n_ubatch slots */
    uint32_t *n_kv[2];   /* per part, per ubatch, after apply */
    uint32_t *rec_head;  /* recurrent: range of each applied ubatch */
    uint32_t *rec_n;
};

pm_status pmi_mctx_alloc(pm_mctx *ctx, uint32_t n_ubatch, uint32_t n_parts);
/* ctx and ubatch index valid / ubatch i is the last applied one (what: the operation) */
pm_status pmi_mctx_check_ub(const pm_mctx *ctx, uint32_t i);
pm_status pmi_mctx_check_current(const pm_mctx *ctx, uint32_t i, const char *what);

/* Does [p, p + n) overlap a tensor of m?  The first one is named in what (may be NULL). */
bool pmi_mem_overlaps(const pm_memory *m, const void *p, uint64_t n, char *what, size_t cap);

/* transactions over every part (memory.c): begin, then end(ok) commits or rolls back */
pm_status pmi_mem_tx_begin(pm_memory *m);
void pmi_mem_tx_end(pm_memory *m, bool ok);

#define PMI_CHECK_MEM(m)                                                                         \
    do {                                                                                       \
        if ((m) == NULL) {                                                                     \
            return pmi_fail(PM_E_INVALID_ARG, "memory is NULL");                              \
        }                                                                                      \
    } while (0)

/* composite.c: the operation tables of every kind */
extern const pmi_mem_ops pmi_ops_kv, pmi_ops_iswa, pmi_ops_rec, pmi_ops_hybrid, pmi_ops_hybrid_iswa;

#endif /* PM_MEMORY_H */
