/* types.c - cache element types: sizes and names, f16/bf16 conversion, quantized blocks.
 *
 * Block layouts and the arithmetic follow ggml (SPEC 8.9).  Blocks are read and written byte
 * by byte (little-endian), so rows need no alignment.  Two quantizer families:
 *  - pmi_quantize_row_ref: ggml's reference quantizers (ggml-quants.c, *_ref), including the
 *    x86 behaviour of their float -> small-int casts and their f16 rounding (NaN -> 0x7e00);
 *  - pmi_quantize_row: what llama.cpp's x86 CPU backend's from_float produces.  That is the
 *    reference for every type but q8_0, whose AVX2 version uses id = 127/amax and
 *    round-half-even (reproduced here in portable scalar code). */
#include "pm_internal.h"
#include "kernels/pmk_common.h"

#include <float.h>
#include <math.h>

#define QK 32

typedef struct pmi_type_info {
    int32_t id;
    const char *name;
    uint32_t block;
    uint32_t size;
    bool quantized;
} pmi_type_info;

static const pmi_type_info g_types[] = {
    {PM_TYPE_F32, "f32", 1, 4, false},     {PM_TYPE_F16, "f16", 1, 2, false},
    {PM_TYPE_Q4_0, "q4_0", 32, 18, true},  {PM_TYPE_Q4_1, "q4_1", 32, 20, true},
    {PM_TYPE_Q5_0, "q5_0", 32, 22, true},  {PM_TYPE_Q5_1, "q5_1", 32, 24, true},
    {PM_TYPE_Q8_0, "q8_0", 32, 34, true},  {PM_TYPE_IQ4_NL, "iq4_nl", 32, 18, true},
    {PM_TYPE_BF16, "bf16", 1, 2, false},
};

#define PMI_N_TYPES (sizeof g_types / sizeof g_types[0])

/* The non-uniform 4-bit grid of iq4_nl. */
static const int8_t g_iq4nl_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                          1,    13,   25,  38,  53,  69,  89,  113};

static const pmi_type_info *pmi_type_find(int32_t type) {
    for (size_t i = 0; i < PMI_N_TYPES; i++) {
        if (g_types[i].id == type) {
            return &g_types[i];
        }
    }
    return NULL;
}

/* ---- type table ----------------------------------------------------------------------- */

/* Is type one of the supported cache element types? */
bool pmi_type_known(int32_t type) { return pmi_type_find(type) != NULL; }

/* Is type a block-quantized type? (false for unknown types) */
bool pmi_type_is_quantized(int32_t type) {
    const pmi_type_info *t = pmi_type_find(type);
    return t != NULL && t->quantized;
}

/* Bytes of a row of n elements (caller guarantees a known type and n % block == 0). */
uint64_t pmi_row_size(int32_t type, uint64_t n) {
    const pmi_type_info *t = pmi_type_find(type);
    if (t == NULL) {
        return 0;
    }
    return (n / t->block) * t->size;
}

pm_status pm_type_row_size(int32_t type, uint64_t n, uint64_t *out) {
    if (out == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "type_row_size: out is NULL");
    }
    const pmi_type_info *t = pmi_type_find(type);
    if (t == NULL) {
        return pmi_fail(PM_E_UNSUPPORTED, "type_row_size: unsupported ggml type %d", (int)type);
    }
    if (n % t->block != 0) {
        return pmi_fail(PM_E_INVALID_ARG,
                        "type_row_size: %llu elements is not a multiple of the %s block (%u)",
                        (unsigned long long)n, t->name, (unsigned)t->block);
    }
    if (n / t->block > UINT64_MAX / t->size) {
        return pmi_fail(PM_E_INVALID_ARG, "type_row_size: %llu elements overflow",
                        (unsigned long long)n);
    }
    *out = (n / t->block) * t->size;
    return PM_OK;
}

uint32_t pm_type_block_size(int32_t type) {
    const pmi_type_info *t = pmi_type_find(type);
    return t != NULL ? t->block : 0;
}

uint32_t pm_type_size(int32_t type) {
    const pmi_type_info *t = pmi_type_find(type);
    return t != NULL ? t->size : 0;
}

const char *pm_type_name(int32_t type) {
    const pmi_type_info *t = pmi_type_find(type);
    return t != NULL ? t->name : "?";
}

