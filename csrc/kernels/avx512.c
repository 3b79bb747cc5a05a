/* avx512.c - AVX-512 (F/BW/VL/DQ) kernels (x86-64 only; this file alone is built with the
 * AVX-512 flags).  Bit-identical to scalar.c: the same operations in the same order (FMA
 * exactly where scalar.c calls fmaf), hardware f16 conversion with round to nearest even,
 * scalar helpers for the tails. */
#include "pmk_common.h"

#if defined(PM_HAVE_X86) && (defined(__x86_64__) || defined(_M_X64))

#include <immintrin.h>

#define W 16

static void pmk_f16_to_f32_avx512(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + W <= n; i += W) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)(src + i));
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
    }
    for (; i < n; i++) {
        dst[i] = pmk_f16_to_f32_1(src[i]);
    }
}

static void pmk_f32_to_f16_avx512(const float *src, uint16_t *dst, size_t n) {
    size_t i = 0;
    for (; i + W <= n; i += W) {
        __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_si256((__m256i *)(void *)(dst + i), h);
    }
    for (; i < n; i++) {
        dst[i] = pmk_f32_to_f16_1(src[i]);
    }
}

/* Integer rounding (vcvtneps2bf16 would flush subnormals, so it is not used). */
static void pmk_f32_to_bf16_avx512(const float *src, uint16_t *dst, size_t n) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    const __m512i inf = _mm512_set1_epi32(0x7f800000);
    const __m512i round = _mm512_set1_epi32(0x7fff);
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i quiet = _mm512_set1_epi32(64);
    size_t i = 0;
    for (; i + W <= n; i += W) {
        __m512i u = _mm512_loadu_si512((const void *)(src + i));
        __m512i hi = _mm512_srli_epi32(u, 16);
        __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, abs_mask), inf);
        __m512i lsb = _mm512_and_si512(hi, one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(round, lsb)), 16);
        r = _mm512_mask_or_epi32(r, nan, hi, quiet);
        _mm256_storeu_si256((__m256i *)(void *)(dst + i), _mm512_cvtepi32_epi16(r));
    }
    for (; i < n; i++) {
        dst[i] = pmk_f32_to_bf16_1(src[i]);
    }
}

static void pmk_mask_row_avx512(float *dst, const pm_pos *cell_pos, const uint64_t *member,
                                size_t n, const pmk_mask_row *r) {
    pmk_mask_consts c;
    pmk_mask_prepare(r, &c);
    const __m512i zero = _mm512_setzero_si512();
    const __m512i p1 = _mm512_set1_epi32(c.p1);
    const __m512i nswa = _mm512_set1_epi32(c.nswa);
    const __m512i chunk = _mm512_set1_epi32(c.chunk_start);
    const __m512i half = _mm512_set1_epi32(c.half);
    const __m512i neg_half = _mm512_set1_epi32(-c.half);
    const __m512i span = _mm512_set1_epi32(c.span_min);
    const __m512 drop = _mm512_set1_ps(-INFINITY);
    size_t j = 0;
    for (; j + W <= n; j += W) {
        __m512i p0 = _mm512_loadu_si512((const void *)(cell_pos + j));
        __mmask16 keep = (__mmask16)((member[j >> 6] >> (j & 63u)) & 0xffffu);
        if (c.causal) {
            keep &= (__mmask16)~_mm512_cmpgt_epi32_mask(p0, p1);
        }
        if (c.swa != PMK_SWA_OFF) {
            __m512i d = _mm512_sub_epi32(p1, p0);
            __mmask16 masked;
            if (c.swa == PMK_SWA_STD) {
                masked = _mm512_cmpge_epi32_mask(d, nswa);
            } else if (c.swa == PMK_SWA_CHUNK) {
                masked = _mm512_cmplt_epi32_mask(p0, chunk);
            } else {
                masked = (__mmask16)(_mm512_cmplt_epi32_mask(d, neg_half) |
                                     _mm512_cmpgt_epi32_mask(d, half));
            }
            if (c.span_on) {
                masked &= _mm512_cmplt_epi32_mask(p0, span);
            }
            keep &= (__mmask16)~masked;
        }
        __m512 val = _mm512_setzero_ps();
        if (c.alibi) {
            __m512i ad = _mm512_abs_epi32(_mm512_sub_epi32(p0, p1));
            val = _mm512_cvtepi32_ps(_mm512_sub_epi32(zero, ad));
        }
        _mm512_storeu_ps(dst + j, _mm512_mask_blend_ps(keep, drop, val));
    }
    pmk_mask_range(dst, cell_pos, member, j, n, &c);
}

