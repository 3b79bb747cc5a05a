/* replay_main.c - runs a libFuzzer target without libFuzzer (any C11 compiler, e.g. gcc with
 * ASan/UBSan in CI): every file of the given corpus directories (or files), then N
 * deterministic random mutations of them, within a time bound.
 *
 *   replay_fuzz_X [-n MUTATIONS] [-t SECONDS] [-s SEED] DIR_OR_FILE...
 *
 * Defaults come from $PYMEM_FUZZ_MUTATIONS (0), $PYMEM_FUZZ_SECONDS (60) and
 * $PYMEM_FUZZ_SEED (1).  When an input crashes (sanitizer report, failed invariant, signal),
 * it is written to crash-<target>-<n>.bin in $PYMEM_FUZZ_CRASH_DIR (default: the current
 * directory) before the process dies; rerun the program with that file to reproduce. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _WIN32
#include <io.h>
#else
#include <dirent.h>
#include <sys/stat.h>
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#ifndef PM_FUZZ_TARGET
#define PM_FUZZ_TARGET "target"
#endif
#define MAX_INPUT (1u << 20)
#define MAX_FILES 4096

typedef struct input {
    uint8_t *b;
    size_t n;
} input;

static input g_in[MAX_FILES];
static size_t g_n_in;
static const uint8_t *g_cur;
static size_t g_cur_n;
static unsigned long g_exec;
static int g_dumped;

/* ---- crash capture ----------------------------------------------------------------------- */
void pm_fuzz_dump_input(void) {
    if (g_dumped || g_cur == NULL) {
        return;
    }
    g_dumped = 1;
    const char *dir = getenv("PYMEM_FUZZ_CRASH_DIR");
    char path[1024];
    snprintf(path, sizeof path, "%s/crash-%s-%lu.bin", dir && *dir ? dir : ".", PM_FUZZ_TARGET, g_exec);
    FILE *fp = fopen(path, "wb");
    if (fp != NULL) {
        fwrite(g_cur, 1, g_cur_n, fp);
        fclose(fp);
        fprintf(stderr, "replay: the crashing input (%zu bytes) is in %s\n", g_cur_n, path);
    }
}

static void on_signal(int sig) {
    pm_fuzz_dump_input();
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Sanitizer reports end in abort() (caught above, so the input is saved); $ASAN_OPTIONS /
 * $UBSAN_OPTIONS override these defaults. */
const char *__asan_default_options(void) { return "abort_on_error=1:detect_leaks=1"; }
const char *__ubsan_default_options(void) { return "abort_on_error=1:print_stacktrace=1:halt_on_error=1"; }

/* sanitizer runtimes call this before they exit (weak: absent without sanitizers) */
void __sanitizer_set_death_callback(void (*cb)(void)) __attribute__((weak));

static void run(const uint8_t *b, size_t n) {
    g_cur = b;
    g_cur_n = n;
    LLVMFuzzerTestOneInput(b, n);
    g_cur = NULL;
    g_exec++;
}

/* ---- corpus ------------------------------------------------------------------------------ */
static void add_file(const char *path) {
    FILE *fp = fopen(path, "rb");
    if (fp == NULL || g_n_in >= MAX_FILES) {
        if (fp) {
            fclose(fp);
        }
        return;
    }
    uint8_t *b = malloc(MAX_INPUT);
    size_t n = b ? fread(b, 1, MAX_INPUT, fp) : 0;
    fclose(fp);
    if (b == NULL) {
        return;
    }
    g_in[g_n_in].b = b;
    g_in[g_n_in].n = n;
    g_n_in++;
}

static int cmp_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void add_path(const char *path) {
#ifdef _WIN32
    add_file(path);
#else
    struct stat sb;
    if (stat(path, &sb) != 0) {
        fprintf(stderr, "replay: cannot read %s\n", path);
        return;
    }
    if (!S_ISDIR(sb.st_mode)) {
        add_file(path);
        return;
    }
    DIR *d = opendir(path);
    if (d == NULL) {
        return;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') {
            continue;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            char **nn = realloc(names, cap * sizeof(char *));
            if (nn == NULL) {
                break;
            }
            names = nn;
        }
        size_t len = strlen(path) + strlen(e->d_name) + 2;
        names[n] = malloc(len);
        snprintf(names[n], len, "%s/%s", path, e->d_name);
        n++;
    }
    closedir(d);
    qsort(names, n, sizeof(char *), cmp_name); /* the same order everywhere */
    for (size_t i = 0; i < n; ++i) {
        add_file(names[i]);
        free(names[i]);
    }
    free(names);
#endif
}

/* ---- mutations (deterministic) ----------------------------------------------------------- */
static uint64_t g_rng;

static uint32_t rnd(uint32_t n) {
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return n ? (uint32_t)((g_rng * 0x2545f4914f6cdd1dull) >> 32) % n : 0;
}

