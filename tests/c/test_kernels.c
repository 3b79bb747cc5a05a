/* test_kernels.c - every kernel table this CPU can run against pmk_scalar, bit for bit, and
 * the scalar kernels against straightforward re-statements of their contracts.
 *
 * Sizes 0 .. 3*16+7, starts misaligned by 0..3 elements, random inputs with special values.
 * Float kernels (rope, fwht) compare bit patterns, except that any NaN equals any NaN (C does
 * not fix which NaN payload an operation with two NaN operands returns).  The rope kernels
 * use fused multiply-adds exactly where the scalar one calls fmaf.  Conversion and mask
 * kernels compare raw bits, NaN payloads included.  Tables the CPU cannot run are skipped. */
#include "check.h"
#include "pm_internal.h"
#include "kernels/kernels.h"

#include <stdlib.h>

#define MAXN (3 * 16 + 7)
#define PAD 8
#define CANARY 0x5au

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

/* A random float32 bit pattern biased toward the interesting cases. */
static uint32_t rand_f32_bits(void) {
    static const uint32_t special[] = {
        0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00001u,
        0x7f800001u, 0x7fbfffffu, 0x00000001u, 0x807fffffu, 0x00800000u, 0x7f7fffffu,
        0x477fe000u, 0x477ff000u, 0x477fefffu, 0x387fe000u, 0x33000000u, 0x33000001u,
        0x3f808000u, 0x3f818000u, 0x3f801000u, 0x3f803000u, 0xc7800000u, 0x38800000u,
    };
    uint32_t r = check_rand32();
    switch (r % 8) {
    case 0: return special[check_rand32() % (sizeof special / sizeof special[0])];
    case 1: /* near the f16 range, with low bits that decide rounding */
        return (check_rand32() & 0x80000000u) | (0x33000000u + check_rand32() % 0x14800000u);
    case 2: /* exact f16 / bf16 rounding ties */
        return (check_rand32() & 0xffffe000u) | 0x1000u;
    case 3: return (check_rand32() & 0xffff0000u) | 0x8000u;
    case 4: /* NaN with random payload */
        return (check_rand32() & 0x80000000u) | 0x7f800000u | (1u + check_rand32() % 0x7fffffu);
    default: return check_rand32();
    }
}

static float rand_value(void) {
    uint32_t r = check_rand32() % 16;
    if (r == 0) {
        return float_of(rand_f32_bits());
    }
    return check_randf(-4.0f, 4.0f);
}

static int parity(size_t v) {
    int p = 0;
    for (; v != 0; v &= v - 1) {
        p ^= 1;
    }
    return p;
}

/* (int32_t)u as llama.cpp's casts produce it (two's complement). */
static int64_t as_i32(uint32_t u) { return u <= INT32_MAX ? (int64_t)u : (int64_t)u - 4294967296LL; }

/* Same bits, or both NaN. */
static int same_float(float a, float b) {
    return bits_of(a) == bits_of(b) || (isnan(a) && isnan(b));
}

static const pmk_table *const *runnable(int *count) {
    static const pmk_table *list[16];
    int n = 0;
    uint32_t cpu = pmk_cpu_bits();
    for (const pmk_table *const *t = pmk_all(); *t != NULL && n < 15; t++) {
        if (((*t)->needs & ~cpu) == 0) {
            list[n++] = *t;
        } else {
            printf("  (skipping kernel table '%s': not supported by this CPU)\n", (*t)->name);
        }
    }
    list[n] = NULL;
    *count = n;
    return list;
}

/* ---- conversions ---------------------------------------------------------------------- */

