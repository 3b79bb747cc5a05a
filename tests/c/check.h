/* check.h - a tiny test harness for pymem's C tests (no framework).
 *
 *   static void test_something(void) { CHECK(x == 1); CHECK_EQ_INT(f(), 3); }
 *   int main(void) { RUN(test_something); return check_report("test_x"); }
 *
 * Every CHECK counts as one pass or one failure; failures print file:line and the values
 * (the first CHECK_MAX_PRINT of them; the rest are only counted).  check_report prints
 * "<name>: N passed, M failed" and returns the process exit status (nonzero on failure). */
#ifndef PM_CHECK_H
#define PM_CHECK_H

#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#ifndef CHECK_MAX_PRINT
#define CHECK_MAX_PRINT 40
#endif

static long check_passed;
static long check_failed;
static const char *check_current = "";

static int check_fail_begin(const char *file, int line) {
    check_failed++;
    if (check_failed > CHECK_MAX_PRINT) {
        if (check_failed == CHECK_MAX_PRINT + 1) {
            fprintf(stderr, "  (further failures are counted, not printed)\n");
        }
        return 0;
    }
    fprintf(stderr, "%s:%d: [%s] ", file, line, check_current);
    return 1;
}

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (cond) {                                                                          \
            check_passed++;                                                                  \
        } else if (check_fail_begin(__FILE__, __LINE__)) {                                   \
            fprintf(stderr, "CHECK(%s) failed\n", #cond);                                    \
        }                                                                                    \
    } while (0)

/* Like CHECK with a printf-style note on failure. */
#define CHECK_MSG(cond, ...)                                                                 \
    do {                                                                                     \
        if (cond) {                                                                          \
            check_passed++;                                                                  \
        } else if (check_fail_begin(__FILE__, __LINE__)) {                                   \
            fprintf(stderr, "CHECK(%s) failed: ", #cond);                                    \
            fprintf(stderr, __VA_ARGS__);                                                    \
            fprintf(stderr, "\n");                                                           \
        }                                                                                    \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                                   \
    do {                                                                                     \
        long long check_a_ = (long long)(a), check_b_ = (long long)(b);                      \
        if (check_a_ == check_b_) {                                                          \
            check_passed++;                                                                  \
        } else if (check_fail_begin(__FILE__, __LINE__)) {                                   \
            fprintf(stderr, "%s == %s failed: %lld != %lld\n", #a, #b, check_a_, check_b_);  \
        }                                                                                    \
    } while (0)

#define CHECK_EQ_U64(a, b)                                                                   \
    do {                                                                                     \
        uint64_t check_a_ = (uint64_t)(a), check_b_ = (uint64_t)(b);                         \
        if (check_a_ == check_b_) {                                                          \
            check_passed++;                                                                  \
        } else if (check_fail_begin(__FILE__, __LINE__)) {                                   \
            fprintf(stderr, "%s == %s failed: 0x%" PRIx64 " != 0x%" PRIx64 "\n", #a, #b,      \
                    check_a_, check_b_);                                                     \
        }                                                                                    \
    } while (0)

#define CHECK_EQ_STR(a, b)                                                                   \
    do {                                                                                     \
        const char *check_a_ = (a), *check_b_ = (b);                                         \
        if (check_a_ != NULL && check_b_ != NULL && strcmp(check_a_, check_b_) == 0) {       \
            check_passed++;                                                                  \
        } else if (check_fail_begin(__FILE__, __LINE__)) {                                   \
            fprintf(stderr, "%s == %s failed: \"%s\" != \"%s\"\n", #a, #b,                    \
                    check_a_ ? check_a_ : "(null)", check_b_ ? check_b_ : "(null)");         \
        }                                                                                    \
    } while (0)

#define CHECK_EQ_MEM(a, b, n)                                                                \
    do {                                                                                     \
        if (memcmp((a), (b), (n)) == 0) {                                                    \
            check_passed++;                                                                  \
        } else if (check_fail_begin(__FILE__, __LINE__)) {                                   \
            fprintf(stderr, "memcmp(%s, %s, %s) != 0\n", #a, #b, #n);                        \
        }                                                                                    \
    } while (0)

/* |a - b| <= tol (doubles; NaN fails). */
#define CHECK_NEAR(a, b, tol)                                                                \
    do {                                                                                     \
        double check_a_ = (double)(a), check_b_ = (double)(b), check_t_ = (double)(tol);     \
        if (fabs(check_a_ - check_b_) <= check_t_) {                                         \
            check_passed++;                                                                  \
        } else if (check_fail_begin(__FILE__, __LINE__)) {                                   \
            fprintf(stderr, "%s ~ %s failed: %.9g vs %.9g (tol %.3g)\n", #a, #b, check_a_,    \
                    check_b_, check_t_);                                                     \
        }                                                                                    \
    } while (0)

/* Run one test function, naming it in failure messages. */
#define RUN(fn)                                                                              \
    do {                                                                                     \
        long check_f0_ = check_failed;                                                       \
        check_current = #fn;                                                                 \
        fn();                                                                                \
        printf("  %-40s %s\n", #fn, check_failed == check_f0_ ? "ok" : "FAILED");            \
    } while (0)

static int check_report(const char *name) {
    printf("%s: %ld passed, %ld failed\n", name, check_passed, check_failed);
    return check_failed != 0 ? 1 : 0;
}

/* Deterministic xorshift64* generator for test inputs. */
static uint64_t check_rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t check_rand64(void) {
    uint64_t x = check_rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    check_rng_state = x;
    return x * 0x2545f4914f6cdd1dull;
}

static uint32_t check_rand32(void) { return (uint32_t)(check_rand64() >> 32); }

/* Uniform float in [lo, hi). */
static float check_randf(float lo, float hi) {
    return lo + (hi - lo) * (float)(check_rand32() >> 8) * (1.0f / 16777216.0f);
}

#endif /* PM_CHECK_H */
