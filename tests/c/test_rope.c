/* test_rope.c - the RoPE cache and the K-shift (rope.c). */
#include "check.h"
#include "pm_internal.h"
#include "kernels/kernels.h"
#include "rope_vectors.h"

#include <stdlib.h>

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

static pm_rope make_rope(int32_t mode, uint32_t n_rot) {
    pm_rope r;
    memset(&r, 0, sizeof r);
    r.mode = mode;
    r.n_rot = n_rot;
    r.freq_base = 10000.0f;
    r.freq_scale = 1.0f;
    r.ext_factor = 0.0f;
    r.attn_factor = 1.0f;
    r.beta_fast = 32.0f;
    r.beta_slow = 1.0f;
    r.n_ctx_orig = 4096;
    return r;
}

/* SPEC 4.10.3 in double precision, with pow() per index instead of the running product. */
static void rope_cache_double(const pm_rope *r, double p, double *cs) {
    const double n = r->n_rot, base = r->freq_base, fs = r->freq_scale;
    double lo = 0, hi = 0;
    if (r->ext_factor != 0) {
        double cdf = n * log(r->n_ctx_orig / (r->beta_fast * 2 * M_PI)) / (2 * log(base));
        double cds = n * log(r->n_ctx_orig / (r->beta_slow * 2 * M_PI)) / (2 * log(base));
        lo = fmax(0, floor(cdf));
        hi = fmin(n - 1, ceil(cds));
    }
    for (uint32_t i = 0; i < r->n_rot / 2; i++) {
        double ff = r->n_freq_factors ? r->freq_factors[i] : 1.0;
        double extrap = p * pow(base, -2.0 * i / n) / ff;
        double interp = fs * extrap, theta = interp, m = r->attn_factor;
        if (r->ext_factor != 0) {
            double y = (i - lo) / fmax(0.001, hi - lo);
            double ramp = 1 - fmin(1, fmax(0, y));
            double mix = ramp * r->ext_factor;
            theta = interp * (1 - mix) + extrap * mix;
            m *= 1 + 0.1 * log(1 / fs);
        }
        cs[2 * i] = cos(theta) * m;
        cs[2 * i + 1] = sin(theta) * m;
    }
}

/* |float cache - double cache| within the error of the running float product of thetas. */
static void check_cache(const pm_rope *r, float p) {
    float cs[512];
    double ref[512];
    pmi_rope_cache(r, p, cs);
    rope_cache_double(r, p, ref);
    double m = fabs(r->attn_factor) * (r->ext_factor != 0 ? 1 + 0.1 * log(1 / r->freq_scale) : 1);
    for (uint32_t i = 0; i < r->n_rot / 2; i++) {
        double theta = fabs((double)p) * pow(r->freq_base, -2.0 * i / r->n_rot);
        double tol = m * (theta * (i + 4) * 2.4e-7 + 4e-7);
        CHECK_MSG(fabs(cs[2 * i] - ref[2 * i]) <= tol && fabs(cs[2 * i + 1] - ref[2 * i + 1]) <= tol,
                  "n_rot %u base %g p %g i %u: (%.9g, %.9g) vs (%.9g, %.9g)", (unsigned)r->n_rot,
                  (double)r->freq_base, (double)p, (unsigned)i, (double)cs[2 * i],
                  (double)cs[2 * i + 1], ref[2 * i], ref[2 * i + 1]);
    }
}