static void test_f16_to_f32(void) {
    int nt;
    const pmk_table *const *tabs = runnable(&nt);
    static uint16_t src[MAXN + PAD];
    static float ref[MAXN + PAD], out[MAXN + PAD];
    for (int ti = 0; ti < nt; ti++) {
        const pmk_table *t = tabs[ti];
        check_current = t->name;
        for (size_t n = 0; n <= MAXN; n++) {
            for (size_t off = 0; off < 4; off++) {
                for (size_t i = 0; i < MAXN + PAD; i++) {
                    uint32_t r = check_rand32();
                    src[i] = (r & 1) ? (uint16_t)(r >> 16) : (uint16_t)(0x7c00u | (r >> 22) |
                                                                         (r & 0x8000u));
                }
                memset(out, CANARY, sizeof out);
                memset(ref, CANARY, sizeof ref);
                pmk_scalar.f16_to_f32(src + off, ref + off, n);
                t->f16_to_f32(src + off, out + off, n);
                CHECK_MSG(memcmp(out, ref, sizeof out) == 0, "%s f16_to_f32 n=%zu off=%zu",
                          t->name, n, off);
            }
        }
        /* every half, in one call */
        static uint16_t all[65536];
        static float a1[65536], a2[65536];
        for (uint32_t h = 0; h < 65536; h++) {
            all[h] = (uint16_t)h;
        }
        pmk_scalar.f16_to_f32(all, a1, 65536);
        t->f16_to_f32(all, a2, 65536);
        long bad = 0;
        for (uint32_t h = 0; h < 65536; h++) {
            bad += bits_of(a1[h]) != bits_of(a2[h]);
            bad += bits_of(a1[h]) != bits_of(pmi_f16_to_f32((uint16_t)h));
        }
        CHECK_MSG(bad == 0, "%s: %ld halves differ", t->name, bad);
    }
    check_current = "test_f16_to_f32";
}

static void test_f32_to_16(void) {
    int nt;
    const pmk_table *const *tabs = runnable(&nt);
    static float src[MAXN + PAD];
    static uint16_t ref[MAXN + PAD], out[MAXN + PAD];
    for (int ti = 0; ti < nt; ti++) {
        const pmk_table *t = tabs[ti];
        check_current = t->name;
        for (int which = 0; which < 2; which++) {
            void (*fk)(const float *, uint16_t *, size_t) = which ? t->f32_to_bf16 : t->f32_to_f16;
            void (*fs)(const float *, uint16_t *, size_t) =
                which ? pmk_scalar.f32_to_bf16 : pmk_scalar.f32_to_f16;
            for (size_t n = 0; n <= MAXN; n++) {
                for (size_t off = 0; off < 4; off++) {
                    for (int rep = 0; rep < 4; rep++) {
                        for (size_t i = 0; i < MAXN + PAD; i++) {
                            src[i] = float_of(rand_f32_bits());
                        }
                        memset(out, CANARY, sizeof out);
                        memset(ref, CANARY, sizeof ref);
                        fs(src + off, ref + off, n);
                        fk(src + off, out + off, n);
                        CHECK_MSG(memcmp(out, ref, sizeof out) == 0, "%s %s n=%zu off=%zu",
                                  t->name, which ? "f32_to_bf16" : "f32_to_f16", n, off);
                    }
                }
            }
            /* a long random run against the element functions */
            enum { BIG = 1 << 16 };
            static float bs[BIG];
            static uint16_t bo[BIG];
            for (size_t i = 0; i < BIG; i++) {
                bs[i] = float_of(rand_f32_bits());
            }
            fk(bs, bo, BIG);
            long bad = 0;
            for (size_t i = 0; i < BIG; i++) {
                uint16_t want = which ? pmi_f32_to_bf16(bs[i]) : pmi_f32_to_f16(bs[i]);
                if (bo[i] != want && bad++ < 5) {
                    fprintf(stderr, "  %s %s(0x%08x) = 0x%04x, element rule 0x%04x\n", t->name,
                            which ? "bf16" : "f16", (unsigned)bits_of(bs[i]), (unsigned)bo[i],
                            (unsigned)want);
                }
            }
            CHECK_EQ_INT(bad, 0);
        }
    }
    check_current = "test_f32_to_16";
}

