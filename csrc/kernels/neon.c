/* neon.c - AArch64 NEON kernels (arm64 only; NEON is baseline there, no flags needed).
 * Bit-identical to scalar.c: the same operations in the same order (vfma exactly where
 * scalar.c calls fmaf), hardware f16 conversion (round to nearest even under the default
 * FPCR), scalar tails. */
#include "pmk_common.h"

#if defined(PM_HAVE_NEON) && defined(__aarch64__)

#include <arm_neon.h>

#define W 4

static void pmk_f16_to_f32_neon(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + W <= n; i += W) {
        float16x4_t h = vreinterpret_f16_u16(vld1_u16(src + i));
        vst1q_f32(dst + i, vcvt_f32_f16(h));
    }
    for (; i < n; i++) {
        dst[i] = pmk_f16_to_f32_1(src[i]);
    }
}

static void pmk_f32_to_f16_neon(const float *src, uint16_t *dst, size_t n) {
    size_t i = 0;
    for (; i + W <= n; i += W) {
        float16x4_t h = vcvt_f16_f32(vld1q_f32(src + i));
        vst1_u16(dst + i, vreinterpret_u16_f16(h));
    }
    for (; i < n; i++) {
        dst[i] = pmk_f32_to_f16_1(src[i]);
    }
}

static void pmk_f32_to_bf16_neon(const float *src, uint16_t *dst, size_t n) {
    const uint32x4_t abs_mask = vdupq_n_u32(0x7fffffffu);
    const uint32x4_t inf = vdupq_n_u32(0x7f800000u);
    const uint32x4_t round = vdupq_n_u32(0x7fffu);
    const uint32x4_t one = vdupq_n_u32(1u);
    const uint32x4_t quiet = vdupq_n_u32(64u);
    size_t i = 0;
    for (; i + W <= n; i += W) {
        uint32x4_t u = vreinterpretq_u32_f32(vld1q_f32(src + i));
        uint32x4_t hi = vshrq_n_u32(u, 16);
        uint32x4_t nan = vcgtq_u32(vandq_u32(u, abs_mask), inf);
        uint32x4_t lsb = vandq_u32(hi, one);
        uint32x4_t r = vshrq_n_u32(vaddq_u32(u, vaddq_u32(round, lsb)), 16);
        r = vbslq_u32(nan, vorrq_u32(hi, quiet), r);
        vst1_u16(dst + i, vmovn_u32(r));
    }
    for (; i < n; i++) {
        dst[i] = pmk_f32_to_bf16_1(src[i]);
    }
}

static void pmk_mask_row_neon(float *dst, const pm_pos *cell_pos, const uint64_t *member,
                              size_t n, const pmk_mask_row *r) {
    pmk_mask_consts c;
    pmk_mask_prepare(r, &c);
    static const uint32_t lane_bits_v[4] = {1u, 2u, 4u, 8u};
    const uint32x4_t lane_bits = vld1q_u32(lane_bits_v);
    const int32x4_t p1 = vdupq_n_s32(c.p1);
    const int32x4_t nswa = vdupq_n_s32(c.nswa);
    const int32x4_t chunk = vdupq_n_s32(c.chunk_start);
    const int32x4_t half = vdupq_n_s32(c.half);
    const int32x4_t neg_half = vdupq_n_s32(-c.half);
    const int32x4_t span = vdupq_n_s32(c.span_min);
    const float32x4_t drop = vdupq_n_f32(-INFINITY);
    size_t j = 0;
    for (; j + W <= n; j += W) {
        int32x4_t p0 = vld1q_s32(cell_pos + j);
        uint32_t nib = (uint32_t)(member[j >> 6] >> (j & 63u)) & 0xfu;
        uint32x4_t keep = vtstq_u32(vdupq_n_u32(nib), lane_bits);
        if (c.causal) {
            keep = vbicq_u32(keep, vcgtq_s32(p0, p1));
        }
        if (c.swa != PMK_SWA_OFF) {
            int32x4_t d = vsubq_s32(p1, p0);
            uint32x4_t masked;
            if (c.swa == PMK_SWA_STD) {
                masked = vcgeq_s32(d, nswa);
            } else if (c.swa == PMK_SWA_CHUNK) {
                masked = vcltq_s32(p0, chunk);
            } else {
                masked = vorrq_u32(vcltq_s32(d, neg_half), vcgtq_s32(d, half));
            }
            if (c.span_on) {
                masked = vandq_u32(masked, vcltq_s32(p0, span));
            }
            keep = vbicq_u32(keep, masked);
        }
        float32x4_t val = vdupq_n_f32(0.0f);
        if (c.alibi) {
            /* vabsq/vnegq wrap (INT32_MIN stays INT32_MIN), like the scalar rule */
            int32x4_t ad = vabsq_s32(vsubq_s32(p0, p1));
            val = vcvtq_f32_s32(vnegq_s32(ad));
        }
        vst1q_f32(dst + j, vbslq_f32(keep, val, drop));
    }
    pmk_mask_range(dst, cell_pos, member, j, n, &c);
}