static size_t mutate(uint8_t *b, size_t n, size_t cap) {
    static const uint32_t interesting[] = {0, 1, 2, 3, 4, 8, 16, 32, 64, 127, 128, 255, 256, 257, 1024,
                                           0x7fff, 0x8000, 0xffff, 0x7fffffffu, 0x80000000u, 0xffffffffu,
                                           0xfffffffeu, 0xaf143cd8u};
    uint32_t k = 1 + rnd(6);
    for (uint32_t j = 0; j < k; ++j) {
        switch (rnd(8)) {
        case 0: /* flip a bit */
            if (n) {
                b[rnd((uint32_t)n)] ^= (uint8_t)(1u << rnd(8));
            }
            break;
        case 1: /* a random byte */
            if (n) {
                b[rnd((uint32_t)n)] = (uint8_t)rnd(256);
            }
            break;
        case 2: /* an interesting 32-bit little-endian value (aligned or not) */
            if (n >= 4) {
                uint32_t v = interesting[rnd(sizeof interesting / sizeof interesting[0])];
                size_t at = rnd((uint32_t)(n - 3));
                for (int q = 0; q < 4; ++q) {
                    b[at + q] = (uint8_t)(v >> (8 * q));
                }
            }
            break;
        case 3: /* truncate */
            if (n) {
                n = rnd((uint32_t)n + 1);
            }
            break;
        case 4: /* erase a range */
            if (n > 1) {
                size_t at = rnd((uint32_t)n), len = 1 + rnd((uint32_t)(n - at < 16 ? n - at : 16));
                memmove(b + at, b + at + len, n - at - len);
                n -= len;
            }
            break;
        case 5: /* insert bytes */
            if (n + 8 < cap) {
                size_t at = rnd((uint32_t)n + 1), len = 1 + rnd(8);
                memmove(b + at + len, b + at, n - at);
                for (size_t q = 0; q < len; ++q) {
                    b[at + q] = (uint8_t)rnd(256);
                }
                n += len;
            }
            break;
        case 6: /* splice in part of another input */
            if (g_n_in > 0) {
                const input *o = &g_in[rnd((uint32_t)g_n_in)];
                if (o->n > 0 && n > 0) {
                    size_t from = rnd((uint32_t)o->n), at = rnd((uint32_t)n);
                    size_t len = o->n - from;
                    if (len > n - at) {
                        len = n - at;
                    }
                    memcpy(b + at, o->b + from, len);
                }
            }
            break;
        default: /* add or subtract a small amount at a byte */
            if (n) {
                b[rnd((uint32_t)n)] += (uint8_t)(rnd(17) - 8);
            }
            break;
        }
    }
    return n;
}

static double now(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static unsigned long env_ul(const char *name, unsigned long dflt) {
    const char *v = getenv(name);
    return v != NULL && *v != '\0' ? strtoul(v, NULL, 10) : dflt;
}

int main(int argc, char **argv) {
    unsigned long n_mut = env_ul("PYMEM_FUZZ_MUTATIONS", 0);
    double seconds = (double)env_ul("PYMEM_FUZZ_SECONDS", 60);
    uint64_t seed = env_ul("PYMEM_FUZZ_SEED", 1);
    int n_paths = 0;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "-n") == 0 && i + 1 < argc) {
            n_mut = strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "-t") == 0 && i + 1 < argc) {
            seconds = strtod(argv[++i], NULL);
        } else if (strcmp(argv[i], "-s") == 0 && i + 1 < argc) {
            seed = strtoull(argv[++i], NULL, 10);
        } else {
            add_path(argv[i]);
            n_paths++;
        }
    }
    if (n_paths == 0) {
        fprintf(stderr, "usage: %s [-n MUTATIONS] [-t SECONDS] [-s SEED] DIR_OR_FILE...\n", argv[0]);
        return 2;
    }
    if (__sanitizer_set_death_callback) {
        __sanitizer_set_death_callback(pm_fuzz_dump_input);
    }
    signal(SIGSEGV, on_signal);
    signal(SIGABRT, on_signal);
    signal(SIGFPE, on_signal);
    signal(SIGILL, on_signal);
    double t0 = now();
    for (size_t i = 0; i < g_n_in; ++i) {
        run(g_in[i].b, g_in[i].n);
    }
    unsigned long corpus_execs = g_exec;
    g_rng = 0x9e3779b97f4a7c15ull ^ (seed * 0xbf58476d1ce4e5b9ull);
    if (g_rng == 0) {
        g_rng = 1;
    }
    uint8_t *buf = malloc(MAX_INPUT + 64);
    unsigned long done = 0;
    int timed_out = 0;
    for (; buf != NULL && g_n_in > 0 && done < n_mut; ++done) {
        if ((done & 63) == 0 && now() - t0 > seconds) {
            timed_out = 1;
            break;
        }
        const input *src = &g_in[rnd((uint32_t)g_n_in)];
        size_t n = src->n < MAX_INPUT ? src->n : MAX_INPUT;
        memcpy(buf, src->b, n);
        n = mutate(buf, n, MAX_INPUT);
        run(buf, n);
    }
    free(buf);
    printf("%s: %lu corpus inputs, %lu mutations%s, %lu executions in %.1f s\n", PM_FUZZ_TARGET, corpus_execs, done,
           timed_out ? " (time bound reached)" : "", g_exec, now() - t0);
    for (size_t i = 0; i < g_n_in; ++i) {
        free(g_in[i].b);
    }
    return 0;
}