/* ---- KQ mask ------------------------------------------------------------------------------ */

/* SPEC 4.3 / 4.9 (llama.cpp's is_masked_swa), restated with 64-bit arithmetic for
 * positions >= 0; n_swa goes through llama.cpp's (int32_t) casts. */
static float mask_expect(int32_t p0, int member, const pmk_mask_row *r) {
    if (!member) {
        return -INFINITY;
    }
    int64_t a = p0, b = r->p1;
    if (r->causal && a > b) {
        return -INFINITY;
    }
    bool in_span = r->span_min != INT32_MAX && a >= r->span_min;
    if (!in_span) {
        bool masked = false;
        switch (r->swa_type) {
        case PM_SWA_STANDARD: masked = b - a >= as_i32(r->n_swa); break;
        case PM_SWA_CHUNKED: masked = r->n_swa != 0 && a < (b / r->n_swa) * r->n_swa; break;
        case PM_SWA_SYMMETRIC: {
            int64_t h = as_i32(r->n_swa) / 2;
            masked = b - a < -h || b - a > h;
            break;
        }
        default: break;
        }
        if (masked) {
            return -INFINITY;
        }
    }
    return r->alibi ? (float)(-(a > b ? a - b : b - a)) : 0.0f;
}

static void random_mask_row(pmk_mask_row *r, int extreme) {
    static const uint32_t swas[] = {0, 1, 2, 3, 1, 2, 3, 7};
    r->swa_type = (int32_t)swas[check_rand32() % 8];
    static const uint32_t nsw[] = {0, 1, 2, 3, 4, 5, 8, 32, 100, 4096, 0x7fffffffu, 0x80000000u,
                                   0xffffffffu};
    r->n_swa = (check_rand32() % 3 == 0) ? nsw[check_rand32() % 13] : 1 + check_rand32() % 64;
    if (r->swa_type == PM_SWA_CHUNKED && r->n_swa == 0 && !extreme) {
        r->n_swa = 4;
    }
    r->causal = check_rand32() & 1;
    r->alibi = (check_rand32() % 3) == 0;
    if (extreme) {
        static const int32_t ps[] = {INT32_MIN, INT32_MIN + 1, -5, -1, 0, 1, INT32_MAX - 1,
                                     INT32_MAX};
        r->p1 = (check_rand32() & 1) ? ps[check_rand32() % 8] : (int32_t)check_rand32();
        r->span_min = (check_rand32() & 1) ? INT32_MAX : (int32_t)check_rand32();
    } else {
        r->p1 = (int32_t)(check_rand32() % 200);
        r->span_min = (check_rand32() % 3 == 0) ? (int32_t)(check_rand32() % 200) : INT32_MAX;
    }
}

