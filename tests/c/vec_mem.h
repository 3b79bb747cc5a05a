/* vec_mem.h - the memory of a shared-vector case (tests/vectors/README.md), of any kind, built
 * through the public C API, and the row layouts a replayer needs:
 *
 *   vm_mem m;
 *   char err[256];
 *   if (vm_build(&case, &m, err, sizeof err) != 0) { puts(err); ... }
 *   ... m.mem, vm_store_kv(...) per applied ubatch, vm_store_rs(...) after a decode ...
 *   vm_free(&m);
 *
 * Plain library code (no test harness): failures return nonzero / a status with a message. */
#ifndef PM_VEC_MEM_H
#define PM_VEC_MEM_H

#include "vec.h"

#include <pymem.h>
#include <stdbool.h>

#define VM_MAX_LAYERS 64

typedef struct vm_kv_part {
    pm_kv_info info;
    pm_kv_layer_info li[VM_MAX_LAYERS];
    uint64_t kb[VM_MAX_LAYERS];   /* K bytes of one token's row, per held layer */
    uint64_t vb[VM_MAX_LAYERS];   /* V bytes (transposed: the token's column) */
    uint64_t base;                /* offset of this part's rows in a token's record */
} vm_kv_part;

typedef struct vm_mem {
    pm_memory *mem;
    const char *kind;             /* "kv", "iswa", "recurrent", "hybrid", "hybrid_iswa" */
    uint32_t n_kv;                /* KV parts (0, 1 or 2) */
    vm_kv_part kv[2];
    uint64_t stride;              /* `rows` bytes per token (every KV part) */
    bool has_rec;
    pm_rec_info rec;
    pm_rec_layer_info rli[VM_MAX_LAYERS];
    uint64_t rs_stride;           /* `rs` bytes per sequence */
    uint32_t n_seq_max, n_vocab, n_ubatch;
} vm_mem;

/* Every parameter key of the grammar (NULL-terminated), for vec_load. */
extern const char *const VM_PARAMS[];

/* Build the case's memory; 0, or -1 with a message (unknown kind, a key of another kind, a
 * malformed value, the constructor's error). */
int vm_build(const vec_case *c, vm_mem *m, char *err, size_t errcap);
void vm_free(vm_mem *m);

/* Store the K/V rows of applied ubatch u: idx = batch index of each of its n tokens, rows =
 * the decode's `rows` (m->stride bytes per batch token). */
pm_status vm_store_kv(vm_mem *m, pm_mctx *ctx, uint32_t u, const uint32_t *idx, uint32_t n, const uint8_t *rows,
                      char *err, size_t errcap);

/* Write `rs` rows (r rows of every recurrent layer, then its s rows, per sequence in the given
 * order) into the cell each sequence's tail is in: plane 0, or (rollback) the sequence's
 * pending rollback plane. */
pm_status vm_store_rs(vm_mem *m, const pm_seq_id *seqs, uint32_t n, const uint8_t *rs, size_t len, bool rollback,
                      char *err, size_t errcap);

/* Everything observable as one malloc'ed byte string: the bare whole state (or its failure
 * status), cells and counters of every KV stream, recurrent cells, rollback planes and
 * counters, every sequence's positions, update_pending.  NULL when out of memory. */
uint8_t *vm_snapshot(const vm_mem *m, size_t *n);

#endif /* PM_VEC_MEM_H */