static int pmi_ascii_lower(int c) { return (c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c; }

/* ggml type name (ASCII case-insensitive) -> id. */
pm_status pm_type_from_name(const char *name, int32_t *out) {
    if (name == NULL || out == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "type_from_name: NULL argument");
    }
    for (size_t i = 0; i < PMI_N_TYPES; i++) {
        const char *a = g_types[i].name;
        const char *b = name;
        while (*a != '\0' && pmi_ascii_lower((unsigned char)*b) == *a) {
            a++;
            b++;
        }
        if (*a == '\0' && *b == '\0') {
            *out = g_types[i].id;
            return PM_OK;
        }
    }
    return pmi_fail(PM_E_UNSUPPORTED, "type_from_name: unsupported type name '%.64s'", name);
}

/* ---- half precision ------------------------------------------------------------------- */

float pmi_f16_to_f32(uint16_t h) { return pmk_f16_to_f32_1(h); }
uint16_t pmi_f32_to_f16(float f) { return pmk_f32_to_f16_1(f); }
float pmi_bf16_to_f32(uint16_t h) { return pmk_bf16_to_f32_1(h); }
uint16_t pmi_f32_to_bf16(float f) { return pmk_f32_to_bf16_1(f); }

/* ggml's portable GGML_FP32_TO_FP16 (used by ggml-quants.c): round to nearest even like
 * pmi_f32_to_f16, but every NaN becomes sign | 0x7e00. */
static uint16_t pmi_f32_to_f16_ggml(float f) {
    uint32_t u = pmk_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (uint16_t)(((u >> 16) & 0x8000u) | 0x7e00u);
    }
    return pmk_f32_to_f16_1(f);
}

static float pmi_rd_f16(const uint8_t *p) {
    return pmk_f16_to_f32_1((uint16_t)(p[0] | (p[1] << 8)));
}

static void pmi_wr_f16(uint8_t *p, uint16_t h) {
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}

/* ---- float -> small integer, as x86 compilers emit it --------------------------------- */

/* cvttss2si: truncate toward zero; NaN or out of int32 range -> INT32_MIN. */
static int32_t pmi_cvtt_i32(float v) {
    if (v > -2147483904.0f && v < 2147483648.0f) {
        return (int32_t)v;
    }
    return INT32_MIN;
}

/* (int8_t)v and (uint8_t)v for a float v: the low byte of the 32-bit truncation (C leaves
 * out-of-range conversions undefined; this is what gcc and clang produce on x86-64). */
static int pmi_f2i8(float v) {
    uint32_t b = (uint32_t)pmi_cvtt_i32(v) & 0xffu;
    return b < 128u ? (int)b : (int)b - 256;
}

static uint8_t pmi_f2u8(float v) { return (uint8_t)((uint32_t)pmi_cvtt_i32(v) & 0xffu); }

/* ---- reference quantizers (ggml-quants.c *_ref) ---------------------------------------- */

/* q4_0 / q5_0: d = v / -(2^(bits-1)) where v is the first element of largest magnitude. */
static void pmi_q_x_0_ref(const float *x, uint8_t *y, int bits) {
    float amax = 0.0f;
    float max = 0.0f;
    for (int j = 0; j < QK; j++) {
        float v = x[j];
        if (amax < fabsf(v)) {
            amax = fabsf(v);
            max = v;
        }
    }
    const int lev = bits == 4 ? 8 : 16;
    const float d = max / (float)-lev;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const float off = bits == 4 ? 8.5f : 16.5f;
    const int top = bits == 4 ? 15 : 31;
    pmi_wr_f16(y, pmi_f32_to_f16_ggml(d));
    uint8_t *qs = bits == 4 ? y + 2 : y + 6;
    uint32_t qh = 0;
    for (int j = 0; j < QK / 2; j++) {
        int v0 = pmi_f2i8(x[j] * id + off);
        int v1 = pmi_f2i8(x[QK / 2 + j] * id + off);
        uint8_t xi0 = (uint8_t)(top < v0 ? top : v0);
        uint8_t xi1 = (uint8_t)(top < v1 ? top : v1);
        if (bits == 4) {
            qs[j] = (uint8_t)(xi0 | (xi1 << 4));
        } else {
            qs[j] = (uint8_t)((xi0 & 0x0fu) | ((xi1 & 0x0fu) << 4));
            qh |= ((xi0 & 0x10u) >> 4) << j;
            qh |= ((xi1 & 0x10u) >> 4) << (j + QK / 2);
        }
    }
    if (bits == 5) {
        pmi_wr_u32(y + 2, qh);
    }
}

