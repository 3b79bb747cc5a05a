/* copyhash.c - pm_copy_hash128: the checks, then the active kernel table's copy_hash
 * (kernels/copyhash.inc). */
#include "pm_internal.h"

#include "kernels/kernels.h"

pm_status pm_copy_hash128(const pm_copy_run *runs, uint64_t n_runs, uint8_t *digest) {
    if (digest == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "pm_copy_hash128: digest is NULL");
    }
    if (n_runs > 0 && runs == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "pm_copy_hash128: runs is NULL");
    }
    if (n_runs > SIZE_MAX / sizeof *runs) {
        return pmi_fail(PM_E_INVALID_ARG, "pm_copy_hash128: %llu runs", (unsigned long long)n_runs);
    }
    for (uint64_t r = 0; r < n_runs; r++) {
        const pm_copy_run *run = &runs[r];
        if (run->n_rows == 0 || run->row_bytes == 0) {
            continue;
        }
        /* the last row's end, from each base, must be addressable */
        uint64_t last = run->n_rows - 1;
        int bad = run->src == NULL || (run->src_stride != 0 && last > (UINTPTR_MAX - run->row_bytes) / run->src_stride);
        if (!bad && run->dst != NULL) {
            bad = run->dst_stride != 0 && last > (UINTPTR_MAX - run->row_bytes) / run->dst_stride;
        }
        if (!bad) {
            uint64_t span_s = last * run->src_stride + run->row_bytes;
            uint64_t span_d = run->dst != NULL ? last * run->dst_stride + run->row_bytes : 0;
            bad = span_s > UINTPTR_MAX - (uintptr_t)run->src ||
                  (run->dst != NULL && span_d > UINTPTR_MAX - (uintptr_t)run->dst);
        }
        if (bad) {
            return pmi_fail(PM_E_INVALID_ARG, "pm_copy_hash128: run %llu is out of the address space or has no source",
                            (unsigned long long)r);
        }
    }
    pmk_get()->copy_hash(runs, (size_t)n_runs, digest);
    return PM_OK;
}
