/* dispatch.c - CPU feature detection and the active kernel table.
 *
 * Detection runs once: CPUID feature bits plus the XGETBV mask that says the OS saves the
 * AVX / AVX-512 register state (as BLAKE3's c/blake3_dispatch.c does).  On arm64 NEON is
 * baseline.  The table is chosen on first use from the CPU and the environment
 * (PYMEM_FORCE_SCALAR=1, or PYMEM_FORCE_KERNEL=<name>; an unknown or unsupported name falls
 * back to the best supported table) and kept in an atomic pointer. */
#include "pmk_common.h"

#include <stdatomic.h>
#include <stdlib.h>

#if defined(PM_HAVE_X86) && (defined(__x86_64__) || defined(_M_X64))
#define PMK_X86 1
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

/* Every table compiled in, best last. */
static const pmk_table *const g_tables[] = {
    &pmk_scalar,
#if defined(PMK_X86)
    &pmk_avx2,
    &pmk_avx512,
#endif
#if defined(PM_HAVE_NEON) && defined(__aarch64__)
    &pmk_neon,
#endif
    NULL,
};

#define PMK_CPU_DETECTED 0x80000000u

static _Atomic uint32_t g_cpu_bits;
static _Atomic(const pmk_table *) g_active;

#if defined(PMK_X86)
static void pmk_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
#if defined(_MSC_VER) && !defined(__clang__)
    int v[4];
    __cpuidex(v, (int)leaf, (int)sub);
    for (int i = 0; i < 4; i++) {
        r[i] = (uint32_t)v[i];
    }
#else
    unsigned a = 0, b = 0, c = 0, d = 0;
    __cpuid_count(leaf, sub, a, b, c, d);
    r[0] = a;
    r[1] = b;
    r[2] = c;
    r[3] = d;
#endif
}