/* q4_1 / q5_1: d = (max - min) / (2^bits - 1), m = min. */
static void pmi_q_x_1_ref(const float *x, uint8_t *y, int bits) {
    float min = FLT_MAX;
    float max = -FLT_MAX;
    for (int j = 0; j < QK; j++) {
        float v = x[j];
        if (v < min) {
            min = v;
        }
        if (v > max) {
            max = v;
        }
    }
    const float d = (max - min) / (float)((1 << bits) - 1);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    pmi_wr_f16(y, pmi_f32_to_f16_ggml(d));
    pmi_wr_f16(y + 2, pmi_f32_to_f16_ggml(min));
    uint8_t *qs = bits == 4 ? y + 4 : y + 8;
    uint32_t qh = 0;
    for (int j = 0; j < QK / 2; j++) {
        float x0 = (x[j] - min) * id;
        float x1 = (x[QK / 2 + j] - min) * id;
        if (bits == 4) {
            int v0 = pmi_f2i8(x0 + 0.5f);
            int v1 = pmi_f2i8(x1 + 0.5f);
            uint8_t xi0 = (uint8_t)(15 < v0 ? 15 : v0);
            uint8_t xi1 = (uint8_t)(15 < v1 ? 15 : v1);
            qs[j] = (uint8_t)(xi0 | (xi1 << 4));
        } else {
            uint8_t xi0 = pmi_f2u8(x0 + 0.5f);
            uint8_t xi1 = pmi_f2u8(x1 + 0.5f);
            qs[j] = (uint8_t)((xi0 & 0x0fu) | ((xi1 & 0x0fu) << 4));
            qh |= ((xi0 & 0x10u) >> 4) << j;
            qh |= ((xi1 & 0x10u) >> 4) << (j + QK / 2);
        }
    }
    if (bits == 5) {
        pmi_wr_u32(y + 4, qh);
    }
}

/* q8_0 reference: d = amax / 127, q = roundf(x / d) (half away from zero). */
static void pmi_q8_0_ref(const float *x, uint8_t *y) {
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) {
        float a = fabsf(x[j]);
        amax = amax > a ? amax : a; /* ggml's MAX(amax, a) */
    }
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    pmi_wr_f16(y, pmi_f32_to_f16_ggml(d));
    for (int j = 0; j < QK; j++) {
        y[2 + j] = (uint8_t)pmi_f2i8(roundf(x[j] * id));
    }
}