static void test_cache_plain(void) {
    static const uint32_t nrots[] = {2, 32, 64, 128};
    static const float bases[] = {10000.0f, 500000.0f, 1000000.0f};
    static const float ps[] = {0, 1, 2, 7, -5, 100, -1000, 4095, 32768};
    for (size_t a = 0; a < 4; a++) {
        for (size_t b = 0; b < 3; b++) {
            for (size_t c = 0; c < sizeof ps / sizeof ps[0]; c++) {
                pm_rope r = make_rope(PM_ROPE_NORM, nrots[a]);
                r.freq_base = bases[b];
                check_cache(&r, ps[c]);
                r.attn_factor = 0.5f;
                r.freq_scale = 0.5f; /* without YaRN, freq_scale only scales theta */
                check_cache(&r, ps[c]);
            }
        }
    }
    /* p = 0: cos = attn_factor, sin = 0 exactly */
    pm_rope r = make_rope(PM_ROPE_NEOX, 64);
    r.attn_factor = 1.5f;
    float cs[64];
    pmi_rope_cache(&r, 0.0f, cs);
    for (int i = 0; i < 32; i++) {
        CHECK(cs[2 * i] == 1.5f && cs[2 * i + 1] == 0.0f);
    }
    /* the first pair rotates by exactly p radians */
    pmi_rope_cache(&r, 3.0f, cs);
    CHECK(cs[0] == cosf(3.0f) * 1.5f && cs[1] == sinf(3.0f) * 1.5f);
}

static void test_cache_yarn(void) {
    float ff[64];
    for (int i = 0; i < 64; i++) {
        ff[i] = 1.0f + 0.25f * (float)i;
    }
    static const float ps[] = {0, 1, 3, -17, 250, 2047};
    for (size_t c = 0; c < sizeof ps / sizeof ps[0]; c++) {
        pm_rope r = make_rope(PM_ROPE_NEOX, 128);
        r.ext_factor = 1.0f;
        r.freq_scale = 0.25f;
        check_cache(&r, ps[c]);
        r.ext_factor = 0.5f;
        r.beta_fast = 16.0f;
        r.beta_slow = 2.0f;
        r.freq_base = 1000000.0f;
        r.n_ctx_orig = 8192;
        check_cache(&r, ps[c]);
        r.n_freq_factors = 64;
        r.freq_factors = ff;
        check_cache(&r, ps[c]);
        r.ext_factor = 0.0f;
        check_cache(&r, ps[c]);
    }
    /* the YaRN magnitude correction applies at p = 0 too */
    pm_rope r = make_rope(PM_ROPE_NORM, 8);
    r.ext_factor = 1.0f;
    r.freq_scale = 0.25f;
    float cs[8];
    pmi_rope_cache(&r, 0.0f, cs);
    CHECK(cs[0] == 1.0f + 0.1f * logf(1.0f / 0.25f));
}

/* ---- K-shift, f32 / f16 ----------------------------------------------------------------- */

static float rnd(void) {
    float v = check_randf(-2.0f, 2.0f);
    return v == 0.0f ? 0.5f : v;
}

static void rotate_ref(float *x, const float *cs, uint32_t n_rot, int neox) {
    for (uint32_t i = 0; i < n_rot / 2; i++) {
        uint32_t ia = neox ? i : 2 * i, ib = neox ? i + n_rot / 2 : 2 * i + 1;
        float a = x[ia], b = x[ib];
        /* ggml-cpu's rotate_pairs as llama.cpp's x86 build computes it (FMA-contracted) */
        x[ia] = fmaf(a, cs[2 * i], -(b * cs[2 * i + 1]));
        x[ib] = fmaf(a, cs[2 * i + 1], b * cs[2 * i]);
    }
}

static void test_identity(void) {
    enum { HD = 64, NH = 3, NC = 9 };
    static float k[NC * NH * HD], k0[NC * NH * HD];
    static uint16_t h[NC * NH * HD], h0[NC * NH * HD];
    int32_t shift[NC] = {0};
    for (int i = 0; i < NC * NH * HD; i++) {
        k0[i] = k[i] = rnd();
        h0[i] = h[i] = pmi_f32_to_f16(rnd());
    }
    for (int mode = 0; mode < 4; mode++) {
        static const int32_t modes[] = {PM_ROPE_NORM, PM_ROPE_NEOX, PM_ROPE_MROPE, PM_ROPE_IMROPE};
        pm_rope r = make_rope(modes[mode], HD);
        CHECK_EQ_INT(pmi_kshift((uint8_t *)k, NH * HD * 4, NC, shift, PM_TYPE_F32, NH, HD, 0, &r, 0),
                     PM_OK);
        CHECK_EQ_MEM(k, k0, sizeof k);
        CHECK_EQ_INT(pmi_kshift((uint8_t *)h, NH * HD * 2, NC, shift, PM_TYPE_F16, NH, HD, 0, &r, -1),
                     PM_OK);
        CHECK_EQ_MEM(h, h0, sizeof h);
    }
    /* attn_factor 2 with zero shift doubles every rotated value (llama.cpp scales empty and
     * unshifted cells too) */
    pm_rope r = make_rope(PM_ROPE_NEOX, HD);
    r.attn_factor = 2.0f;
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, NH * HD * 4, NC, shift, PM_TYPE_F32, NH, HD, 0, &r, 0),
                 PM_OK);
    long bad = 0;
    for (int i = 0; i < NC * NH * HD; i++) {
        bad += k[i] != 2.0f * k0[i];
    }
    CHECK_EQ_INT(bad, 0);
}