/* XCR0: which register states the OS saves (only call when CPUID says OSXSAVE). */
static uint64_t pmk_xgetbv0(void) {
#if defined(_MSC_VER) && !defined(__clang__)
    return (uint64_t)_xgetbv(0);
#else
    uint32_t eax, edx;
    __asm__ __volatile__("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
#endif
}

static uint32_t pmk_detect(void) {
    uint32_t r[4];
    uint32_t bits = 0;
    pmk_cpuid(0, 0, r);
    uint32_t max_leaf = r[0];
    if (max_leaf < 7) {
        return 0;
    }
    pmk_cpuid(1, 0, r);
    uint32_t ecx1 = r[2];
    int fma = (ecx1 >> 12) & 1;
    int osxsave = (ecx1 >> 27) & 1;
    int avx = (ecx1 >> 28) & 1;
    int f16c = (ecx1 >> 29) & 1;
    if (!osxsave || !avx) {
        return 0;
    }
    uint64_t xcr0 = pmk_xgetbv0();
    int os_ymm = (xcr0 & 0x6u) == 0x6u;              /* XMM | YMM */
    int os_zmm = (xcr0 & 0xe6u) == 0xe6u;            /* + opmask, ZMM_Hi256, Hi16_ZMM */
    pmk_cpuid(7, 0, r);
    uint32_t ebx7 = r[1];
    int avx2 = (ebx7 >> 5) & 1;
    int bmi2 = (ebx7 >> 8) & 1;
    int avx512f = (ebx7 >> 16) & 1;
    int avx512dq = (ebx7 >> 17) & 1;
    int avx512bw = (ebx7 >> 30) & 1;
    int avx512vl = (ebx7 >> 31) & 1;
    if (os_ymm && avx2 && fma && f16c && bmi2) {
        bits |= PMK_CPU_AVX2;
        if (os_zmm && avx512f && avx512dq && avx512bw && avx512vl) {
            bits |= PMK_CPU_AVX512;
        }
    }
    return bits;
}
#elif defined(PM_HAVE_NEON) && defined(__aarch64__)
static uint32_t pmk_detect(void) { return PMK_CPU_NEON; }
#else
static uint32_t pmk_detect(void) { return 0; }
#endif

/* The CPU's PMK_CPU_* bits (detected once). */
uint32_t pmk_cpu_bits(void) {
    uint32_t v = atomic_load_explicit(&g_cpu_bits, memory_order_acquire);
    if (!(v & PMK_CPU_DETECTED)) {
        v = pmk_detect() | PMK_CPU_DETECTED;
        atomic_store_explicit(&g_cpu_bits, v, memory_order_release);
    }
    return v & ~PMK_CPU_DETECTED;
}

/* All compiled tables, NULL-terminated (supported or not). */
const pmk_table *const *pmk_all(void) { return g_tables; }

static int pmk_supported(const pmk_table *t) {
    return (t->needs & ~pmk_cpu_bits()) == 0;
}

static const pmk_table *pmk_find(const char *name) {
    for (size_t i = 0; g_tables[i] != NULL; i++) {
        if (strcmp(g_tables[i]->name, name) == 0) {
            return g_tables[i];
        }
    }
    return NULL;
}

static const pmk_table *pmk_best(void) {
    const pmk_table *best = &pmk_scalar;
    for (size_t i = 0; g_tables[i] != NULL; i++) {
        if (pmk_supported(g_tables[i])) {
            best = g_tables[i];
        }
    }
    return best;
}

/* The start-up rule: PYMEM_FORCE_SCALAR (any value but "" and "0"), then
 * PYMEM_FORCE_KERNEL=<name> when that table exists and the CPU supports it, else the best. */
static const pmk_table *pmk_choose(void) {
    const char *fs = getenv("PYMEM_FORCE_SCALAR");
    if (fs != NULL && fs[0] != '\0' && strcmp(fs, "0") != 0) {
        return &pmk_scalar;
    }
    const char *fk = getenv("PYMEM_FORCE_KERNEL");
    if (fk != NULL && fk[0] != '\0') {
        const pmk_table *t = pmk_find(fk);
        if (t != NULL && pmk_supported(t)) {
            return t;
        }
    }
    return pmk_best();
}

/* The active table (chosen on first use). */
const pmk_table *pmk_get(void) {
    const pmk_table *t = atomic_load_explicit(&g_active, memory_order_acquire);
    if (PMI_UNLIKELY(t == NULL)) {
        const pmk_table *expected = NULL;
        t = pmk_choose();
        if (!atomic_compare_exchange_strong_explicit(&g_active, &expected, t,
                                                     memory_order_acq_rel,
                                                     memory_order_acquire)) {
            t = expected; /* another thread chose first */
        }
    }
    return t;
}

/* Name of the active kernel table. */
const char *pm_kernels_name(void) { return pmk_get()->name; }

/* Select a table by name; "auto" re-applies the start-up rule (environment, then the best
 * table the CPU supports).  PM_E_INVALID_ARG for NULL or an unknown name, PM_E_UNSUPPORTED
 * when the table is not compiled in or the CPU cannot run it. */
pm_status pm_kernels_select(const char *name) {
    if (name == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "kernels_select: name is NULL");
    }
    const pmk_table *t;
    if (strcmp(name, "auto") == 0) {
        t = pmk_choose();
    } else {
        t = pmk_find(name);
        if (t == NULL) {
            if (strcmp(name, "avx2") == 0 || strcmp(name, "avx512") == 0 ||
                strcmp(name, "neon") == 0) {
                return pmi_fail(PM_E_UNSUPPORTED,
                                "kernels_select: '%s' is not built for this architecture",
                                name);
            }
            return pmi_fail(PM_E_INVALID_ARG, "kernels_select: unknown kernel table '%s'",
                            name);
        }
        if (!pmk_supported(t)) {
            return pmi_fail(PM_E_UNSUPPORTED, "kernels_select: this CPU cannot run '%s'",
                            name);
        }
    }
    atomic_store_explicit(&g_active, t, memory_order_release);
    return PM_OK;
}

/* Names of the tables this CPU can run (scalar first, best last); fills at most cap entries
 * of names (which may be NULL) and returns the total count. */
uint32_t pm_kernels_available(const char **names, uint32_t cap) {
    uint32_t k = 0;
    for (size_t i = 0; g_tables[i] != NULL; i++) {
        if (pmk_supported(g_tables[i])) {
            if (names != NULL && k < cap) {
                names[k] = g_tables[i]->name;
            }
            k++;
        }
    }
    return k;
}
