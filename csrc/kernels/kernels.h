/* kernels.h - the kernel table: one implementation per instruction set (kernels/scalar.c,
 * avx2.c, avx512.c, neon.c), chosen once at run time (kernels/dispatch.c).  Users: types.c
 * (conversions), rope.c (K-shift), memory/kv_place.c (KQ mask). */
#ifndef PM_KERNELS_H
#define PM_KERNELS_H

#include "pm_internal.h"

/* Parameters of one KQ-mask row (one query token against cells 0..n-1 of one stream). */
typedef struct pmk_mask_row {
    pm_pos p1;          /* query position */
    uint32_t causal;    /* drop cells with p0 > p1 */
    int32_t swa_type;   /* pm_swa_type */
    uint32_t n_swa;
    pm_pos span_min;    /* SWA is not applied to cells with p0 >= span_min (INT32_MAX = never) */
    uint32_t alibi;     /* kept value is -|p0 - p1| instead of 0 */
} pmk_mask_row;

typedef struct pmk_table {
    const char *name; /* "scalar", "avx2", "avx512", "neon" */
    uint32_t needs;   /* PMK_CPU_* bits */
    void (*f16_to_f32)(const uint16_t *src, float *dst, size_t n);
    void (*f32_to_f16)(const float *src, uint16_t *dst, size_t n);
    void (*f32_to_bf16)(const float *src, uint16_t *dst, size_t n);
    /* dst[j] for j in 0..n-1: cell j is visible when bit j of member is set and the
     * causal/SWA rules of r keep it; value 0 (or -|p0-p1| with alibi), else -INFINITY. */
    void (*mask_row)(float *dst, const pm_pos *cell_pos, const uint64_t *member, size_t n,
                     const pmk_mask_row *r);
    /* Rotate pairs in place: for i in 0..n_pairs-1, with (a, b) = (x[ia], x[ib]) where
     * NORM: ia = 2i, ib = 2i+1; NEOX: ia = i, ib = i + n_pairs:
     * x[ia] = fmaf(a, cs[2i], -(b*cs[2i+1])); x[ib] = fmaf(a, cs[2i+1], b*cs[2i])
     * (cs = interleaved cos/sin cache; fused exactly as ggml's x86 CPU build computes it,
     * checked bit for bit against the b11739 wheel). */
    void (*rope_f32)(float *x, const float *cs, size_t n_pairs, int neox);
    /* Fast Walsh-Hadamard transform of n floats (n power of two), scaled by 1/sqrt(n)
     * first, butterflies (u+v, u-v) with len = 1, 2, 4, ...: ggml's CPU fwht. */
    void (*fwht_f32)(float *x, size_t n, float scale);
    /* pm_copy_hash128 after its checks (kernels/copyhash.inc: xxHash's vector path follows the
     * file's instruction set; the digest is the same everywhere). */
    void (*copy_hash)(const pm_copy_run *runs, size_t n_runs, uint8_t digest[16]);
} pmk_table;

#define PMK_CPU_AVX2 1u
#define PMK_CPU_AVX512 2u
#define PMK_CPU_NEON 4u

extern const pmk_table pmk_scalar;
#if defined(PM_HAVE_X86)
extern const pmk_table pmk_avx2;
extern const pmk_table pmk_avx512;
#endif
#if defined(PM_HAVE_NEON)
extern const pmk_table pmk_neon;
#endif
/* The active table (chosen once from the CPU and PYMEM_FORCE_SCALAR / PYMEM_FORCE_KERNEL). */
const pmk_table *pmk_get(void);
/* All tables compiled in (supported or not), NULL-terminated; and the CPU's bits. */
const pmk_table *const *pmk_all(void);
uint32_t pmk_cpu_bits(void);

#endif /* PM_KERNELS_H */
