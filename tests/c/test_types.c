/* test_types.c - type table, f16/bf16 conversion, quantization (types.c) and status.c. */
#include "check.h"
#include "pm_internal.h"
#include "type_vectors.h"

#include <float.h>
#include <stdlib.h>

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- type table (SPEC 8.9) ---------------------------------------------------------------- */

static void test_type_table(void) {
    static const struct {
        int32_t id;
        const char *name;
        uint32_t block, size;
        bool quant;
    } t[] = {
        {0, "f32", 1, 4, false},    {1, "f16", 1, 2, false},      {2, "q4_0", 32, 18, true},
        {3, "q4_1", 32, 20, true},  {6, "q5_0", 32, 22, true},    {7, "q5_1", 32, 24, true},
        {8, "q8_0", 32, 34, true},  {20, "iq4_nl", 32, 18, true}, {30, "bf16", 1, 2, false},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        CHECK(pmi_type_known(t[i].id));
        CHECK_EQ_INT(pmi_type_is_quantized(t[i].id), t[i].quant);
        CHECK_EQ_INT(pm_type_block_size(t[i].id), t[i].block);
        CHECK_EQ_INT(pm_type_size(t[i].id), t[i].size);
        CHECK_EQ_STR(pm_type_name(t[i].id), t[i].name);
        int32_t id = -1;
        CHECK_EQ_INT(pm_type_from_name(t[i].name, &id), PM_OK);
        CHECK_EQ_INT(id, t[i].id);
        uint64_t rs = 0;
        CHECK_EQ_INT(pm_type_row_size(t[i].id, 128, &rs), PM_OK);
        CHECK_EQ_U64(rs, 128 / t[i].block * t[i].size);
        CHECK_EQ_U64(pmi_row_size(t[i].id, 4096), 4096 / t[i].block * t[i].size);
        CHECK_EQ_INT(pm_type_row_size(t[i].id, 0, &rs), PM_OK);
        CHECK_EQ_U64(rs, 0);
        if (t[i].block > 1) {
            CHECK_EQ_INT(pm_type_row_size(t[i].id, 48, &rs), PM_E_INVALID_ARG);
            CHECK(strlen(pm_last_error()) > 0);
        }
    }
    /* well-known row sizes: 128-wide heads */
    uint64_t rs = 0;
    CHECK_EQ_INT(pm_type_row_size(PM_TYPE_Q8_0, 128, &rs), PM_OK);
    CHECK_EQ_U64(rs, 136);
    CHECK_EQ_INT(pm_type_row_size(PM_TYPE_Q4_0, 4096, &rs), PM_OK);
    CHECK_EQ_U64(rs, 2304);
    /* other ggml ids are not supported */
    static const int32_t bad[] = {-1, 4, 5, 9, 10, 15, 16, 19, 21, 23, 24, 28, 29, 31, 39, 1000};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK(!pmi_type_known(bad[i]));
        CHECK(!pmi_type_is_quantized(bad[i]));
        CHECK_EQ_INT(pm_type_block_size(bad[i]), 0);
        CHECK_EQ_INT(pm_type_size(bad[i]), 0);
        CHECK_EQ_STR(pm_type_name(bad[i]), "?");
        CHECK_EQ_INT(pm_type_row_size(bad[i], 32, &rs), PM_E_UNSUPPORTED);
    }
    CHECK_EQ_INT(pm_type_row_size(PM_TYPE_F32, 32, NULL), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_type_row_size(PM_TYPE_F32, UINT64_MAX / 2, &rs), PM_E_INVALID_ARG);
    int32_t id = 77;
    CHECK_EQ_INT(pm_type_from_name("Q8_0", &id), PM_OK);
    CHECK_EQ_INT(id, PM_TYPE_Q8_0);
    CHECK_EQ_INT(pm_type_from_name("BF16", &id), PM_OK);
    CHECK_EQ_INT(id, PM_TYPE_BF16);
    CHECK_EQ_INT(pm_type_from_name("q8", &id), PM_E_UNSUPPORTED);
    CHECK_EQ_INT(pm_type_from_name("q8_0x", &id), PM_E_UNSUPPORTED);
    CHECK_EQ_INT(pm_type_from_name("", &id), PM_E_UNSUPPORTED);
    CHECK_EQ_INT(pm_type_from_name("q4_k", &id), PM_E_UNSUPPORTED);
    CHECK_EQ_INT(id, PM_TYPE_BF16); /* untouched on failure */
    CHECK_EQ_INT(pm_type_from_name(NULL, &id), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_type_from_name("f16", NULL), PM_E_INVALID_ARG);
}