static void pmk_rope_f32_neon(float *x, const float *cs, size_t n_pairs, int neox) {
    size_t i = 0;
    if (neox) {
        for (; i + W <= n_pairs; i += W) {
            float32x4x2_t t = vld2q_f32(cs + 2 * i); /* val[0] = cos, val[1] = sin */
            float32x4_t a = vld1q_f32(x + i);
            float32x4_t b = vld1q_f32(x + i + n_pairs);
            /* vfmaq_f32(acc, p, q) = acc + p*q with one rounding */
            float32x4_t ra = vfmaq_f32(vnegq_f32(vmulq_f32(b, t.val[1])), a, t.val[0]);
            float32x4_t rb = vfmaq_f32(vmulq_f32(b, t.val[0]), a, t.val[1]);
            vst1q_f32(x + i, ra);
            vst1q_f32(x + i + n_pairs, rb);
        }
    } else {
        for (; i + W <= n_pairs; i += W) {
            float32x4x2_t t = vld2q_f32(cs + 2 * i);
            float32x4x2_t v = vld2q_f32(x + 2 * i); /* val[0] = a, val[1] = b */
            float32x4x2_t r;
            r.val[0] = vfmaq_f32(vnegq_f32(vmulq_f32(v.val[1], t.val[1])), v.val[0], t.val[0]);
            r.val[1] = vfmaq_f32(vmulq_f32(v.val[1], t.val[0]), v.val[0], t.val[1]);
            vst2q_f32(x + 2 * i, r);
        }
    }
    pmk_rope_range(x, cs, i, n_pairs, neox);
}

/* Stages 1 and 2 inside one vector of 4 (lower lane of a pair: u + v, upper lane: u - v). */
static inline float32x4_t pmk_fwht4(float32x4_t a) {
    static const uint32_t m1v[4] = {0u, ~0u, 0u, ~0u};
    static const uint32_t m2v[4] = {0u, 0u, ~0u, ~0u};
    float32x4_t b = vrev64q_f32(a);
    a = vbslq_f32(vld1q_u32(m1v), vsubq_f32(b, a), vaddq_f32(a, b));
    b = vextq_f32(a, a, 2);
    a = vbslq_f32(vld1q_u32(m2v), vsubq_f32(b, a), vaddq_f32(a, b));
    return a;
}

static void pmk_fwht_f32_neon(float *x, size_t n, float scale) {
    if (!pmk_is_pow2(n)) {
        return;
    }
    if (n < W) {
        for (size_t j = 0; j < n; j++) {
            x[j] = x[j] * scale;
        }
        for (size_t len = 1; len < n; len <<= 1) {
            pmk_fwht_stage(x, n, len);
        }
        return;
    }
    const float32x4_t vs = vdupq_n_f32(scale);
    for (size_t j = 0; j < n; j += W) {
        vst1q_f32(x + j, pmk_fwht4(vmulq_f32(vld1q_f32(x + j), vs)));
    }
    for (size_t len = W; len < n; len <<= 1) {
        for (size_t i = 0; i < n; i += 2 * len) {
            for (size_t j = 0; j < len; j += W) {
                float32x4_t u = vld1q_f32(x + i + j);
                float32x4_t v = vld1q_f32(x + i + len + j);
                vst1q_f32(x + i + j, vaddq_f32(u, v));
                vst1q_f32(x + i + len + j, vsubq_f32(u, v));
            }
        }
    }
}

#define PMK_COPY_HASH pmk_copy_hash_neon
#include "copyhash.inc"

const pmk_table pmk_neon = {
    .name = "neon",
    .needs = PMK_CPU_NEON,
    .f16_to_f32 = pmk_f16_to_f32_neon,
    .f32_to_f16 = pmk_f32_to_f16_neon,
    .f32_to_bf16 = pmk_f32_to_bf16_neon,
    .mask_row = pmk_mask_row_neon,
    .rope_f32 = pmk_rope_f32_neon,
    .fwht_f32 = pmk_fwht_f32_neon,
    .copy_hash = pmk_copy_hash_neon,
};

#else
typedef int pmk_neon_unused; /* ISO C forbids an empty translation unit */
#endif