static void test_norm_vs_neox(void) {
    float x0[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    float cs[8];
    static const int32_t modes[] = {PM_ROPE_NORM, PM_ROPE_NEOX, PM_ROPE_MROPE, PM_ROPE_IMROPE};
    float res[4][8];
    for (int m = 0; m < 4; m++) {
        pm_rope r = make_rope(modes[m], 8);
        float k[8];
        memcpy(k, x0, sizeof k);
        int32_t shift = 3;
        CHECK_EQ_INT(pmi_kshift((uint8_t *)k, 32, 1, &shift, PM_TYPE_F32, 1, 8, 0, &r, 0), PM_OK);
        pmi_rope_cache(&r, 3.0f, cs);
        float e[8];
        memcpy(e, x0, sizeof e);
        rotate_ref(e, cs, 8, m != 0);
        CHECK_EQ_MEM(k, e, sizeof k);
        memcpy(res[m], k, sizeof k);
    }
    /* NORM pairs (0,1): the first pair keeps its norm sqrt(1 + 4) */
    CHECK_NEAR(res[0][0] * res[0][0] + res[0][1] * res[0][1], 5.0, 1e-5);
    /* NEOX pairs (0,4): sqrt(1 + 25) */
    CHECK_NEAR(res[1][0] * res[1][0] + res[1][4] * res[1][4], 26.0, 1e-5);
    CHECK(memcmp(res[0], res[1], sizeof res[0]) != 0);
    CHECK_EQ_MEM(res[1], res[2], sizeof res[1]);
    CHECK_EQ_MEM(res[1], res[3], sizeof res[1]);
}

/* Partial rotation (n_rot < head_dim at an offset), padded rows, f32 and f16, every kernel
 * table, per-cell shifts with runs of equal values. */
static void test_partial_and_f16(void) {
    enum { HD = 48, NR = 16, OFF = 8, NH = 2, NC = 7, PADB = 12 };
    const int32_t shift[NC] = {3, 3, -5, 3, 0, 0, 1000};
    const char *names[8];
    uint32_t na = pm_kernels_available(names, 8);
    const char *before = pm_kernels_name();
    static uint8_t f32_first[NC * (NH * HD * 4 + PADB)], f16_first[NC * (NH * HD * 2 + PADB)];
    for (int neox = 0; neox < 2; neox++) {
        for (uint32_t ki = 0; ki < na && ki < 8; ki++) {
            CHECK_EQ_INT(pm_kernels_select(names[ki]), PM_OK);
            pm_rope r = make_rope(neox ? PM_ROPE_NEOX : PM_ROPE_NORM, NR);
            r.ext_factor = 1.0f;
            r.freq_scale = 0.5f;
            /* f32 */
            const uint64_t rb32 = NH * HD * 4 + PADB;
            static uint8_t k[NC * (NH * HD * 4 + PADB)], k0[NC * (NH * HD * 4 + PADB)];
            check_rng_state = 12345;
            for (size_t i = 0; i < sizeof k; i += 4) {
                float v = rnd();
                memcpy(k + i, &v, 4);
            }
            memcpy(k0, k, sizeof k);
            CHECK_EQ_INT(pmi_kshift(k, rb32, NC, shift, PM_TYPE_F32, NH, HD, OFF, &r, 0), PM_OK);
            long bad = 0;
            for (int c = 0; c < NC; c++) {
                float cs[NR];
                pmi_rope_cache(&r, (float)shift[c], cs);
                for (int hh = 0; hh < NH; hh++) {
                    float e[HD], got[HD];
                    memcpy(e, k0 + c * rb32 + hh * HD * 4, sizeof e);
                    memcpy(got, k + c * rb32 + hh * HD * 4, sizeof got);
                    rotate_ref(e + OFF, cs, NR, neox);
                    bad += memcmp(e, got, sizeof e) != 0;
                }
                bad += memcmp(k + c * rb32 + NH * HD * 4, k0 + c * rb32 + NH * HD * 4, PADB) != 0;
            }
            CHECK_MSG(bad == 0, "f32 partial rotation, kernel %s, neox %d", names[ki], neox);
            if (ki == 0) {
                memcpy(f32_first, k, sizeof k);
            } else {
                CHECK_EQ_MEM(k, f32_first, sizeof k);
            }
            /* f16: convert, rotate, round to nearest even; nothing else changes */
            const uint64_t rb16 = NH * HD * 2 + PADB;
            static uint8_t g[NC * (NH * HD * 2 + PADB)], g0[NC * (NH * HD * 2 + PADB)];
            for (size_t i = 0; i < sizeof g; i += 2) {
                uint16_t v = pmi_f32_to_f16(rnd());
                memcpy(g + i, &v, 2);
            }
            memcpy(g0, g, sizeof g);
            CHECK_EQ_INT(pmi_kshift(g, rb16, NC, shift, PM_TYPE_F16, NH, HD, OFF, &r, 0), PM_OK);
            bad = 0;
            for (int c = 0; c < NC; c++) {
                float cs[NR];
                pmi_rope_cache(&r, (float)shift[c], cs);
                for (int hh = 0; hh < NH; hh++) {
                    uint16_t e16[HD], got16[HD];
                    memcpy(e16, g0 + c * rb16 + hh * HD * 2, sizeof e16);
                    memcpy(got16, g + c * rb16 + hh * HD * 2, sizeof got16);
                    float f[NR];
                    for (int i = 0; i < NR; i++) {
                        f[i] = pmi_f16_to_f32(e16[OFF + i]);
                    }
                    rotate_ref(f, cs, NR, neox);
                    for (int i = 0; i < NR; i++) {
                        e16[OFF + i] = pmi_f32_to_f16(f[i]);
                    }
                    bad += memcmp(e16, got16, sizeof e16) != 0;
                }
                bad += memcmp(g + c * rb16 + NH * HD * 2, g0 + c * rb16 + NH * HD * 2, PADB) != 0;
            }
            CHECK_MSG(bad == 0, "f16 partial rotation, kernel %s, neox %d", names[ki], neox);
            if (ki == 0) {
                memcpy(f16_first, g, sizeof g);
            } else {
                CHECK_EQ_MEM(g, f16_first, sizeof g);
            }
        }
    }
    CHECK_EQ_INT(pm_kernels_select(before), PM_OK);
}

/* Reusing the cache across runs of equal shifts equals shifting each cell on its own. */
static void test_cache_reuse(void) {
    enum { HD = 32, NC = 6 };
    const int32_t shift[NC] = {4, 4, 9, 4, 0, 0};
    static float a[NC * HD], b[NC * HD];
    for (int i = 0; i < NC * HD; i++) {
        a[i] = b[i] = rnd();
    }
    pm_rope r = make_rope(PM_ROPE_NEOX, HD);
    r.attn_factor = 0.75f;
    CHECK_EQ_INT(pmi_kshift((uint8_t *)a, HD * 4, NC, shift, PM_TYPE_F32, 1, HD, 0, &r, 0), PM_OK);
    for (int c = 0; c < NC; c++) {
        CHECK_EQ_INT(pmi_kshift((uint8_t *)(b + c * HD), HD * 4, 1, &shift[c], PM_TYPE_F32, 1, HD,
                                0, &r, 0), PM_OK);
    }
    CHECK_EQ_MEM(a, b, sizeof a);
}

/* ---- K-shift, quantized ------------------------------------------------------------------ */

/* v <- H v over consecutive chunks of rot (H: orthonormal Walsh-Hadamard matrix,
 * H[i][j] = (-1)^popcount(i & j) / sqrt(rot)), in double. */
static void hadamard_chunks(double *v, uint32_t n, uint32_t rot) {
    double t[256];
    for (uint32_t c0 = 0; c0 + rot <= n; c0 += rot) {
        for (uint32_t i = 0; i < rot; i++) {
            double s = 0;
            for (uint32_t j = 0; j < rot; j++) {
                uint32_t par = 0;
                for (uint32_t w = i & j; w != 0; w &= w - 1) {
                    par ^= 1;
                }
                s += par ? -v[c0 + j] : v[c0 + j];
            }
            t[i] = s / sqrt((double)rot);
        }
        memcpy(v + c0, t, rot * sizeof(double));
    }
}

/* SPEC 4.10.4 in double: H, rope of every head, H. */
static void kshift_quant_ref(const float *deq, double *out, uint32_t n, uint32_t hd,
                             uint32_t rot, const float *cs, int neox) {
    for (uint32_t i = 0; i < n; i++) {
        out[i] = deq[i];
    }
    hadamard_chunks(out, n, rot);
    for (uint32_t h0 = 0; h0 < n; h0 += hd) {
        for (uint32_t i = 0; i < hd / 2; i++) {
            uint32_t ia = neox ? i : 2 * i, ib = neox ? i + hd / 2 : 2 * i + 1;
            double a = out[h0 + ia], b = out[h0 + ib];
            out[h0 + ia] = a * cs[2 * i] - b * cs[2 * i + 1];
            out[h0 + ib] = a * cs[2 * i + 1] + b * cs[2 * i];
        }
    }
    hadamard_chunks(out, n, rot);
}

static void test_quantized(void) {
    enum { HD = 64, NH = 2, NC = 3 };
    static const struct {
        int32_t type;
        double tol; /* in units of the block's absolute maximum */
    } types[] = {
        {PM_TYPE_Q8_0, 0.012}, {PM_TYPE_Q4_0, 0.2},  {PM_TYPE_Q4_1, 0.12},
        {PM_TYPE_Q5_0, 0.1},   {PM_TYPE_Q5_1, 0.06}, {PM_TYPE_IQ4_NL, 0.2},
    };
    static const int32_t rots[] = {64, 32};
    const int32_t shift[NC] = {5, 5, -2};
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        const int32_t type = types[t].type;
        check_current = pm_type_name(type);
        const uint64_t hb = pmi_row_size(type, HD), rb = hb * NH;
        for (int neox = 0; neox < 2; neox++) {
            for (size_t ri = 0; ri < 2; ri++) {
                static float x[NC * NH * HD], deq0[NC * NH * HD], deq1[NC * NH * HD];
                static double want[NH * HD];
                static uint8_t q[NC * NH * HD * 2], q0[NC * NH * HD * 2];
                for (int i = 0; i < NC * NH * HD; i++) {
                    x[i] = rnd();
                }
                for (int c = 0; c < NC; c++) {
                    for (int h = 0; h < NH; h++) {
                        pmi_quantize_row(type, x + (c * NH + h) * HD, q + c * rb + h * hb, HD);
                    }
                }
                memcpy(q0, q, NC * rb);
                for (int c = 0; c < NC; c++) {
                    pmi_dequantize_row(type, q + c * rb, deq0 + c * NH * HD, NH * HD);
                }
                pm_rope r = make_rope(neox ? PM_ROPE_NEOX : PM_ROPE_NORM, HD);
                CHECK_EQ_INT(pmi_kshift(q, rb, NC, shift, type, NH, HD, 0, &r, rots[ri]), PM_OK);
                double worst = 0;
                for (int c = 0; c < NC; c++) {
                    float cs[HD];
                    pmi_rope_cache(&r, (float)shift[c], cs);
                    kshift_quant_ref(deq0 + c * NH * HD, want, NH * HD, HD, (uint32_t)rots[ri],
                                     cs, neox);
                    pmi_dequantize_row(type, q + c * rb, deq1 + c * NH * HD, NH * HD);
                    for (int i = 0; i < NH * HD; i++) {
                        double amax = 0;
                        int b0 = i / 32 * 32;
                        for (int j = 0; j < 32; j++) {
                            if (fabs(want[b0 + j]) > amax) {
                                amax = fabs(want[b0 + j]);
                            }
                        }
                        double e = fabs(deq1[c * NH * HD + i] - want[i]) / amax;
                        if (e > worst) {
                            worst = e;
                        }
                    }
                }
                CHECK_MSG(worst <= types[t].tol, "%s rot %d neox %d: worst %.4f of amax",
                          pm_type_name(type), (int)rots[ri], neox, worst);
                /* the same cells shifted back come close to where they started */
                int32_t back[NC];
                for (int c = 0; c < NC; c++) {
                    back[c] = -shift[c];
                }
                CHECK_EQ_INT(pmi_kshift(q, rb, NC, back, type, NH, HD, 0, &r, rots[ri]), PM_OK);
                worst = 0;
                for (int c = 0; c < NC; c++) {
                    pmi_dequantize_row(type, q + c * rb, deq1 + c * NH * HD, NH * HD);
                }
                double amax_all = 0;
                for (int i = 0; i < NC * NH * HD; i++) {
                    if (fabs(deq0[i]) > amax_all) {
                        amax_all = fabs(deq0[i]);
                    }
                }
                for (int i = 0; i < NC * NH * HD; i++) {
                    double e = fabs(deq1[i] - deq0[i]) / amax_all;
                    if (e > worst) {
                        worst = e;
                    }
                }
                CHECK_MSG(worst <= 3 * types[t].tol, "%s back-shift: worst %.4f", pm_type_name(type),
                          worst);
            }
        }
    }
    check_current = "test_quantized";
}