/* ---- f16 ------------------------------------------------------------------------------- */

static void test_f16_known(void) {
    static const struct {
        uint32_t f;
        uint16_t h;
    } kv[] = {
        {0x00000000u, 0x0000}, {0x80000000u, 0x8000}, {0x3f800000u, 0x3c00}, /* 1 */
        {0xc0000000u, 0xc000},                                              /* -2 */
        {0x477fe000u, 0x7bff},                                              /* 65504 */
        {0x477fefffu, 0x7bff}, {0x477ff000u, 0x7c00}, /* 65520 ties up to inf */
        {0x7f800000u, 0x7c00}, {0xff800000u, 0xfc00}, {0x7f7fffffu, 0x7c00},
        {0x38800000u, 0x0400}, /* 2^-14, smallest normal */
        {0x33800000u, 0x0001}, /* 2^-24, smallest subnormal */
        {0x33000000u, 0x0000}, /* 2^-25: tie to even (0) */
        {0x33000001u, 0x0001}, /* just above the tie */
        {0x33c00000u, 0x0002}, /* 1.5 * 2^-24: tie to even (2) */
        {0x34200000u, 0x0002}, /* 2.5 * 2^-24: tie to even (2) */
        {0x34400000u, 0x0003}, /* 3 * 2^-24 */
        {0x33a00000u, 0x0001}, /* 1.25 * 2^-24 */
        {0x387fc000u, 0x03ff}, /* largest subnormal */
        {0x387fe000u, 0x0400}, /* tie between largest subnormal and 2^-14: even */
        {0x3dcccccdu, 0x2e66}, /* 0.1 */
        {0x3eaaaaabu, 0x3555}, /* 1/3 */
        {0x40490fdbu, 0x4248}, /* pi */
        {0x3f801000u, 0x3c00}, /* 1 + 2^-11: tie to even (down) */
        {0x3f803000u, 0x3c02}, /* 1 + 3*2^-11: tie to even (up) */
        {0x7fc00000u, 0x7e00}, {0xffc00000u, 0xfe00},
        {0x7f800001u, 0x7e00}, /* signalling NaN, payload below the kept bits */
        {0x7f802000u, 0x7e01}, /* payload bit kept, quiet bit set */
        {0x7fffe000u, 0x7fff},
    };
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++) {
        uint16_t h = pmi_f32_to_f16(float_of(kv[i].f));
        CHECK_MSG(h == kv[i].h, "f32 0x%08x -> 0x%04x, expected 0x%04x", (unsigned)kv[i].f,
                  (unsigned)h, (unsigned)kv[i].h);
    }
    CHECK(pmi_f16_to_f32(0x3c00) == 1.0f);
    CHECK(pmi_f16_to_f32(0x0001) == 0x1p-24f);
    CHECK(pmi_f16_to_f32(0x03ff) == 1023 * 0x1p-24f);
    CHECK(pmi_f16_to_f32(0x7bff) == 65504.0f);
    CHECK(pmi_f16_to_f32(0xfc00) == -INFINITY);
    CHECK_EQ_U64(bits_of(pmi_f16_to_f32(0x8000)), 0x80000000u);
    CHECK_EQ_U64(bits_of(pmi_f16_to_f32(0x7e00)), 0x7fc00000u);
    CHECK_EQ_U64(bits_of(pmi_f16_to_f32(0x7c01)), 0x7fc02000u); /* signalling -> quiet */
    CHECK_EQ_U64(bits_of(pmi_f16_to_f32(0xfd55)), 0xffeaa000u);
}