static void test_mask_row(void) {
    int nt;
    const pmk_table *const *tabs = runnable(&nt);
    static pm_pos pos[MAXN + PAD];
    static uint64_t member[(MAXN + PAD + 63) / 64 + 1];
    static float ref[MAXN + PAD], out[MAXN + PAD];
    long semantic_bad = 0;
    for (int iter = 0; iter < 600; iter++) {
        pmk_mask_row r;
        int extreme = iter % 4 == 3;
        random_mask_row(&r, extreme);
        for (size_t i = 0; i < MAXN + PAD; i++) {
            pos[i] = extreme ? (int32_t)check_rand32() : (pm_pos)(check_rand32() % 220);
        }
        for (size_t w = 0; w < sizeof member / sizeof member[0]; w++) {
            member[w] = check_rand64();
            if (iter % 5 == 0) {
                member[w] = ~(uint64_t)0;
            }
        }
        for (size_t n = 0; n <= MAXN; n++) {
            memset(ref, CANARY, sizeof ref);
            pmk_scalar.mask_row(ref, pos, member, n, &r);
            if (!extreme) {
                for (size_t j = 0; j < n; j++) {
                    int bit = (int)((member[j >> 6] >> (j & 63)) & 1);
                    semantic_bad += bits_of(ref[j]) != bits_of(mask_expect(pos[j], bit, &r));
                }
            }
            for (size_t j = n; j < MAXN + PAD; j++) {
                semantic_bad += bits_of(ref[j]) != 0x5a5a5a5au;
            }
            for (int ti = 0; ti < nt; ti++) {
                const pmk_table *t = tabs[ti];
                /* the cell pointer and output may start anywhere; bits count from cell 0 */
                for (size_t off = 0; off < 4 && off + n <= MAXN + PAD; off += 3) {
                    static float ro[MAXN + PAD];
                    memset(out, CANARY, sizeof out);
                    memset(ro, CANARY, sizeof ro);
                    pmk_scalar.mask_row(ro + off, pos + off, member, n, &r);
                    t->mask_row(out + off, pos + off, member, n, &r);
                    CHECK_MSG(memcmp(out, ro, sizeof out) == 0,
                              "%s mask n=%zu off=%zu swa=%d n_swa=%u causal=%u alibi=%u p1=%d "
                              "span=%d", t->name, n, off, (int)r.swa_type, (unsigned)r.n_swa,
                              (unsigned)r.causal, (unsigned)r.alibi, (int)r.p1, (int)r.span_min);
                }
            }
        }
    }
    CHECK_EQ_INT(semantic_bad, 0);

    /* a long row, to cross many 64-bit membership words */
    enum { LONG = 1000 };
    static pm_pos lp[LONG];
    static uint64_t lm[(LONG + 63) / 64];
    static float lr[LONG], lo[LONG];
    for (int i = 0; i < LONG; i++) {
        lp[i] = i % 300;
    }
    for (size_t w = 0; w < sizeof lm / sizeof lm[0]; w++) {
        lm[w] = check_rand64();
    }
    for (int sw = 0; sw < 4; sw++) {
        pmk_mask_row r = {150, 1, sw, 32, INT32_MAX, (uint32_t)(sw & 1)};
        pmk_scalar.mask_row(lr, lp, lm, LONG, &r);
        for (int ti = 0; ti < nt; ti++) {
            tabs[ti]->mask_row(lo, lp, lm, LONG, &r);
            CHECK_EQ_MEM(lo, lr, sizeof lr);
        }
    }
}