/* ---- against ggml_rope_ext of llama.cpp b11739 (x86 CPU backend) ------------------------- */

static float f32_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t u32_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Distance in ulps between two finite floats of the same sign. */
static uint32_t ulps(float a, float b) {
    uint32_t ua = u32_of(a), ub = u32_of(b);
    if ((ua ^ ub) & 0x80000000u) {
        return (ua & 0x7fffffffu) + (ub & 0x7fffffffu);
    }
    return ua > ub ? ua - ub : ub - ua;
}

/* The rotation given ggml's own cache is libm-free: every kernel must give ggml's bits.  The
 * cache and the whole K-shift depend on cosf/sinf/powf/logf: bit for bit with glibc (the
 * library the vectors were made with), within 1 ulp / 1 f16 step elsewhere (SPEC 4.10.3). */
static void test_ggml_vectors(void) {
#if defined(__GLIBC__)
    const uint32_t libm_tol = 0;
#else
    const uint32_t libm_tol = 1;
#endif
    for (size_t k = 0; k < sizeof rv_cases / sizeof rv_cases[0]; k++) {
        const rv_case *v = &rv_cases[k];
        check_current = v->name;
        const uint32_t nr = v->n_rot, nc = v->n_cells;
        const int neox = v->mode != PM_ROPE_NORM;
        float ff[128], cs[128], x[128], ggml_cs[128];
        pm_rope r = make_rope(v->mode, nr);
        r.freq_base = v->freq_base;
        r.freq_scale = v->freq_scale;
        r.ext_factor = v->ext_factor;
        r.attn_factor = v->attn_factor;
        r.beta_fast = v->beta_fast;
        r.beta_slow = v->beta_slow;
        r.n_ctx_orig = v->n_ctx_orig;
        if (v->has_ff) {
            for (uint32_t i = 0; i < nr / 2; i++) {
                ff[i] = f32_of(v->ff[i]);
            }
            r.n_freq_factors = nr / 2;
            r.freq_factors = ff;
        }
        uint32_t worst = 0;
        for (uint32_t c = 0; c < nc; c++) {
            pmi_rope_cache(&r, (float)v->shift[c], cs);
            for (uint32_t i = 0; i < nr; i++) {
                ggml_cs[i] = f32_of(v->cache[c * nr + i]);
                uint32_t d = ulps(cs[i], ggml_cs[i]);
                worst = d > worst ? d : worst;
            }
            for (const pmk_table *const *t = pmk_all(); *t != NULL; t++) {
                if (((*t)->needs & ~pmk_cpu_bits()) != 0) {
                    continue;
                }
                for (uint32_t i = 0; i < nr; i++) {
                    x[i] = f32_of(v->x[c * nr + i]);
                }
                (*t)->rope_f32(x, ggml_cs, nr / 2, neox);
                long bad = 0;
                for (uint32_t i = 0; i < nr; i++) {
                    bad += u32_of(x[i]) != v->y[c * nr + i];
                }
                CHECK_MSG(bad == 0, "%s cell %u, kernel %s: %ld values differ from ggml", v->name,
                          (unsigned)c, (*t)->name, bad);
            }
        }
        CHECK_MSG(worst <= libm_tol, "%s: rope cache %u ulps from ggml's", v->name,
                  (unsigned)worst);
        /* the whole K-shift, f32 and f16 */
        float *kf = malloc(sizeof(float) * nr * nc);
        uint16_t *kh = malloc(sizeof(uint16_t) * nr * nc);
        if (kf == NULL || kh == NULL) {
            free(kf);
            free(kh);
            CHECK(!"out of memory");
            return;
        }
        for (uint32_t i = 0; i < nr * nc; i++) {
            kf[i] = f32_of(v->x[i]);
            kh[i] = v->h[i];
        }
        CHECK_EQ_INT(pmi_kshift((uint8_t *)kf, nr * 4, nc, v->shift, PM_TYPE_F32, 1, nr, 0, &r, 0),
                     PM_OK);
        CHECK_EQ_INT(pmi_kshift((uint8_t *)kh, nr * 2, nc, v->shift, PM_TYPE_F16, 1, nr, 0, &r, 0),
                     PM_OK);
        uint32_t wf = 0, wh = 0;
        for (uint32_t i = 0; i < nr * nc; i++) {
            uint32_t d = ulps(kf[i], f32_of(v->y[i]));
            wf = d > wf ? d : wf;
            uint32_t dh = kh[i] > v->hy[i] ? kh[i] - v->hy[i] : v->hy[i] - kh[i];
            wh = dh > wh ? dh : wh;
        }
        /* a 1-ulp cache difference can move the rotated value by a few ulps */
        CHECK_MSG(wf <= 4 * libm_tol, "%s: f32 K-shift %u ulps from ggml", v->name, (unsigned)wf);
        CHECK_MSG(wh <= libm_tol, "%s: f16 K-shift %u steps from ggml", v->name, (unsigned)wh);
        free(kf);
        free(kh);
    }
    check_current = "test_ggml_vectors";
}