/* Every half value: exact widening (checked against ldexp), and narrowing gives it back. */
static void test_f16_exhaustive(void) {
    long bad_value = 0, bad_trip = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = pmi_f16_to_f32((uint16_t)h);
        uint32_t e = (h >> 10) & 31, m = h & 1023;
        double sign = (h & 0x8000) ? -1.0 : 1.0;
        if (e == 31) {
            if (m == 0) {
                bad_value += !(isinf(f) && (f < 0) == (sign < 0));
            } else {
                bad_value += !(isnan(f) && bits_of(f) == (((h & 0x8000u) << 16) | 0x7fc00000u |
                                                         (m << 13)));
            }
        } else {
            double v = e == 0 ? ldexp((double)m, -24) : ldexp(1024.0 + m, (int)e - 25);
            bad_value += ((double)f != sign * v) || (signbit(f) != 0) != (sign < 0);
        }
        uint16_t back = pmi_f32_to_f16(f);
        uint16_t want = (e == 31 && m != 0) ? (uint16_t)(h | 0x200u) : (uint16_t)h;
        bad_trip += back != want;
    }
    CHECK_EQ_INT(bad_value, 0);
    CHECK_EQ_INT(bad_trip, 0);
}

/* Rounding of every interval between consecutive positive halves: the exact midpoint goes
 * to the even neighbour, one float ulp either side goes to the nearer one. */
static void test_f16_rounding_exhaustive(void) {
    long bad = 0;
    for (uint32_t h = 0; h < 0x7c00; h++) {
        double lo = pmi_f16_to_f32((uint16_t)h);
        double hi = h + 1 < 0x7c00 ? pmi_f16_to_f32((uint16_t)(h + 1)) : 65536.0;
        float mid = (float)((lo + hi) / 2); /* exact: 12 significant bits */
        uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
        bad += pmi_f32_to_f16(mid) != even;
        bad += pmi_f32_to_f16(nextafterf(mid, 0.0f)) != h;
        bad += pmi_f32_to_f16(nextafterf(mid, INFINITY)) != h + 1;
        bad += pmi_f32_to_f16(-mid) != (uint16_t)(even | 0x8000u);
        bad += pmi_f32_to_f16(-nextafterf(mid, 0.0f)) != (uint16_t)(h | 0x8000u);
        /* every float strictly inside (lo, mid) rounds down: sample a few */
        float a = nextafterf((float)lo, INFINITY);
        if ((double)a < (double)mid) {
            bad += pmi_f32_to_f16(a) != h;
        }
    }
    CHECK_EQ_INT(bad, 0);
    /* all floats below 2^-25 (and their negatives) round to zero */
    CHECK_EQ_INT(pmi_f32_to_f16(float_of(0x32ffffffu)), 0);
    CHECK_EQ_INT(pmi_f32_to_f16(float_of(0x00000001u)), 0);
    CHECK_EQ_INT(pmi_f32_to_f16(float_of(0x80400000u)), 0x8000);
}

/* ---- bf16 ------------------------------------------------------------------------------ */

static void test_bf16(void) {
    CHECK_EQ_INT(pmi_f32_to_bf16(1.0f), 0x3f80);
    CHECK_EQ_INT(pmi_f32_to_bf16(float_of(0x3f808000u)), 0x3f80); /* tie, even: down */
    CHECK_EQ_INT(pmi_f32_to_bf16(float_of(0x3f818000u)), 0x3f82); /* tie, odd: up */
    CHECK_EQ_INT(pmi_f32_to_bf16(float_of(0x3f808001u)), 0x3f81);
    CHECK_EQ_INT(pmi_f32_to_bf16(float_of(0x7f7fffffu)), 0x7f80); /* FLT_MAX rounds to inf */
    CHECK_EQ_INT(pmi_f32_to_bf16(float_of(0x00000001u)), 0x0000); /* subnormals are kept... */
    CHECK_EQ_INT(pmi_f32_to_bf16(float_of(0x00010000u)), 0x0001); /* ...not flushed */
    CHECK_EQ_INT(pmi_f32_to_bf16(float_of(0x7f800001u)), 0x7fc0); /* NaN: | 64 */
    CHECK_EQ_INT(pmi_f32_to_bf16(float_of(0xffa12345u)), 0xffe1);
    CHECK_EQ_INT(pmi_f32_to_bf16(-INFINITY), 0xff80);
    long bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = pmi_bf16_to_f32((uint16_t)h);
        bad += bits_of(f) != h << 16;
        uint16_t back = pmi_f32_to_bf16(f);
        bool nan = (h & 0x7fff) > 0x7f80;
        bad += back != (nan ? (uint16_t)(h | 64) : (uint16_t)h);
    }
    CHECK_EQ_INT(bad, 0);
    /* the rule of SPEC 8.9, written independently in 64-bit arithmetic */
    bad = 0;
    for (int i = 0; i < 200000; i++) {
        uint32_t u = check_rand32();
        uint16_t want;
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            want = (uint16_t)((u >> 16) | 64);
        } else {
            uint64_t r = ((uint64_t)u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
            want = (uint16_t)r;
        }
        bad += pmi_f32_to_bf16(float_of(u)) != want;
    }
    CHECK_EQ_INT(bad, 0);
}

