/* pmk_common.h - element-wise rules shared by every kernel file and by types.c (private).
 *
 * The scalar kernels are built from these helpers, and the SIMD kernels use them for their
 * tails, so one definition fixes the result of every path.  Integer-only where possible, so the
 * results do not depend on the floating-point environment. */
#ifndef PMK_COMMON_H
#define PMK_COMMON_H

#include "kernels/kernels.h"

#include <math.h>

static inline uint32_t pmk_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float pmk_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Two's-complement reinterpretation of u as int32 without implementation-defined casts. */
static inline int32_t pmk_wrap_i32(uint32_t u) {
    return u <= (uint32_t)INT32_MAX ? (int32_t)u : (int32_t)(u - 2147483648u) - INT32_MAX - 1;
}

/* IEEE binary16 -> binary32, exact.  NaNs keep their payload and become quiet, as F16C's
 * vcvtph2ps and AArch64's fcvt do. */
static inline float pmk_f16_to_f32_1(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0x1fu) {
        bits = sign | 0x7f800000u | (m != 0 ? 0x00400000u | (m << 13) : 0u);
    } else if (e != 0) {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    } else if (m == 0) {
        bits = sign;
    } else {
        /* subnormal half: normalise the mantissa */
        uint32_t ex = 113u; /* exponent of 2^-14 in binary32, minus the shifts below */
        while ((m & 0x400u) == 0) {
            m <<= 1;
            ex--;
        }
        bits = sign | (ex << 23) | ((m & 0x3ffu) << 13);
    }
    return pmk_bits_f32(bits);
}

/* binary32 -> binary16, round to nearest even (subnormals, overflow to infinity).  NaNs keep
 * the top 10 payload bits and become quiet, as F16C's vcvtps2ph and AArch64's fcvt do. */
static inline uint16_t pmk_f32_to_f16_1(float f) {
    uint32_t x = pmk_f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) {
        return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    }
    if (ax >= 0x477ff000u) { /* >= 65520: rounds to infinity (includes infinity) */
        return (uint16_t)(sign | 0x7c00u);
    }
    if (ax >= 0x38800000u) { /* >= 2^-14: normal half */
        uint32_t odd = (ax >> 13) & 1u;
        ax += 0xc8000fffu + odd; /* rebias the exponent by -112 and round half to even */
        return (uint16_t)(sign | (ax >> 13));
    }
    /* subnormal half or zero: round(|f| * 2^24) to nearest even */
    uint32_t e = ax >> 23;
    if (e < 102u) { /* |f| < 2^-25: rounds to zero */
        return (uint16_t)sign;
    }
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e; /* 14 .. 24 */
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) {
        q++;
    }
    return (uint16_t)(sign | q);
}

/* binary32 -> bfloat16 with ggml's rule (SPEC 8.9): NaN -> (bits >> 16) | 64, else round to
 * nearest even on the upper 16 bits. */
static inline uint16_t pmk_f32_to_bf16_1(float f) {
    uint32_t u = pmk_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (uint16_t)((u >> 16) | 64u);
    }
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

static inline float pmk_bf16_to_f32_1(uint16_t h) { return pmk_bits_f32((uint32_t)h << 16); }

/* ---- KQ-mask rule, prepared once per row ---------------------------------------------- */

enum { PMK_SWA_OFF = 0, PMK_SWA_STD = 1, PMK_SWA_CHUNK = 2, PMK_SWA_SYM = 3 };

typedef struct pmk_mask_consts {
    int32_t p1;
    int causal;
    int swa;              /* PMK_SWA_* */
    int32_t nswa;         /* STANDARD: (int32)n_swa */
    int32_t chunk_start;  /* CHUNKED: (int32)(((uint32)p1 / n_swa) * n_swa) */
    int32_t half;         /* SYMMETRIC: (int32)n_swa / 2 */
    int span_on;          /* span_min != INT32_MAX */
    int32_t span_min;
    int alibi;
} pmk_mask_consts;

/* Per-row constants.  CHUNKED with n_swa == 0 (a division by zero in llama.cpp) masks
 * nothing; unknown SWA types mask nothing (llama.cpp's switch has no case for them). */
