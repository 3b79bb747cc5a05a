/* avx2.c - AVX2 + F16C kernels (x86-64 only; this file alone is built with -mavx2 -mfma
 * -mf16c -mbmi2).  Results are bit-identical to scalar.c: the same operations in the same
 * order (FMA exactly where scalar.c calls fmaf), hardware f16 conversion with round to
 * nearest even, and the scalar helpers for the tails. */
#include "pmk_common.h"

#if defined(PM_HAVE_X86) && (defined(__x86_64__) || defined(_M_X64))

#include <immintrin.h>

#define W 8

static void pmk_f16_to_f32_avx2(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + W <= n; i += W) {
        __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; i++) {
        dst[i] = pmk_f16_to_f32_1(src[i]);
    }
}

static void pmk_f32_to_f16_avx2(const float *src, uint16_t *dst, size_t n) {
    size_t i = 0;
    for (; i + W <= n; i += W) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(void *)(dst + i), h);
    }
    for (; i < n; i++) {
        dst[i] = pmk_f32_to_f16_1(src[i]);
    }
}

static void pmk_f32_to_bf16_avx2(const float *src, uint16_t *dst, size_t n) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
    const __m256i inf = _mm256_set1_epi32(0x7f800000);
    const __m256i round = _mm256_set1_epi32(0x7fff);
    const __m256i one = _mm256_set1_epi32(1);
    const __m256i quiet = _mm256_set1_epi32(64);
    size_t i = 0;
    for (; i + W <= n; i += W) {
        __m256i u = _mm256_loadu_si256((const __m256i *)(const void *)(src + i));
        __m256i hi = _mm256_srli_epi32(u, 16);
        __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
        __m256i lsb = _mm256_and_si256(hi, one);
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(round, lsb)), 16);
        r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, quiet), nan);
        /* 8 x u32 (all <= 0xffff) -> 8 x u16 in order */
        __m256i p = _mm256_packus_epi32(r, r);
        p = _mm256_permute4x64_epi64(p, 0x08);
        _mm_storeu_si128((__m128i *)(void *)(dst + i), _mm256_castsi256_si128(p));
    }
    for (; i < n; i++) {
        dst[i] = pmk_f32_to_bf16_1(src[i]);
    }
}

static void pmk_mask_row_avx2(float *dst, const pm_pos *cell_pos, const uint64_t *member,
                              size_t n, const pmk_mask_row *r) {
    pmk_mask_consts c;
    pmk_mask_prepare(r, &c);
    const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i ones = _mm256_set1_epi32(-1);
    const __m256i zero = _mm256_setzero_si256();
    const __m256i p1 = _mm256_set1_epi32(c.p1);
    const __m256i nswa = _mm256_set1_epi32(c.nswa);
    const __m256i chunk = _mm256_set1_epi32(c.chunk_start);
    const __m256i half = _mm256_set1_epi32(c.half);
    const __m256i neg_half = _mm256_set1_epi32(-c.half);
    const __m256i span = _mm256_set1_epi32(c.span_min);
    const __m256 drop = _mm256_set1_ps(-INFINITY);
    size_t j = 0;
    for (; j + W <= n; j += W) {
        __m256i p0 = _mm256_loadu_si256((const __m256i *)(const void *)(cell_pos + j));
        uint32_t byte = (uint32_t)(member[j >> 6] >> (j & 63u)) & 0xffu;
        __m256i bits = _mm256_and_si256(_mm256_set1_epi32((int)byte), lane_bits);
        __m256i keep = _mm256_cmpeq_epi32(bits, lane_bits);
        if (c.causal) {
            keep = _mm256_andnot_si256(_mm256_cmpgt_epi32(p0, p1), keep);
        }
        if (c.swa != PMK_SWA_OFF) {
            __m256i d = _mm256_sub_epi32(p1, p0);
            __m256i masked;
            if (c.swa == PMK_SWA_STD) {
                masked = _mm256_xor_si256(_mm256_cmpgt_epi32(nswa, d), ones);
            } else if (c.swa == PMK_SWA_CHUNK) {
                masked = _mm256_cmpgt_epi32(chunk, p0);
            } else {
                masked = _mm256_or_si256(_mm256_cmpgt_epi32(neg_half, d),
                                         _mm256_cmpgt_epi32(d, half));
            }
            if (c.span_on) {
                /* SWA is not applied to p0 >= span_min */
                masked = _mm256_and_si256(masked, _mm256_cmpgt_epi32(span, p0));
            }
            keep = _mm256_andnot_si256(masked, keep);
        }
        __m256 val = _mm256_setzero_ps();
        if (c.alibi) {
            __m256i ad = _mm256_abs_epi32(_mm256_sub_epi32(p0, p1));
            val = _mm256_cvtepi32_ps(_mm256_sub_epi32(zero, ad));
        }
        _mm256_storeu_ps(dst + j, _mm256_blendv_ps(drop, val, _mm256_castsi256_ps(keep)));
    }
    pmk_mask_range(dst, cell_pos, member, j, n, &c);
}