/* ---- oracle vectors from ggml b11739 --------------------------------------------------- */

static void test_conv_vectors(void) {
    for (int i = 0; i < TV_NCONV; i++) {
        float f = float_of(tv_conv_input[i]);
        uint16_t h = pmi_f32_to_f16(f);
        uint16_t b = pmi_f32_to_bf16(f);
        CHECK_MSG(h == tv_conv_f16[i], "f16 of 0x%08x: 0x%04x, ggml 0x%04x",
                  (unsigned)tv_conv_input[i], (unsigned)h, (unsigned)tv_conv_f16[i]);
        CHECK_MSG(b == tv_conv_bf16[i], "bf16 of 0x%08x: 0x%04x, ggml 0x%04x",
                  (unsigned)tv_conv_input[i], (unsigned)b, (unsigned)tv_conv_bf16[i]);
    }
    /* the public row conversion, through every kernel table this CPU runs */
    const char *names[8];
    uint32_t na = pm_kernels_available(names, 8);
    const char *before = pm_kernels_name();
    float in[TV_NCONV];
    for (int i = 0; i < TV_NCONV; i++) {
        in[i] = float_of(tv_conv_input[i]);
    }
    for (uint32_t k = 0; k < na && k < 8; k++) {
        CHECK_EQ_INT(pm_kernels_select(names[k]), PM_OK);
        uint16_t h[TV_NCONV], b[TV_NCONV];
        CHECK_EQ_INT(pm_type_from_float(PM_TYPE_F16, in, h, TV_NCONV), PM_OK);
        CHECK_EQ_INT(pm_type_from_float(PM_TYPE_BF16, in, b, TV_NCONV), PM_OK);
        CHECK_EQ_MEM(h, tv_conv_f16, sizeof h);
        CHECK_EQ_MEM(b, tv_conv_bf16, sizeof b);
        float back[TV_NCONV];
        CHECK_EQ_INT(pm_type_to_float(PM_TYPE_F16, h, back, TV_NCONV), PM_OK);
        for (int i = 0; i < TV_NCONV; i++) {
            CHECK_EQ_U64(bits_of(back[i]), bits_of(pmi_f16_to_f32(h[i])));
        }
    }
    CHECK_EQ_INT(pm_kernels_select(before), PM_OK);
}

