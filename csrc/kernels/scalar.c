/* scalar.c - the portable reference kernels; every other table must match these bit for bit. */
#include "pmk_common.h"

static void pmk_f16_to_f32_scalar(const uint16_t *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++) {
        dst[i] = pmk_f16_to_f32_1(src[i]);
    }
}

static void pmk_f32_to_f16_scalar(const float *src, uint16_t *dst, size_t n) {
    for (size_t i = 0; i < n; i++) {
        dst[i] = pmk_f32_to_f16_1(src[i]);
    }
}

static void pmk_f32_to_bf16_scalar(const float *src, uint16_t *dst, size_t n) {
    for (size_t i = 0; i < n; i++) {
        dst[i] = pmk_f32_to_bf16_1(src[i]);
    }
}

static void pmk_mask_row_scalar(float *dst, const pm_pos *cell_pos, const uint64_t *member,
                                size_t n, const pmk_mask_row *r) {
    pmk_mask_consts c;
    pmk_mask_prepare(r, &c);
    pmk_mask_range(dst, cell_pos, member, 0, n, &c);
}

static void pmk_rope_f32_scalar(float *x, const float *cs, size_t n_pairs, int neox) {
    pmk_rope_range(x, cs, 0, n_pairs, neox);
}

/* Scale by `scale`, then butterflies of width 1, 2, 4, ...  Not a power of two: no-op. */
static void pmk_fwht_f32_scalar(float *x, size_t n, float scale) {
    if (!pmk_is_pow2(n)) {
        return;
    }
    for (size_t j = 0; j < n; j++) {
        x[j] = x[j] * scale;
    }
    for (size_t len = 1; len < n; len <<= 1) {
        pmk_fwht_stage(x, n, len);
    }
}

#define PMK_COPY_HASH pmk_copy_hash_scalar
#include "copyhash.inc"

const pmk_table pmk_scalar = {
    .name = "scalar",
    .needs = 0,
    .f16_to_f32 = pmk_f16_to_f32_scalar,
    .f32_to_f16 = pmk_f32_to_f16_scalar,
    .f32_to_bf16 = pmk_f32_to_bf16_scalar,
    .mask_row = pmk_mask_row_scalar,
    .rope_f32 = pmk_rope_f32_scalar,
    .fwht_f32 = pmk_fwht_f32_scalar,
    .copy_hash = pmk_copy_hash_scalar,
};