static void pmk_rope_f32_avx512(float *x, const float *cs, size_t n_pairs, int neox) {
    size_t i = 0;
    if (neox) {
        const __m512i even_idx =
            _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i odd_idx =
            _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        for (; i + W <= n_pairs; i += W) {
            __m512 lo = _mm512_loadu_ps(cs + 2 * i);
            __m512 hi = _mm512_loadu_ps(cs + 2 * i + W);
            __m512 c = _mm512_permutex2var_ps(lo, even_idx, hi);
            __m512 s = _mm512_permutex2var_ps(lo, odd_idx, hi);
            __m512 a = _mm512_loadu_ps(x + i);
            __m512 b = _mm512_loadu_ps(x + i + n_pairs);
            __m512 ra = _mm512_fmsub_ps(a, c, _mm512_mul_ps(b, s)); /* fmaf(a, c, -(b*s)) */
            __m512 rb = _mm512_fmadd_ps(a, s, _mm512_mul_ps(b, c)); /* fmaf(a, s, b*c) */
            _mm512_storeu_ps(x + i, ra);
            _mm512_storeu_ps(x + i + n_pairs, rb);
        }
    } else {
        /* 8 pairs per vector (see avx2.c): even lanes a*c - b*s, odd lanes a*s + b*c */
        for (; i + W / 2 <= n_pairs; i += W / 2) {
            __m512 v = _mm512_loadu_ps(x + 2 * i);
            __m512 t = _mm512_loadu_ps(cs + 2 * i);
            __m512 aa = _mm512_moveldup_ps(v);
            __m512 bb = _mm512_movehdup_ps(v);
            __m512 ts = _mm512_permute_ps(t, 0xb1);
            __m512 r = _mm512_fmaddsub_ps(aa, t, _mm512_mul_ps(bb, ts));
            _mm512_storeu_ps(x + 2 * i, r);
        }
    }
    pmk_rope_range(x, cs, i, n_pairs, neox);
}

/* Stages 1, 2, 4, 8 inside one vector of 16 (see avx2.c's pmk_fwht8). */
static inline __m512 pmk_fwht16(__m512 a) {
    __m512 b = _mm512_permute_ps(a, 0xb1);
    a = _mm512_mask_sub_ps(_mm512_add_ps(a, b), (__mmask16)0xaaaa, b, a);
    b = _mm512_permute_ps(a, 0x4e);
    a = _mm512_mask_sub_ps(_mm512_add_ps(a, b), (__mmask16)0xcccc, b, a);
    b = _mm512_shuffle_f32x4(a, a, 0xb1);
    a = _mm512_mask_sub_ps(_mm512_add_ps(a, b), (__mmask16)0xf0f0, b, a);
    b = _mm512_shuffle_f32x4(a, a, 0x4e);
    a = _mm512_mask_sub_ps(_mm512_add_ps(a, b), (__mmask16)0xff00, b, a);
    return a;
}

static void pmk_fwht_f32_avx512(float *x, size_t n, float scale) {
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
    const __m512 vs = _mm512_set1_ps(scale);
    for (size_t j = 0; j < n; j += W) {
        _mm512_storeu_ps(x + j, pmk_fwht16(_mm512_mul_ps(_mm512_loadu_ps(x + j), vs)));
    }
    for (size_t len = W; len < n; len <<= 1) {
        for (size_t i = 0; i < n; i += 2 * len) {
            for (size_t j = 0; j < len; j += W) {
                __m512 u = _mm512_loadu_ps(x + i + j);
                __m512 v = _mm512_loadu_ps(x + i + len + j);
                _mm512_storeu_ps(x + i + j, _mm512_add_ps(u, v));
                _mm512_storeu_ps(x + i + len + j, _mm512_sub_ps(u, v));
            }
        }
    }
}

#define PMK_COPY_HASH pmk_copy_hash_avx512
#include "copyhash.inc"

const pmk_table pmk_avx512 = {
    .name = "avx512",
    .needs = PMK_CPU_AVX2 | PMK_CPU_AVX512,
    .f16_to_f32 = pmk_f16_to_f32_avx512,
    .f32_to_f16 = pmk_f32_to_f16_avx512,
    .f32_to_bf16 = pmk_f32_to_bf16_avx512,
    .mask_row = pmk_mask_row_avx512,
    .rope_f32 = pmk_rope_f32_avx512,
    .fwht_f32 = pmk_fwht_f32_avx512,
    .copy_hash = pmk_copy_hash_avx512,
};

#else
typedef int pmk_avx512_unused; /* ISO C forbids an empty translation unit */
#endif