static inline void pmk_mask_prepare(const pmk_mask_row *r, pmk_mask_consts *c) {
    c->p1 = r->p1;
    c->causal = r->causal != 0;
    c->swa = PMK_SWA_OFF;
    c->nswa = pmk_wrap_i32(r->n_swa);
    c->chunk_start = INT32_MIN;
    c->half = c->nswa / 2;
    c->span_on = r->span_min != INT32_MAX;
    c->span_min = r->span_min;
    c->alibi = r->alibi != 0;
    switch (r->swa_type) {
    case PM_SWA_STANDARD: c->swa = PMK_SWA_STD; break;
    case PM_SWA_CHUNKED:
        c->swa = PMK_SWA_CHUNK;
        if (r->n_swa != 0) {
            uint32_t up1 = (uint32_t)r->p1;
            c->chunk_start = pmk_wrap_i32((up1 / r->n_swa) * r->n_swa);
        }
        break;
    case PM_SWA_SYMMETRIC: c->swa = PMK_SWA_SYM; break;
    default: break;
    }
}

/* Value of the cell at position p0 whose sequence bit is `member` (0 or 1). */
static inline float pmk_mask_cell(const pmk_mask_consts *c, int32_t p0, uint32_t member) {
    if (!member) {
        return -INFINITY;
    }
    if (c->causal && p0 > c->p1) {
        return -INFINITY;
    }
    if (c->swa != PMK_SWA_OFF && !(c->span_on && p0 >= c->span_min)) {
        int32_t d = pmk_wrap_i32((uint32_t)c->p1 - (uint32_t)p0);
        int masked = 0;
        switch (c->swa) {
        case PMK_SWA_STD: masked = d >= c->nswa; break;
        case PMK_SWA_CHUNK: masked = p0 < c->chunk_start; break;
        case PMK_SWA_SYM: masked = d < -c->half || d > c->half; break;
        default: break;
        }
        if (masked) {
            return -INFINITY;
        }
    }
    if (!c->alibi) {
        return 0.0f;
    }
    /* llama.cpp: (float)(-abs(p0 - p1)), in wrapping 32-bit arithmetic */
    uint32_t du = (uint32_t)p0 - (uint32_t)c->p1;
    uint32_t ad = (du >> 31) ? 0u - du : du;
    return (float)pmk_wrap_i32(0u - ad);
}

/* Bit j of the membership words. */
static inline uint32_t pmk_member_bit(const uint64_t *member, size_t j) {
    return (uint32_t)((member[j >> 6] >> (j & 63u)) & 1u);
}

/* ---- scalar reference loops (scalar.c; SIMD tails) ------------------------------------ */

static inline void pmk_mask_range(float *dst, const pm_pos *cell_pos, const uint64_t *member,
                                  size_t j0, size_t n, const pmk_mask_consts *c) {
    for (size_t j = j0; j < n; j++) {
        dst[j] = pmk_mask_cell(c, cell_pos[j], pmk_member_bit(member, j));
    }
}

/* Pairs i0 .. n_pairs-1 of the rotation: with (a, b) the pair and (c, s) = cs[2i], cs[2i+1],
 *   x[ia] = fmaf(a, c, -(b*s)),  x[ib] = fmaf(a, s, b*c).
 * This is what llama.cpp's x86 CPU backend computes in ggml-cpu's rotate_pairs (its C++ is
 * built with FMA and contracts a*c - b*s that way; checked bit for bit against the b11739
 * wheel).  The SIMD kernels use the same fused operations (vfmsub/vfmadd/vfmaddsub, NEON
 * vfma), which round exactly like fmaf. */
static inline void pmk_rope_range(float *x, const float *cs, size_t i0, size_t n_pairs,
                                  int neox) {
    for (size_t i = i0; i < n_pairs; i++) {
        size_t ia = neox ? i : 2 * i;
        size_t ib = neox ? i + n_pairs : 2 * i + 1;
        float a = x[ia];
        float b = x[ib];
        float c = cs[2 * i];
        float s = cs[2 * i + 1];
        float bs = b * s;
        float bc = b * c;
        x[ia] = fmaf(a, c, -bs);
        x[ib] = fmaf(a, s, bc);
    }
}

/* One butterfly stage of width len over x[0..n). */
static inline void pmk_fwht_stage(float *x, size_t n, size_t len) {
    for (size_t i = 0; i < n; i += 2 * len) {
        for (size_t j = 0; j < len; j++) {
            float u = x[i + j];
            float v = x[i + len + j];
            x[i + j] = u + v;
            x[i + len + j] = u - v;
        }
    }
}

static inline int pmk_is_pow2(size_t n) { return n != 0 && (n & (n - 1)) == 0; }

#endif /* PMK_COMMON_H */