static void pmk_rope_f32_avx2(float *x, const float *cs, size_t n_pairs, int neox) {
    size_t i = 0;
    if (neox) {
        for (; i + W <= n_pairs; i += W) {
            __m256 lo = _mm256_loadu_ps(cs + 2 * i);
            __m256 hi = _mm256_loadu_ps(cs + 2 * i + W);
            /* de-interleave: c = even elements, s = odd elements, in order */
            __m256 c = _mm256_shuffle_ps(lo, hi, 0x88);
            __m256 s = _mm256_shuffle_ps(lo, hi, 0xdd);
            c = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(c), 0xd8));
            s = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xd8));
            __m256 a = _mm256_loadu_ps(x + i);
            __m256 b = _mm256_loadu_ps(x + i + n_pairs);
            __m256 ra = _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s)); /* fmaf(a, c, -(b*s)) */
            __m256 rb = _mm256_fmadd_ps(a, s, _mm256_mul_ps(b, c)); /* fmaf(a, s, b*c) */
            _mm256_storeu_ps(x + i, ra);
            _mm256_storeu_ps(x + i + n_pairs, rb);
        }
    } else {
        /* 4 pairs per vector: x = [a0 b0 a1 b1 ...], cs = [c0 s0 c1 s1 ...];
         * fmaddsub: even lanes a*c - b*s, odd lanes a*s + b*c, one rounding each */
        for (; i + W / 2 <= n_pairs; i += W / 2) {
            __m256 v = _mm256_loadu_ps(x + 2 * i);
            __m256 t = _mm256_loadu_ps(cs + 2 * i);   /* c s */
            __m256 aa = _mm256_moveldup_ps(v);        /* a a */
            __m256 bb = _mm256_movehdup_ps(v);        /* b b */
            __m256 ts = _mm256_permute_ps(t, 0xb1);   /* s c */
            __m256 r = _mm256_fmaddsub_ps(aa, t, _mm256_mul_ps(bb, ts));
            _mm256_storeu_ps(x + 2 * i, r);
        }
    }
    pmk_rope_range(x, cs, i, n_pairs, neox);
}

/* Stages 1, 2, 4 inside one vector of 8: lanes in the lower half of each group get u + v,
 * lanes in the upper half get u - v (u from the lower lane, v from the upper lane). */
static inline __m256 pmk_fwht8(__m256 a) {
    __m256 b = _mm256_permute_ps(a, 0xb1);
    a = _mm256_blend_ps(_mm256_add_ps(a, b), _mm256_sub_ps(b, a), 0xaa);
    b = _mm256_permute_ps(a, 0x4e);
    a = _mm256_blend_ps(_mm256_add_ps(a, b), _mm256_sub_ps(b, a), 0xcc);
    b = _mm256_permute2f128_ps(a, a, 0x01);
    a = _mm256_blend_ps(_mm256_add_ps(a, b), _mm256_sub_ps(b, a), 0xf0);
    return a;
}

static void pmk_fwht_f32_avx2(float *x, size_t n, float scale) {
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
    const __m256 vs = _mm256_set1_ps(scale);
    for (size_t j = 0; j < n; j += W) {
        _mm256_storeu_ps(x + j, pmk_fwht8(_mm256_mul_ps(_mm256_loadu_ps(x + j), vs)));
    }
    for (size_t len = W; len < n; len <<= 1) {
        for (size_t i = 0; i < n; i += 2 * len) {
            for (size_t j = 0; j < len; j += W) {
                __m256 u = _mm256_loadu_ps(x + i + j);
                __m256 v = _mm256_loadu_ps(x + i + len + j);
                _mm256_storeu_ps(x + i + j, _mm256_add_ps(u, v));
                _mm256_storeu_ps(x + i + len + j, _mm256_sub_ps(u, v));
            }
        }
    }
}

#define PMK_COPY_HASH pmk_copy_hash_avx2
#include "copyhash.inc"

const pmk_table pmk_avx2 = {
    .name = "avx2",
    .needs = PMK_CPU_AVX2,
    .f16_to_f32 = pmk_f16_to_f32_avx2,
    .f32_to_f16 = pmk_f32_to_f16_avx2,
    .f32_to_bf16 = pmk_f32_to_bf16_avx2,
    .mask_row = pmk_mask_row_avx2,
    .rope_f32 = pmk_rope_f32_avx2,
    .fwht_f32 = pmk_fwht_f32_avx2,
    .copy_hash = pmk_copy_hash_avx2,
};

#else
typedef int pmk_avx2_unused; /* ISO C forbids an empty translation unit */
#endif