static void test_quant_vectors(void) {
    float in[TV_N];
    for (int i = 0; i < TV_N; i++) {
        in[i] = float_of(tv_input[i]);
    }
    for (size_t t = 0; t < sizeof tv_quants / sizeof tv_quants[0]; t++) {
        const tv_quant *q = &tv_quants[t];
        check_current = q->name;
        uint8_t *buf = calloc(q->nbytes + 1, 1);
        float *deq = calloc(TV_N, sizeof(float));
        if (buf == NULL || deq == NULL) {
            CHECK(!"out of memory");
            free(buf);
            free(deq);
            return;
        }
        uint64_t rs = 0;
        CHECK_EQ_INT(pm_type_row_size(q->type, TV_N, &rs), PM_OK);
        CHECK_EQ_U64(rs, q->nbytes);
        /* the CPU backend's from_float (also at an odd address: no alignment needed) */
        pmi_quantize_row(q->type, in, buf + 1, TV_N);
        for (uint32_t i = 0; i < q->nbytes; i++) {
            CHECK_MSG(buf[1 + i] == q->cpu[i], "%s cpu byte %u (block %u): 0x%02x, ggml 0x%02x",
                      q->name, (unsigned)i, (unsigned)(i / (q->nbytes / (TV_N / 32))),
                      (unsigned)buf[1 + i], (unsigned)q->cpu[i]);
        }
        CHECK_EQ_INT(pm_type_from_float(q->type, in, buf, TV_N), PM_OK);
        CHECK_EQ_MEM(buf, q->cpu, q->nbytes);
        /* the reference quantizer */
        pmi_quantize_row_ref(q->type, in, buf, TV_N);
        for (uint32_t i = 0; i < q->nbytes; i++) {
            CHECK_MSG(buf[i] == q->ref[i], "%s ref byte %u (block %u): 0x%02x, ggml 0x%02x",
                      q->name, (unsigned)i, (unsigned)(i / (q->nbytes / (TV_N / 32))),
                      (unsigned)buf[i], (unsigned)q->ref[i]);
        }
        /* dequantization of ggml's bytes, bit for bit */
        memcpy(buf + 1, q->cpu, q->nbytes);
        pmi_dequantize_row(q->type, buf + 1, deq, TV_N);
        for (int i = 0; i < TV_N; i++) {
            CHECK_MSG(bits_of(deq[i]) == q->deq[i], "%s deq[%d]: 0x%08x, ggml 0x%08x", q->name,
                      i, (unsigned)bits_of(deq[i]), (unsigned)q->deq[i]);
        }
        CHECK_EQ_INT(pm_type_to_float(q->type, q->cpu, deq, TV_N), PM_OK);
        CHECK_EQ_U64(bits_of(deq[0]), q->deq[0]);
        free(buf);
        free(deq);
    }
    check_current = "test_quant_vectors";
    /* x86 q8_0 vs reference: only ties differ (x.5 after scaling; block 1 has id == 1) */
    const tv_quant *q8 = NULL;
    for (size_t t = 0; t < sizeof tv_quants / sizeof tv_quants[0]; t++) {
        if (tv_quants[t].type == PM_TYPE_Q8_0) {
            q8 = &tv_quants[t];
        }
    }
    CHECK(q8 != NULL);
    if (q8 != NULL) {
        CHECK(memcmp(q8->cpu + 34, q8->ref + 34, 34) != 0);
        CHECK_EQ_INT((int8_t)q8->cpu[34 + 2 + 2], 2);  /* 2.5 -> 2 (even) */
        CHECK_EQ_INT((int8_t)q8->ref[34 + 2 + 2], 3);  /* 2.5 -> 3 (away from zero) */
    }
}

/* ---- quantization properties ------------------------------------------------------------ */

static const int32_t k_quant_types[] = {PM_TYPE_Q4_0, PM_TYPE_Q4_1, PM_TYPE_Q5_0,
                                        PM_TYPE_Q5_1, PM_TYPE_Q8_0, PM_TYPE_IQ4_NL};