/* Index of the grid value nearest to x (ggml's best_index_int8; ties go up). */
static int pmi_iq4nl_index(float x) {
    const int8_t *val = g_iq4nl_values;
    if (x <= val[0]) {
        return 0;
    }
    if (x >= val[15]) {
        return 15;
    }
    int ml = 0, mu = 15;
    while (mu - ml > 1) {
        int mav = (ml + mu) / 2;
        if (x < val[mav]) {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    return x - val[mu - 1] < val[mu] - x ? mu - 1 : mu;
}

/* One iq4_nl block: ggml's quantize_row_iq4_nl_impl with a super block of one 32-element
 * block and no importance weights (weights x^2).  ntry <= 0 (the reference, -1): the
 * least-squares scale of the initial grid assignment; ntry > 0: also try ntry*2+1 other
 * scales and re-assign with the best.  L carries over between blocks: ggml leaves L untouched
 * for an all-(near-)zero block, so such a block repeats the previous block's indices (L starts
 * zeroed here; in ggml it is uninitialised stack for a row's first block). */
static void pmi_iq4nl_block(const float *x, uint8_t *y, uint8_t L[QK], int ntry) {
    const int8_t *values = g_iq4nl_values;
    float weight[QK];
    float scale = 0.0f;
    for (int j = 0; j < QK; j++) {
        weight[j] = x[j] * x[j];
    }
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; j++) {
        float ax = fabsf(x[j]);
        if (ax > amax) {
            amax = ax;
            max = x[j];
        }
    }
    if (!(amax < 1e-15f)) {
        float d = ntry > 0 ? -max / values[0] : max / values[0];
        float id = 1 / d;
        float sumqx = 0, sumq2 = 0;
        for (int j = 0; j < QK; j++) {
            float al = id * x[j];
            int l = pmi_iq4nl_index(al);
            L[j] = (uint8_t)l;
            float q = values[l];
            float w = weight[j];
            sumqx += w * q * x[j];
            sumq2 += w * q * q;
        }
        d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
        float best = d * sumqx;
        for (int itry = -ntry; itry <= ntry; ++itry) {
            id = (itry + values[0]) / max;
            sumqx = sumq2 = 0;
            for (int j = 0; j < QK; j++) {
                float al = id * x[j];
                int l = pmi_iq4nl_index(al);
                float q = values[l];
                float w = weight[j];
                sumqx += w * q * x[j];
                sumq2 += w * q * q;
            }
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scale = d;
    }
    pmi_wr_f16(y, pmi_f32_to_f16_ggml(scale));
    if (ntry > 0) {
        float id = scale != 0.0f ? 1 / scale : 0;
        for (int j = 0; j < QK; j++) {
            L[j] = (uint8_t)pmi_iq4nl_index(id * x[j]);
        }
    }
    for (int j = 0; j < QK / 2; j++) {
        y[2 + j] = (uint8_t)(L[j] | (L[QK / 2 + j] << 4));
    }
}

/* ---- x86 CPU backend q8_0 (AVX2 from_float) -------------------------------------------- */

/* maxps(a, b): a > b ? a : b (the second operand wins on NaN and on equality). */
static float pmi_maxps(float a, float b) { return a > b ? a : b; }

/* Round to nearest, ties to even, independent of the current rounding mode. */
static float pmi_round_even(float v) {
    if (!(fabsf(v) < 8388608.0f)) {
        return v; /* integral already, or inf / NaN */
    }
    float f = floorf(v);
    float diff = v - f; /* exact */
    if (diff > 0.5f || (diff == 0.5f && (pmi_cvtt_i32(f) & 1) != 0)) {
        f += 1.0f;
    }
    return f;
}

/* The AVX2 quantize_row_q8_0 of ggml-cpu/arch/x86/quants.c, lane for lane: amax by the same
 * max tree, d = amax / 127 (stored through F16C), id = 127 / amax, q = round-half-even(x*id)
 * converted with cvtps2dq (NaN / out of range -> INT32_MIN) and saturated to int8. */
static void pmi_q8_0_x86(const float *x, uint8_t *y) {
    float m[8];
    for (int l = 0; l < 8; l++) {
        m[l] = fabsf(x[l]);
    }
    for (int v = 1; v < 4; v++) {
        for (int l = 0; l < 8; l++) {
            m[l] = pmi_maxps(m[l], fabsf(x[8 * v + l]));
        }
    }
    float m4[4];
    for (int l = 0; l < 4; l++) {
        m4[l] = pmi_maxps(m[4 + l], m[l]);
    }
    float t0 = pmi_maxps(m4[0], m4[2]);
    float t1 = pmi_maxps(m4[1], m4[3]);
    const float amax = pmi_maxps(t0, t1);
    const float d = amax / 127.f;
    pmi_wr_f16(y, pmk_f32_to_f16_1(d));
    const float id = amax != 0.0f ? 127.f / amax : 0.0f;
    for (int j = 0; j < QK; j++) {
        float r = pmi_round_even(x[j] * id);
        int32_t q = (r >= -2147483648.0f && r < 2147483648.0f) ? (int32_t)r : INT32_MIN;
        q = q < -128 ? -128 : (q > 127 ? 127 : q);
        y[2 + j] = (uint8_t)(q & 0xff);
    }
}

/* ---- rows ------------------------------------------------------------------------------ */

void pmi_quantize_row_ref(int32_t type, const float *src, void *dst, uint64_t n) {
    uint8_t *y = (uint8_t *)dst;
    const uint64_t nb = n / QK;
    switch (type) {
    case PM_TYPE_F32: memcpy(dst, src, (size_t)n * sizeof(float)); return;
    case PM_TYPE_F16:
        for (uint64_t i = 0; i < n; i++) {
            pmi_wr_f16(y + 2 * i, pmi_f32_to_f16_ggml(src[i]));
        }
        return;
    case PM_TYPE_BF16:
        for (uint64_t i = 0; i < n; i++) {
            pmi_wr_f16(y + 2 * i, pmk_f32_to_bf16_1(src[i]));
        }
        return;
    case PM_TYPE_Q4_0:
        for (uint64_t b = 0; b < nb; b++) {
            pmi_q_x_0_ref(src + b * QK, y + b * 18, 4);
        }
        return;
    case PM_TYPE_Q5_0:
        for (uint64_t b = 0; b < nb; b++) {
            pmi_q_x_0_ref(src + b * QK, y + b * 22, 5);
        }
        return;
    case PM_TYPE_Q4_1:
        for (uint64_t b = 0; b < nb; b++) {
            pmi_q_x_1_ref(src + b * QK, y + b * 20, 4);
        }
        return;
    case PM_TYPE_Q5_1:
        for (uint64_t b = 0; b < nb; b++) {
            pmi_q_x_1_ref(src + b * QK, y + b * 24, 5);
        }
        return;
    case PM_TYPE_Q8_0:
        for (uint64_t b = 0; b < nb; b++) {
            pmi_q8_0_ref(src + b * QK, y + b * 34);
        }
        return;
    case PM_TYPE_IQ4_NL: {
        uint8_t L[QK] = {0};
        for (uint64_t b = 0; b < nb; b++) {
            pmi_iq4nl_block(src + b * QK, y + b * 18, L, -1);
        }
        return;
    }
    default: return;
    }
}

void pmi_quantize_row(int32_t type, const float *src, void *dst, uint64_t n) {
    const pmk_table *k = pmk_get();
    switch (type) {
    case PM_TYPE_F32: memcpy(dst, src, (size_t)n * sizeof(float)); return;
    case PM_TYPE_F16:
        if (((uintptr_t)dst & 1u) == 0) {
            k->f32_to_f16(src, (uint16_t *)dst, (size_t)n);
        } else {
            for (uint64_t i = 0; i < n; i++) {
                pmi_wr_f16((uint8_t *)dst + 2 * i, pmk_f32_to_f16_1(src[i]));
            }
        }
        return;
    case PM_TYPE_BF16:
        if (((uintptr_t)dst & 1u) == 0) {
            k->f32_to_bf16(src, (uint16_t *)dst, (size_t)n);
        } else {
            for (uint64_t i = 0; i < n; i++) {
                pmi_wr_f16((uint8_t *)dst + 2 * i, pmk_f32_to_bf16_1(src[i]));
            }
        }
        return;
    case PM_TYPE_Q8_0: {
        uint8_t *y = (uint8_t *)dst;
        for (uint64_t b = 0; b < n / QK; b++) {
            pmi_q8_0_x86(src + b * QK, y + b * 34);
        }
        return;
    }
    default: pmi_quantize_row_ref(type, src, dst, n); return;
    }
}

void pmi_dequantize_row(int32_t type, const void *src, float *dst, uint64_t n) {
    const uint8_t *x = (const uint8_t *)src;
    const uint64_t nb = n / QK;
    switch (type) {
    case PM_TYPE_F32: memcpy(dst, src, (size_t)n * sizeof(float)); return;
    case PM_TYPE_F16:
        if (((uintptr_t)src & 1u) == 0) {
            pmk_get()->f16_to_f32((const uint16_t *)src, dst, (size_t)n);
        } else {
            for (uint64_t i = 0; i < n; i++) {
                dst[i] = pmi_rd_f16(x + 2 * i);
            }
        }
        return;
    case PM_TYPE_BF16:
        for (uint64_t i = 0; i < n; i++) {
            dst[i] = pmk_bf16_to_f32_1((uint16_t)(x[2 * i] | (x[2 * i + 1] << 8)));
        }
        return;
    case PM_TYPE_Q4_0:
        for (uint64_t b = 0; b < nb; b++, x += 18, dst += QK) {
            const float d = pmi_rd_f16(x);
            for (int j = 0; j < QK / 2; j++) {
                dst[j] = (float)((x[2 + j] & 0x0f) - 8) * d;
                dst[j + QK / 2] = (float)((x[2 + j] >> 4) - 8) * d;
            }
        }
        return;
    case PM_TYPE_Q4_1:
        for (uint64_t b = 0; b < nb; b++, x += 20, dst += QK) {
            const float d = pmi_rd_f16(x);
            const float m = pmi_rd_f16(x + 2);
            for (int j = 0; j < QK / 2; j++) {
                dst[j] = (float)(x[4 + j] & 0x0f) * d + m;
                dst[j + QK / 2] = (float)(x[4 + j] >> 4) * d + m;
            }
        }
        return;
    case PM_TYPE_Q5_0:
        for (uint64_t b = 0; b < nb; b++, x += 22, dst += QK) {
            const float d = pmi_rd_f16(x);
            const uint32_t qh = pmi_rd_u32(x + 2);
            for (int j = 0; j < QK / 2; j++) {
                int h0 = (int)((qh >> j) & 1u) << 4;
                int h1 = (int)((qh >> (j + 16)) & 1u) << 4;
                dst[j] = (float)(((x[6 + j] & 0x0f) | h0) - 16) * d;
                dst[j + QK / 2] = (float)(((x[6 + j] >> 4) | h1) - 16) * d;
            }
        }
        return;
    case PM_TYPE_Q5_1:
        for (uint64_t b = 0; b < nb; b++, x += 24, dst += QK) {
            const float d = pmi_rd_f16(x);
            const float m = pmi_rd_f16(x + 2);
            const uint32_t qh = pmi_rd_u32(x + 4);
            for (int j = 0; j < QK / 2; j++) {
                int h0 = (int)((qh >> j) & 1u) << 4;
                int h1 = (int)((qh >> (j + 16)) & 1u) << 4;
                dst[j] = (float)((x[8 + j] & 0x0f) | h0) * d + m;
                dst[j + QK / 2] = (float)((x[8 + j] >> 4) | h1) * d + m;
            }
        }
        return;
    case PM_TYPE_Q8_0:
        for (uint64_t b = 0; b < nb; b++, x += 34, dst += QK) {
            const float d = pmi_rd_f16(x);
            for (int j = 0; j < QK; j++) {
                int q = x[2 + j] < 128 ? (int)x[2 + j] : (int)x[2 + j] - 256;
                dst[j] = (float)q * d;
            }
        }
        return;
    case PM_TYPE_IQ4_NL:
        for (uint64_t b = 0; b < nb; b++, x += 18, dst += QK) {
            const float d = pmi_rd_f16(x);
            for (int j = 0; j < QK / 2; j++) {
                dst[j] = d * (float)g_iq4nl_values[x[2 + j] & 0x0f];
                dst[j + QK / 2] = d * (float)g_iq4nl_values[x[2 + j] >> 4];
            }
        }
        return;
    default: return;
    }
}

/* ---- public conversions ------------------------------------------------------------------ */

static pm_status pmi_conv_check(const char *what, int32_t type, const void *a, const void *b,
                                uint64_t n) {
    const pmi_type_info *t = pmi_type_find(type);
    if (t == NULL) {
        return pmi_fail(PM_E_UNSUPPORTED, "%s: unsupported ggml type %d", what, (int)type);
    }
    if (n % t->block != 0) {
        return pmi_fail(PM_E_INVALID_ARG,
                        "%s: %llu elements is not a multiple of the %s block (%u)", what,
                        (unsigned long long)n, t->name, (unsigned)t->block);
    }
    if (n > (uint64_t)(SIZE_MAX / sizeof(float))) {
        return pmi_fail(PM_E_INVALID_ARG, "%s: %llu elements is too many", what,
                        (unsigned long long)n);
    }
    if (n != 0 && (a == NULL || b == NULL)) {
        return pmi_fail(PM_E_INVALID_ARG, "%s: NULL buffer", what);
    }
    return PM_OK;
}

/* n float32 values -> one row of type (the x86 CPU backend's from_float; f16/bf16 through
 * the active kernel table). */
pm_status pm_type_from_float(int32_t type, const float *src, void *dst, uint64_t n) {
    pm_status st = pmi_conv_check("type_from_float", type, src, dst, n);
    if (st != PM_OK) {
        return st;
    }
    if (n != 0) {
        pmi_quantize_row(type, src, dst, n);
    }
    return PM_OK;
}

/* One row of type -> n float32 values. */
pm_status pm_type_to_float(int32_t type, const void *src, float *dst, uint64_t n) {
    pm_status st = pmi_conv_check("type_to_float", type, src, dst, n);
    if (st != PM_OK) {
        return st;
    }
    if (n != 0) {
        pmi_dequantize_row(type, src, dst, n);
    }
    return PM_OK;
}