/* ---- errors -------------------------------------------------------------------------------- */

static void test_errors(void) {
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_F32, 64, 64, 0, 0), PM_OK);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_F16, 128, 64, 64, -1), PM_OK);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_Q8_0, 128, 128, 0, 128), PM_OK);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_IQ4_NL, 192, 192, 0, 64), PM_OK);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_BF16, 64, 64, 0, 0), PM_E_SHIFT);
    CHECK(strstr(pm_last_error(), "bf16") != NULL);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_F32, 64, 63, 0, 0), PM_E_SHIFT);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_F32, 64, 32, 40, 0), PM_E_SHIFT);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_Q8_0, 128, 128, 0, 0), PM_E_SHIFT);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_Q4_0, 128, 128, 0, -1), PM_E_SHIFT);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_Q8_0, 128, 64, 0, 64), PM_E_SHIFT);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_Q8_0, 128, 64, 64, 64), PM_E_SHIFT);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_Q8_0, 128, 128, 0, 48), PM_E_SHIFT);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_Q8_0, 64, 64, 0, 128), PM_E_SHIFT);
    CHECK_EQ_INT(pmi_kshift_check(PM_TYPE_Q8_0, 48, 48, 0, 16), PM_E_SHIFT); /* 48 % 32 */
    CHECK_EQ_INT(pmi_kshift_check(12, 64, 64, 0, 64), PM_E_SHIFT);

    enum { HD = 64 };
    float k[2 * HD], k0[2 * HD];
    for (int i = 0; i < 2 * HD; i++) {
        k[i] = k0[i] = rnd();
    }
    int32_t shift[2] = {3, 4};
    pm_rope r = make_rope(PM_ROPE_VISION, HD);
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, HD * 4, 2, shift, PM_TYPE_F32, 1, HD, 0, &r, 0), PM_E_SHIFT);
    r.mode = 99;
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, HD * 4, 2, shift, PM_TYPE_F32, 1, HD, 0, &r, 0), PM_E_SHIFT);
    CHECK_EQ_MEM(k, k0, sizeof k);
    /* rope type NONE: nothing to do, for any type */
    r.mode = PM_ROPE_NONE;
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, HD * 4, 2, shift, PM_TYPE_F32, 1, HD, 0, &r, 0), PM_OK);
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, HD * 2, 2, shift, PM_TYPE_BF16, 1, HD, 0, &r, 0), PM_OK);
    CHECK_EQ_MEM(k, k0, sizeof k);
    /* bf16 and quantized-without-rotation: PM_E_SHIFT, data untouched */
    r.mode = PM_ROPE_NORM;
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, HD * 2, 2, shift, PM_TYPE_BF16, 1, HD, 0, &r, 0), PM_E_SHIFT);
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, 68, 2, shift, PM_TYPE_Q8_0, 1, HD, 0, &r, 0), PM_E_SHIFT);
    CHECK_EQ_MEM(k, k0, sizeof k);
    /* invalid arguments */
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, HD * 4, 2, shift, PM_TYPE_F32, 1, HD, 0, NULL, 0),
                 PM_E_INVALID_ARG);
    CHECK_EQ_INT(pmi_kshift(NULL, HD * 4, 2, shift, PM_TYPE_F32, 1, HD, 0, &r, 0), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, HD * 4, 2, NULL, PM_TYPE_F32, 1, HD, 0, &r, 0),
                 PM_E_INVALID_ARG);
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, HD * 4, 2, shift, PM_TYPE_F32, 2, HD, 0, &r, 0),
                 PM_E_INVALID_ARG); /* two heads do not fit the row */
    float ff[4] = {1, 1, 1, 1};
    r.n_freq_factors = 4;
    r.freq_factors = ff;
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, HD * 4, 2, shift, PM_TYPE_F32, 1, HD, 0, &r, 0),
                 PM_E_INVALID_ARG); /* needs n_rot / 2 = 32 */
    r.freq_factors = NULL;
    r.n_freq_factors = 32;
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, HD * 4, 2, shift, PM_TYPE_F32, 1, HD, 0, &r, 0),
                 PM_E_INVALID_ARG);
    CHECK_EQ_MEM(k, k0, sizeof k);
    /* nothing to do */
    r = make_rope(PM_ROPE_NORM, HD);
    CHECK_EQ_INT(pmi_kshift(NULL, HD * 4, 0, NULL, PM_TYPE_F32, 1, HD, 0, &r, 0), PM_OK);
    r.n_rot = 0;
    CHECK_EQ_INT(pmi_kshift((uint8_t *)k, HD * 4, 2, shift, PM_TYPE_F32, 1, HD, 0, &r, 0), PM_OK);
    CHECK_EQ_MEM(k, k0, sizeof k);
}

int main(void) {
    RUN(test_cache_plain);
    RUN(test_cache_yarn);
    RUN(test_identity);
    RUN(test_norm_vs_neox);
    RUN(test_partial_and_f16);
    RUN(test_cache_reuse);
    RUN(test_quantized);
    RUN(test_ggml_vectors);
    RUN(test_errors);
    return check_report("test_rope");
}