/* Round trip error stays within half a quantization step (plus the f16 rounding of d/m). */
static void test_quant_roundtrip(void) {
    enum { N = 32 * 64 };
    static float x[N], y[N];
    static uint8_t q[N * 2];
    for (size_t t = 0; t < sizeof k_quant_types / sizeof k_quant_types[0]; t++) {
        int32_t type = k_quant_types[t];
        check_current = pm_type_name(type);
        for (int i = 0; i < N; i++) {
            float scale = (float)(1 << (i / 32 % 8)) * 0.01f;
            x[i] = check_randf(-1.0f, 1.0f) * scale;
        }
        for (int ref = 0; ref < 2; ref++) {
            if (ref) {
                pmi_quantize_row_ref(type, x, q, N);
            } else {
                pmi_quantize_row(type, x, q, N);
            }
            pmi_dequantize_row(type, q, y, N);
            double worst = 0;
            for (int b = 0; b < N / 32; b++) {
                float mn = FLT_MAX, mx = -FLT_MAX, amax = 0;
                for (int j = 0; j < 32; j++) {
                    float v = x[b * 32 + j];
                    mn = v < mn ? v : mn;
                    mx = v > mx ? v : mx;
                    amax = fabsf(v) > amax ? fabsf(v) : amax;
                }
                /* allowed error: half a step; a full step for q4_0/q5_0, whose grid ends one
                 * step short on the side opposite the extreme; iq4_nl: its widest gap plus
                 * the 113/127 asymmetry of its grid */
                double tol;
                switch (type) {
                case PM_TYPE_Q4_0: tol = amax / 8.0; break;
                case PM_TYPE_Q5_0: tol = amax / 16.0; break;
                case PM_TYPE_Q4_1: tol = (mx - mn) / 15.0 * 0.5; break;
                case PM_TYPE_Q5_1: tol = (mx - mn) / 31.0 * 0.5; break;
                case PM_TYPE_Q8_0: tol = amax / 127.0 * 0.5; break;
                default: tol = amax * 26.0 / 127.0; break;
                }
                for (int j = 0; j < 32; j++) {
                    double err = fabs((double)x[b * 32 + j] - y[b * 32 + j]);
                    double rel = err / (tol * 1.01 + 1e-3 * amax + 1e-12);
                    worst = rel > worst ? rel : worst;
                }
            }
            CHECK_MSG(worst <= 1.0, "%s%s: worst error %.3f of the allowed", pm_type_name(type),
                      ref ? " ref" : "", worst);
        }
        /* quantizing a dequantized row is stable for the symmetric 8-bit type */
        if (type == PM_TYPE_Q8_0) {
            static uint8_t q2[N * 2];
            pmi_quantize_row(type, x, q, N);
            pmi_dequantize_row(type, q, y, N);
            pmi_quantize_row(type, y, q2, N);
            long diff = 0;
            for (int b = 0; b < N / 32; b++) {
                for (int j = 0; j < 32; j++) {
                    int a = (int8_t)q[b * 34 + 2 + j], c = (int8_t)q2[b * 34 + 2 + j];
                    diff += abs(a - c) > 1;
                }
            }
            CHECK_EQ_INT(diff, 0);
        }
    }
    check_current = "test_quant_roundtrip";
}

/* Hand-made blocks whose bytes follow from SPEC 8.9's formulas. */
static void test_quant_known(void) {
    float x[32];
    uint8_t q[34];
    /* q8_0, amax 127: d = 1 (f16 0x3c00), q = x */
    for (int j = 0; j < 32; j++) {
        x[j] = (float)(j * 4 - 64);
    }
    x[31] = 127.0f;
    pmi_quantize_row(PM_TYPE_Q8_0, x, q, 32);
    CHECK_EQ_INT(q[0] | (q[1] << 8), 0x3c00);
    for (int j = 0; j < 32; j++) {
        CHECK_EQ_INT((int8_t)q[2 + j], (int)x[j]);
    }
    /* q4_0: max magnitude -8 -> d = 1, q = x + 8 */
    for (int j = 0; j < 32; j++) {
        x[j] = (float)((j % 16) - 8);
    }
    x[3] = -8.0f;
    pmi_quantize_row(PM_TYPE_Q4_0, x, q, 32);
    CHECK_EQ_INT(q[0] | (q[1] << 8), 0x3c00);
    for (int j = 0; j < 16; j++) {
        CHECK_EQ_INT(q[2 + j] & 15, (int)x[j] + 8);
        CHECK_EQ_INT(q[2 + j] >> 4, (int)x[16 + j] + 8);
    }
    /* q4_1: values 0..15 + 2: d = 1, m = 2, q = x - 2 */
    for (int j = 0; j < 32; j++) {
        x[j] = (float)(j % 16) + 2.0f;
    }
    pmi_quantize_row(PM_TYPE_Q4_1, x, q, 32);
    CHECK_EQ_INT(q[0] | (q[1] << 8), 0x3c00);
    CHECK_EQ_INT(q[2] | (q[3] << 8), 0x4000);
    for (int j = 0; j < 16; j++) {
        CHECK_EQ_INT(q[4 + j] & 15, j);
        CHECK_EQ_INT(q[4 + j] >> 4, j);
    }
    /* q5_0: -16 .. 15, d = 1: 5-bit q = x + 16, bit 4 in qh */
    for (int j = 0; j < 32; j++) {
        x[j] = (float)(j - 16);
    }
    pmi_quantize_row(PM_TYPE_Q5_0, x, q, 32);
    CHECK_EQ_INT(q[0] | (q[1] << 8), 0x3c00);
    CHECK_EQ_U64(pmi_rd_u32(q + 2), 0xffff0000u);
    for (int j = 0; j < 16; j++) {
        CHECK_EQ_INT(q[6 + j] & 15, j);
        CHECK_EQ_INT(q[6 + j] >> 4, j);
    }
    float y[32];
    pmi_dequantize_row(PM_TYPE_Q5_0, q, y, 32);
    for (int j = 0; j < 32; j++) {
        CHECK(y[j] == x[j]);
    }
    /* iq4_nl: a block on the grid comes back exactly */
    static const int8_t grid[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                    1,    13,   25,  38,  53,  69,  89,  113};
    for (int j = 0; j < 32; j++) {
        x[j] = (float)grid[(j * 7) % 16] * 0.5f;
    }
    pmi_quantize_row(PM_TYPE_IQ4_NL, x, q, 32);
    pmi_dequantize_row(PM_TYPE_IQ4_NL, q, y, 32);
    for (int j = 0; j < 32; j++) {
        CHECK(y[j] == x[j]);
    }
    /* a zero block: d = +-0 (q4_0 / q5_0 store 0 / -8 = -0.0, as ggml does), zeros back */
    memset(x, 0, sizeof x);
    for (size_t t = 0; t < sizeof k_quant_types / sizeof k_quant_types[0]; t++) {
        int32_t ty = k_quant_types[t];
        pmi_quantize_row(ty, x, q, 32);
        bool neg = ty == PM_TYPE_Q4_0 || ty == PM_TYPE_Q5_0;
        CHECK_EQ_INT(q[0] | (q[1] << 8), neg ? 0x8000 : 0);
        pmi_dequantize_row(ty, q, y, 32);
        for (int j = 0; j < 32; j++) {
            CHECK(y[j] == 0.0f);
        }
    }
}