/* Hand-checked rows of the SPEC tables. */
static void test_mask_known(void) {
    pm_pos pos[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    uint64_t all = 0xff, some = 0xf5; /* cells 1 and 3 not in the sequence */
    float out[8];
    const float I = -INFINITY;
    /* causal, no SWA, query at 4 */
    pmk_mask_row r = {4, 1, PM_SWA_NONE, 0, INT32_MAX, 0};
    pmk_scalar.mask_row(out, pos, &some, 8, &r);
    const float e1[8] = {0, I, 0, I, 0, I, I, I};
    CHECK_EQ_MEM(out, e1, sizeof e1);
    /* STANDARD n_swa 3: masked when p1 - p0 >= 3 */
    r = (pmk_mask_row){5, 1, PM_SWA_STANDARD, 3, INT32_MAX, 0};
    pmk_scalar.mask_row(out, pos, &all, 8, &r);
    const float e2[8] = {I, I, I, 0, 0, 0, I, I};
    CHECK_EQ_MEM(out, e2, sizeof e2);
    /* CHUNKED n_swa 4, query at 6: chunk starts at 4 */
    r = (pmk_mask_row){6, 1, PM_SWA_CHUNKED, 4, INT32_MAX, 0};
    pmk_scalar.mask_row(out, pos, &all, 8, &r);
    const float e3[8] = {I, I, I, I, 0, 0, 0, I};
    CHECK_EQ_MEM(out, e3, sizeof e3);
    /* SYMMETRIC n_swa 5 (h = 2), non-causal, query at 3 */
    r = (pmk_mask_row){3, 0, PM_SWA_SYMMETRIC, 5, INT32_MAX, 0};
    pmk_scalar.mask_row(out, pos, &all, 8, &r);
    const float e4[8] = {I, 0, 0, 0, 0, 0, I, I};
    CHECK_EQ_MEM(out, e4, sizeof e4);
    /* span: SWA not applied at p0 >= span_min */
    r = (pmk_mask_row){7, 0, PM_SWA_STANDARD, 2, 2, 0};
    pmk_scalar.mask_row(out, pos, &all, 8, &r);
    const float e5[8] = {I, I, 0, 0, 0, 0, 0, 0};
    CHECK_EQ_MEM(out, e5, sizeof e5);
    /* alibi: -|p0 - p1|, and +0.0 (llama.cpp converts -abs(0) as an integer) at p0 == p1 */
    r = (pmk_mask_row){5, 1, PM_SWA_NONE, 0, INT32_MAX, 1};
    pmk_scalar.mask_row(out, pos, &all, 8, &r);
    const float e6[8] = {-5, -4, -3, -2, -1, 0, I, I};
    CHECK_EQ_MEM(out, e6, sizeof e6);
    CHECK_EQ_U64(bits_of(out[5]), 0);
    /* CHUNKED compares signed: an (invalid) negative cell position is masked */
    pm_pos neg[2] = {-1, 5};
    r = (pmk_mask_row){5, 0, PM_SWA_CHUNKED, 4, INT32_MAX, 0};
    pmk_scalar.mask_row(out, neg, &all, 2, &r);
    CHECK(out[0] == -INFINITY && out[1] == 0.0f);
}

/* ---- rope ------------------------------------------------------------------------------- */

static void test_rope(void) {
    int nt;
    const pmk_table *const *tabs = runnable(&nt);
    enum { CAP = 2 * MAXN + PAD };
    static float x0[CAP], cs[CAP], ref[CAP], out[CAP];
    long semantic_bad = 0;
    for (int neox = 0; neox < 2; neox++) {
        for (size_t np = 0; np <= MAXN; np++) {
            for (size_t off = 0; off < 4; off++) {
                for (size_t i = 0; i < CAP; i++) {
                    x0[i] = rand_value();
                    cs[i] = (check_rand32() % 32 == 0) ? float_of(rand_f32_bits())
                                                       : check_randf(-1.5f, 1.5f);
                }
                memcpy(ref, x0, sizeof ref);
                pmk_scalar.rope_f32(ref + off, cs, np, neox);
                /* contract (ggml-cpu's rotate_pairs as the x86 build computes it):
                 * fmaf(a, c, -(b*s)) and fmaf(a, s, b*c) */
                for (size_t i = 0; i < np; i++) {
                    size_t ia = neox ? i : 2 * i, ib = neox ? i + np : 2 * i + 1;
                    float a = x0[off + ia], b = x0[off + ib];
                    float c = cs[2 * i], s = cs[2 * i + 1];
                    float bs = b * s, bc = b * c;
                    semantic_bad += !same_float(ref[off + ia], fmaf(a, c, -bs));
                    semantic_bad += !same_float(ref[off + ib], fmaf(a, s, bc));
                    /* the fused form differs from "products, then the difference" by the
                     * rounding of a*c plus one of the result */
                    if (isfinite(a) && isfinite(b) && fabsf(c) <= 1.5f && fabsf(s) <= 1.5f) {
                        float plain = a * c - bs;
                        semantic_bad += fabsf(plain - ref[off + ia]) >
                                        (fabsf(a * c) + fabsf(bs)) * 1.2e-7f + 1e-30f;
                    }
                }
                for (size_t i = 0; i < CAP; i++) {
                    if (i < off || i >= off + 2 * np) {
                        semantic_bad += bits_of(ref[i]) != bits_of(x0[i]);
                    }
                }
                for (int ti = 0; ti < nt; ti++) {
                    memcpy(out, x0, sizeof out);
                    tabs[ti]->rope_f32(out + off, cs, np, neox);
                    long bad = 0;
                    for (size_t i = 0; i < CAP; i++) {
                        bad += !same_float(out[i], ref[i]);
                    }
                    CHECK_MSG(bad == 0, "%s rope neox=%d n_pairs=%zu off=%zu: %ld differ",
                              tabs[ti]->name, neox, np, off, bad);
                }
            }
        }
    }
    CHECK_EQ_INT(semantic_bad, 0);
}

/* ---- fwht --------------------------------------------------------------------------------- */

static void test_fwht(void) {
    int nt;
    const pmk_table *const *tabs = runnable(&nt);
    enum { CAP = 1024 + PAD };
    static float x0[CAP], ref[CAP], out[CAP];
    long semantic_bad = 0;
    for (size_t n = 0; n <= 1024; n = n < 64 ? n + 1 : n * 2) {
        for (size_t off = 0; off < 4; off += (n > 64 ? 3 : 1)) {
            for (int rep = 0; rep < 3; rep++) {
                for (size_t i = 0; i < CAP; i++) {
                    x0[i] = rep == 2 ? rand_value() : check_randf(-2.0f, 2.0f);
                }
                float scale = rep == 0 ? 1.0f / sqrtf((float)(n ? n : 1)) : check_randf(0.1f, 2.0f);
                memcpy(ref, x0, sizeof ref);
                pmk_scalar.fwht_f32(ref + off, n, scale);
                int pow2 = n != 0 && (n & (n - 1)) == 0;
                if (!pow2) {
                    semantic_bad += memcmp(ref, x0, sizeof ref) != 0; /* no-op */
                } else if (rep != 2 && n <= 256) {
                    /* against the Hadamard matrix in double: H[i][j] = (-1)^popcount(i & j) */
                    for (size_t i = 0; i < n; i++) {
                        double s = 0;
                        for (size_t j = 0; j < n; j++) {
                            double v = (double)(x0[off + j] * scale);
                            s += parity(i & j) ? -v : v;
                        }
                        double tol = 1e-5 * (double)n * 2.0 * scale + 1e-6;
                        semantic_bad += fabs(s - ref[off + i]) > tol;
                    }
                }
                for (int ti = 0; ti < nt; ti++) {
                    memcpy(out, x0, sizeof out);
                    tabs[ti]->fwht_f32(out + off, n, scale);
                    long bad = 0;
                    for (size_t i = 0; i < CAP; i++) {
                        bad += !same_float(out[i], ref[i]);
                    }
                    CHECK_MSG(bad == 0, "%s fwht n=%zu off=%zu rep=%d: %ld differ",
                              tabs[ti]->name, n, off, rep, bad);
                }
            }
        }
    }
    CHECK_EQ_INT(semantic_bad, 0);
    /* H is its own inverse when scaled by 1/sqrt(n) */
    float v[64], w[64];
    for (int i = 0; i < 64; i++) {
        v[i] = w[i] = check_randf(-1, 1);
    }
    pmk_scalar.fwht_f32(w, 64, 0.125f);
    pmk_scalar.fwht_f32(w, 64, 0.125f);
    for (int i = 0; i < 64; i++) {
        CHECK_NEAR(w[i], v[i], 1e-6);
    }
}

/* ---- copy + XXH3-128 ------------------------------------------------------------------- */
static void hex16(const uint8_t d[16], char out[33]) {
    for (int i = 0; i < 16; i++) {
        snprintf(out + 2 * i, 3, "%02x", d[i]);
    }
}

static void test_copy_hash(void) {
    int nt;
    const pmk_table *const *tabs = runnable(&nt);
    enum { NS = 100000, ND = 200000 };
    static uint8_t src[NS], ref[ND], out[ND];
    for (size_t i = 0; i < NS; i++) {
        src[i] = (uint8_t)(i * 7 % 256);
    }
    /* known digests (xxHash 0.8's XXH3-128, canonical): empty input, and src whole, also when it
     * is cut into runs of rows of every shape */
    char hex[33];
    uint8_t d[16];
    pmk_scalar.copy_hash(NULL, 0, d);
    hex16(d, hex);
    CHECK_MSG(strcmp(hex, "99aa06d3014798d86001c324468d497f") == 0, "empty: %s", hex);
    const char *want = "4fb78cd2670dad5801271d2740e5fca3";
    for (int shape = 0; shape < 4; shape++) {
        uint64_t row = shape == 0 ? NS : shape == 1 ? 1000 : shape == 2 ? 40000 : 7;
        pm_copy_run runs[3];
        uint64_t rows = NS / row, rest = NS - rows * row;
        runs[0] = (pm_copy_run){src, shape & 1 ? ref : NULL, rows, row, row, row + 5};
        runs[1] = (pm_copy_run){src + rows * row, NULL, rest ? 1 : 0, rest, 0, 0};
        runs[2] = (pm_copy_run){src, NULL, 0, 9, 9, 9}; /* empty */
        for (int ti = 0; ti < nt; ti++) {
            tabs[ti]->copy_hash(runs, 3, d);
            hex16(d, hex);
            CHECK_MSG(strcmp(hex, want) == 0, "%s shape %d: %s", tabs[ti]->name, shape, hex);
        }
    }
    /* random runs: copies and digests of every table equal scalar's */
    for (int rep = 0; rep < 40; rep++) {
        pm_copy_run runs[8];
        size_t doff[8];
        int copy[8];
        size_t n = 0, so = 0, dof = 0;
        for (; n < 8; n++) {
            uint64_t row = 1 + check_rand32() % (rep % 2 ? 600 : 20000);
            uint64_t rows = check_rand32() % 12;
            uint64_t ss = row + check_rand32() % 3, ds = row + check_rand32() % 9;
            if (so + rows * ss > NS || dof + rows * ds > ND) {
                break;
            }
            copy[n] = check_rand32() % 3 != 0;
            doff[n] = dof;
            runs[n] = (pm_copy_run){src + so, NULL, rows, row, ss, ds};
            so += rows * ss;
            dof += copy[n] ? rows * ds : 0;
        }
        uint8_t dref[16];
        memset(ref, CANARY, sizeof ref);
        for (size_t i = 0; i < n; i++) {
            runs[i].dst = copy[i] ? ref + doff[i] : NULL;
        }
        pmk_scalar.copy_hash(runs, n, dref);
        for (int ti = 0; ti < nt; ti++) {
            memset(out, CANARY, sizeof out);
            for (size_t i = 0; i < n; i++) {
                runs[i].dst = copy[i] ? out + doff[i] : NULL;
            }
            tabs[ti]->copy_hash(runs, n, d);
            CHECK_MSG(memcmp(d, dref, 16) == 0 && memcmp(out, ref, sizeof out) == 0, "%s rep %d", tabs[ti]->name, rep);
        }
    }
    /* the public entry refuses what it can check */
    CHECK_EQ_INT(pm_copy_hash128(NULL, 1, d), PM_E_INVALID_ARG);
    CHECK_EQ_INT(pm_copy_hash128(NULL, 0, NULL), PM_E_INVALID_ARG);
    pm_copy_run nosrc = {NULL, NULL, 1, 1, 0, 0};
    CHECK_EQ_INT(pm_copy_hash128(&nosrc, 1, d), PM_E_INVALID_ARG);
    pm_copy_run huge = {src, NULL, UINT64_MAX, 2, UINT64_MAX / 2, 0};
    CHECK_EQ_INT(pm_copy_hash128(&huge, 1, d), PM_E_INVALID_ARG);
}

/* ---- dispatch --------------------------------------------------------------------------- */

static void test_dispatch(void) {
    const char *start = pm_kernels_name();
    CHECK(start != NULL);
    const char *names[8] = {0};
    uint32_t na = pm_kernels_available(names, 8);
    CHECK(na >= 1);
    CHECK_EQ_STR(names[0], "scalar");
    CHECK_EQ_INT(pm_kernels_available(NULL, 0), na);
    const char *one[1] = {0};
    CHECK_EQ_INT(pm_kernels_available(one, 1), na);
    CHECK_EQ_STR(one[0], "scalar");
    const char *best = names[na - 1];
    printf("  kernels: active '%s', available:", start);
    for (uint32_t i = 0; i < na; i++) {
        printf(" %s", names[i]);
    }
    printf(" (cpu bits 0x%x)\n", (unsigned)pmk_cpu_bits());

    /* the start-up choice follows the environment */
    const char *fs = getenv("PYMEM_FORCE_SCALAR");
    const char *fk = getenv("PYMEM_FORCE_KERNEL");
    const char *want = best;
    if (fs != NULL && fs[0] != '\0' && strcmp(fs, "0") != 0) {
        want = "scalar";
    } else if (fk != NULL && fk[0] != '\0') {
        for (uint32_t i = 0; i < na; i++) {
            if (strcmp(names[i], fk) == 0) {
                want = names[i];
            }
        }
    }
    CHECK_EQ_STR(start, want);
    CHECK(pmk_get() != NULL && strcmp(pmk_get()->name, start) == 0);

    /* pmk_all lists everything compiled, NULL-terminated, scalar first */
    const pmk_table *const *all = pmk_all();
    CHECK(all[0] == &pmk_scalar);
    int n_all = 0;
    for (; all[n_all] != NULL; n_all++) {
        CHECK(all[n_all]->f16_to_f32 && all[n_all]->f32_to_f16 && all[n_all]->f32_to_bf16 &&
              all[n_all]->mask_row && all[n_all]->rope_f32 && all[n_all]->fwht_f32);
    }
    CHECK(n_all >= (int)na);
#if defined(PM_HAVE_X86)
    CHECK_EQ_INT(n_all, 3);
#endif

    for (uint32_t i = 0; i < na; i++) {
        CHECK_EQ_INT(pm_kernels_select(names[i]), PM_OK);
        CHECK_EQ_STR(pm_kernels_name(), names[i]);
    }
    CHECK_EQ_INT(pm_kernels_select("scalar"), PM_OK);
    CHECK_EQ_STR(pm_kernels_name(), "scalar");
    CHECK_EQ_INT(pm_kernels_select("bogus"), PM_E_INVALID_ARG);
    CHECK(strstr(pm_last_error(), "bogus") != NULL);
    CHECK_EQ_INT(pm_kernels_select(NULL), PM_E_INVALID_ARG);
    CHECK_EQ_STR(pm_kernels_name(), "scalar"); /* failures change nothing */
#if defined(PM_HAVE_X86)
    CHECK_EQ_INT(pm_kernels_select("neon"), PM_E_UNSUPPORTED);
    if (!(pmk_cpu_bits() & PMK_CPU_AVX512)) {
        CHECK_EQ_INT(pm_kernels_select("avx512"), PM_E_UNSUPPORTED);
    }
#endif
    CHECK_EQ_INT(pm_kernels_select("auto"), PM_OK);
    CHECK_EQ_STR(pm_kernels_name(), want);
}

int main(void) {
    RUN(test_dispatch);
    RUN(test_f16_to_f32);
    RUN(test_f32_to_16);
    RUN(test_mask_known);
    RUN(test_mask_row);
    RUN(test_rope);
    RUN(test_fwht);
    RUN(test_copy_hash);
    return check_report("test_kernels");
}