static void test_conversion_api(void) {
    float x[64], y[64];
    uint8_t buf[64 * 4];
    for (int i = 0; i < 64; i++) {
        x[i] = check_randf(-3.0f, 3.0f);
    }
    CHECK_EQ_INT(pm_type_from_float(PM_TYPE_F32, x, buf, 64), PM_OK);
    CHECK_EQ_MEM(buf, x, sizeof x);
    CHECK_EQ_INT(pm_type_to_float(PM_TYPE_F32, buf, y, 64), PM_OK);
    CHECK_EQ_MEM(y, x, sizeof x);
    CHECK_EQ_INT(pm_type_from_float(PM_TYPE_BF16, x, buf, 64), PM_OK);
    CHECK_EQ_INT(pm_type_to_float(PM_TYPE_BF16, buf, y, 64), PM_OK);
    for (int i = 0; i < 64; i++) {
        CHECK_EQ_U64(bits_of(y[i]), (uint32_t)pmi_f32_to_bf16(x[i]) << 16);
    }
    /* odd-address f16 rows go through the byte path, same bits */
    uint16_t h[64];
    CHECK_EQ_INT(pm_type_from_float(PM_TYPE_F16, x, h, 64), PM_OK);
    pmi_quantize_row(PM_TYPE_F16, x, buf + 1, 64);
    CHECK_EQ_MEM(buf + 1, h, sizeof h);
    pmi_dequantize_row(PM_TYPE_F16, buf + 1, y, 64);
    for (int i = 0; i < 64; i++) {
        CHECK_EQ_U64(bits_of(y[i]), bits_of(pmi_f16_to_f32(h[i])));
    }
    /* errors */
    CHECK_EQ_INT(pm_type_from_float(PM_TYPE_Q8_0, x, buf, 48), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_type_from_float(12, x, buf, 32), PM_E_UNSUPPORTED);
    CHECK_EQ_INT(pm_type_to_float(PM_TYPE_Q4_0, buf, y, 33), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_type_from_float(PM_TYPE_F16, NULL, buf, 4), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_type_to_float(PM_TYPE_F16, buf, NULL, 4), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_type_from_float(PM_TYPE_F16, NULL, NULL, 0), PM_OK);
    CHECK_EQ_INT(pm_type_to_float(PM_TYPE_Q8_0, NULL, NULL, 0), PM_OK);
}

/* ---- status.c ----------------------------------------------------------------------------- */

static void test_status(void) {
    static const pm_status codes[] = {PM_OK,         PM_E_INVALID_ARG, PM_E_UNSUPPORTED,
                                      PM_E_NO_SLOT,  PM_E_FORMAT,      PM_E_IO,
                                      PM_E_NOMEM,    PM_E_STATE,       PM_E_BUFFER_SMALL,
                                      PM_E_BATCH,    PM_E_SHIFT};
    size_t nc = sizeof codes / sizeof codes[0];
    for (size_t i = 0; i < nc; i++) {
        const char *s = pm_status_str(codes[i]);
        CHECK(s != NULL && s[0] != '\0');
        for (size_t j = 0; j < i; j++) {
            CHECK(strcmp(s, pm_status_str(codes[j])) != 0);
        }
    }
    CHECK_EQ_STR(pm_status_str((pm_status)-99), "unknown status");
    CHECK_EQ_STR(pm_status_str((pm_status)5), "unknown status");
    {   /* pyproject.toml's version, whose MAJOR.MINOR the header repeats */
        char want[32];
        snprintf(want, sizeof want, "%d.%d.", PM_VERSION_MAJOR, PM_VERSION_MINOR);
        CHECK_EQ_STR(pm_version(), PM_VERSION_STRING);
        CHECK(strncmp(pm_version(), want, strlen(want)) == 0);
    }
    CHECK_EQ_INT(pmi_fail(PM_E_FORMAT, "bad %s at %d", "magic", 12), PM_E_FORMAT);
    CHECK_EQ_STR(pm_last_error(), "bad magic at 12");
    CHECK_EQ_INT(pmi_fail_ctx(PM_E_FORMAT, "layer %d", 3), PM_E_FORMAT);
    CHECK_EQ_STR(pm_last_error(), "layer 3: bad magic at 12");
    CHECK_EQ_INT(pmi_fail_ctx(PM_E_FORMAT, "state_read"), PM_E_FORMAT);
    CHECK_EQ_STR(pm_last_error(), "state_read: layer 3: bad magic at 12");
    CHECK_EQ_INT(pmi_fail(PM_E_IO, "%s", ""), PM_E_IO);
    CHECK_EQ_STR(pm_last_error(), "");
    CHECK_EQ_INT(pmi_fail_ctx(PM_E_IO, "only context"), PM_E_IO);
    CHECK_EQ_STR(pm_last_error(), "only context");
    /* long messages are truncated, not overflowed */
    char big[3000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    pmi_fail(PM_E_IO, "%s", big);
    CHECK(strlen(pm_last_error()) > 100 && strlen(pm_last_error()) < sizeof big - 1);
    pmi_fail_ctx(PM_E_IO, "%s", big);
    CHECK(strlen(pm_last_error()) < sizeof big - 1);
}

static void test_aligned_alloc(void) {
    CHECK(pmi_aligned_calloc(0) == NULL);
    CHECK(pmi_aligned_calloc(SIZE_MAX) == NULL);
    static const size_t sizes[] = {1, 3, 63, 64, 65, 1000, 4096, 100000};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        uint8_t *p = pmi_aligned_calloc(sizes[i]);
        CHECK(p != NULL);
        if (p == NULL) {
            continue;
        }
        CHECK(((uintptr_t)p & 63u) == 0);
        size_t nz = 0;
        for (size_t j = 0; j < sizes[i]; j++) {
            nz += p[j] != 0;
        }
        CHECK_EQ_INT(nz, 0);
        memset(p, 0xab, sizes[i]);
        pmi_aligned_free(p);
    }
    pmi_aligned_free(NULL);
}

int main(void) {
    RUN(test_type_table);
    RUN(test_f16_known);
    RUN(test_f16_exhaustive);
    RUN(test_f16_rounding_exhaustive);
    RUN(test_bf16);
    RUN(test_conv_vectors);
    RUN(test_quant_vectors);
    RUN(test_quant_roundtrip);
    RUN(test_quant_known);
    RUN(test_conversion_api);
    RUN(test_status);
    RUN(test_aligned_alloc);
    return check_report("test_types");
}
