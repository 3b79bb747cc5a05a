/* test_vectors.c - replay every case of the shared test vectors (the .txt files of tests/vectors,
 * recorded from real llama.cpp b11739; format in tests/vectors/README.md) through the
 * public C API and check each expectation byte for byte.  tests/test_vectors.py replays the
 * same files through the Python API.  Memories of every kind (kv, iswa, recurrent, hybrid,
 * hybrid_iswa) are built, fed and snapshotted by vec_mem.c.
 *
 * The directory comes from $PYMEM_VECTORS_DIR, else from the PYMEM_VECTORS_DIR compile
 * definition (${PROJECT_SOURCE_DIR}/tests/vectors). */
#include "check.h"
#include "vec.h"
#include "vec_mem.h"

#include <pymem.h>
#include <stdbool.h>
#include <stdlib.h>

#ifdef _WIN32
#include <io.h>
#else
#include <dirent.h>
#endif

#ifndef PYMEM_VECTORS_DIR
#define PYMEM_VECTORS_DIR "tests/vectors"
#endif

#define MAX_TOKENS 4096
#define MAX_FILES 256

static const char *const EVENTS[] = {"step", "expect_error", "expect_whole", "expect_seq",
                                     "expect_pos", NULL};

static const struct {
    const char *name;
    pm_status st;
} STATUS[] = {{"OK", PM_OK},
              {"INVALID_ARG", PM_E_INVALID_ARG},
              {"UNSUPPORTED", PM_E_UNSUPPORTED},
              {"NO_SLOT", PM_E_NO_SLOT},
              {"FORMAT", PM_E_FORMAT},
              {"IO", PM_E_IO},
              {"NOMEM", PM_E_NOMEM},
              {"STATE", PM_E_STATE},
              {"BUFFER_SMALL", PM_E_BUFFER_SMALL},
              {"BATCH", PM_E_BATCH},
              {"SHIFT", PM_E_SHIFT}};

static long n_cases, n_steps, n_expect, n_bytes;

/* ---- case state ------------------------------------------------------------------------ */
typedef struct replay {
    const char *file;
    const vec_case *c;
    int line;              /* vector line being replayed */
    vm_mem m;
    pm_memory *mem;
    uint32_t n_vocab, n_ubatch, n_seq_max;
    bool broken;           /* a failed CHECK: stop this case */
} replay;

/* CHECK_MSG with the vector file:line; cond is evaluated once; a failure ends the case */
#define RCHECK(r, cond, ...)                                                                 \
    do {                                                                                     \
        bool rcheck_ok_ = (cond);                                                            \
        CHECK_MSG(rcheck_ok_, __VA_ARGS__);                                                  \
        if (!rcheck_ok_) {                                                                   \
            fprintf(stderr, "    at %s:%d (case %s): %s\n", (r)->file, (r)->line, (r)->c->name, \
                    pm_last_error());                                                        \
            (r)->broken = true;                                                              \
        }                                                                                    \
    } while (0)

static const char *status_name(pm_status st) {
    for (size_t i = 0; i < sizeof STATUS / sizeof STATUS[0]; ++i) {
        if (STATUS[i].st == st) {
            return STATUS[i].name;
        }
    }
    return "?";
}

static int status_of(const char *name, pm_status *out) {
    for (size_t i = 0; i < sizeof STATUS / sizeof STATUS[0]; ++i) {
        if (strcmp(STATUS[i].name, name) == 0) {
            *out = STATUS[i].st;
            return 0;
        }
    }
    return -1;
}

static uint8_t *snapshot(const replay *r, size_t *n) {
    return vm_snapshot(&r->m, n);
}

/* ---- building the memory (vec_mem.c) ---------------------------------------------------- */
static bool build(replay *r) {
    char err[512];
    int rc = vm_build(r->c, &r->m, err, sizeof err);
    RCHECK(r, rc == 0, "%s", err);
    if (r->broken) {
        return false;
    }
    r->mem = r->m.mem;
    r->n_vocab = r->m.n_vocab;
    r->n_ubatch = r->m.n_ubatch;
    r->n_seq_max = r->m.n_seq_max;
    return true;
}

/* ---- steps ------------------------------------------------------------------------------- */
typedef struct step_ctx {
    uint8_t *before;      /* snapshot the failing step is compared with */
    size_t n_before;
    int64_t result;       /* value for "-> N" */
} step_ctx;

static void retake(replay *r, step_ctx *sc) {
    free(sc->before);
    sc->before = snapshot(r, &sc->n_before);
}

/* comma-separated list of '+'-joined ints: counts per entry into cnt, values into flat */
static int parse_seqs(const char *s, int32_t *cnt, int32_t *flat, int cap_tok, int cap_flat, int *n_flat) {
    char buf[64];
    int n = 0;
    *n_flat = 0;
    while (*s != '\0') {
        const char *e = strchr(s, ',');
        size_t len = e ? (size_t)(e - s) : strlen(s);
        if (len == 0 || len >= sizeof buf || n >= cap_tok) {
            return -1;
        }
        memcpy(buf, s, len);
        buf[len] = '\0';
        int64_t ids[PM_MAX_SEQ];
        int k = vec_ints(buf, '+', ids, PM_MAX_SEQ);
        if (k <= 0 || *n_flat + k > cap_flat) {
            return -1;
        }
        for (int j = 0; j < k; ++j) {
            flat[(*n_flat)++] = (int32_t)ids[j];
        }
        cnt[n++] = k;
        s = e ? e + 1 : s + len;
    }
    return n;
}

static pm_status do_decode(replay *r, char **args, int n_args, step_ctx *sc) {
    static int64_t tmp[MAX_TOKENS];
    static pm_token tokens[MAX_TOKENS];
    static pm_pos pos[MAX_TOKENS];
    static int32_t nsid[MAX_TOKENS], sid[MAX_TOKENS * 4];
    static int8_t out[MAX_TOKENS];
    int n = -1, n_pos = -1, n_seq = -1, n_out = -1, n_flat = 0;
    uint8_t *rows = NULL, *rs = NULL;
    size_t n_rows = 0, n_rs = 0;
    bool have_rows = false, have_rs = false;
    for (int a = 0; a < n_args; ++a) {
        char *eq = strchr(args[a], '=');
        RCHECK(r, eq != NULL, "decode argument %s", args[a]);
        if (r->broken) {
            free(rows);
            free(rs);
            return PM_E_INVALID_ARG;
        }
        *eq = '\0';
        const char *k = args[a], *v = eq + 1;
        if (strcmp(k, "tokens") == 0) {
            n = vec_ints(v, ',', tmp, MAX_TOKENS);
            for (int i = 0; i < n; ++i) {
                tokens[i] = (pm_token)tmp[i];
            }
        } else if (strcmp(k, "pos") == 0) {
            n_pos = vec_ints(v, ',', tmp, MAX_TOKENS);
            for (int i = 0; i < n_pos; ++i) {
                pos[i] = (pm_pos)tmp[i];
            }
        } else if (strcmp(k, "seqs") == 0) {
            n_seq = parse_seqs(v, nsid, sid, MAX_TOKENS, MAX_TOKENS * 4, &n_flat);
        } else if (strcmp(k, "output") == 0) {
            n_out = vec_ints(v, ',', tmp, MAX_TOKENS);
            for (int i = 0; i < n_out; ++i) {
                out[i] = (int8_t)tmp[i];
            }
        } else if (strcmp(k, "rows") == 0) {
            have_rows = vec_hex(v, &rows, &n_rows) == 0;
            RCHECK(r, have_rows, "rows");
        } else if (strcmp(k, "rs") == 0 && !have_rs) {
            have_rs = vec_hex(v, &rs, &n_rs) == 0;
            RCHECK(r, have_rs, "rs");
        } else {
            RCHECK(r, 0, "unknown decode argument %s", k);
        }
    }
    RCHECK(r, n > 0 && (n_pos < 0 || n_pos == n) && (n_seq < 0 || n_seq == n) && (n_out < 0 || n_out == n),
           "decode lists: %d tokens, %d pos, %d seqs, %d outputs", n, n_pos, n_seq, n_out);
    RCHECK(r, !have_rows || n_rows == r->m.stride * (uint64_t)n, "rows: %zu bytes for %d tokens of %llu", n_rows,
           n, (unsigned long long)r->m.stride);
    if (r->broken) {
        free(rows);
        free(rs);
        return PM_E_INVALID_ARG;
    }
    pm_batch *b = NULL;
    pm_status st = pm_batch_new((uint32_t)n, tokens, n_pos < 0 ? NULL : pos, 1, n_seq < 0 ? NULL : nsid,
                                n_seq < 0 ? NULL : sid, n_out < 0 ? NULL : out, &b);
    if (st == PM_OK) {
        st = pm_mem_check_batch(r->mem, b, r->n_vocab, false);
    }
    if (st == PM_OK) {
        st = pm_mem_update(r->mem, NULL);
        retake(r, sc); /* a NO_SLOT decode keeps the update, as llama.cpp's */
    }
    pm_mctx *ctx = NULL;
    if (st == PM_OK) {
        st = pm_mem_init_batch(r->mem, b, r->n_ubatch, r->n_vocab, false, &ctx);
    }
    uint32_t n_ub = st == PM_OK ? pm_mctx_n_ubatch(ctx) : 0;
    uint32_t *idx = malloc(sizeof(uint32_t) * (size_t)n);
    char err[512];
    for (uint32_t u = 0; u < n_ub && st == PM_OK && !r->broken; ++u) {
        pm_ubatch_info ui;
        pm_mctx_ubatch_info(ctx, u, &ui);
        st = pm_mctx_ubatch_tokens(ctx, u, idx, NULL, NULL, NULL);
        if (st == PM_OK) {
            st = pm_mctx_apply(ctx, u);
        }
        if (st == PM_OK && have_rows) {
            st = vm_store_kv(&r->m, ctx, u, idx, ui.n_tokens, rows, err, sizeof err);
            RCHECK(r, st == PM_OK, "%s", err);
        }
    }
    if (st == PM_OK && have_rs && !r->broken) {
        /* the batch's sequences, ascending, each once */
        pm_seq_id ids[PM_MAX_SEQ];
        uint32_t n_ids = 0;
        for (pm_seq_id q = 0; q < PM_MAX_SEQ; ++q) {
            bool in = n_seq < 0 && q == 0;
            for (int i = 0; i < n_flat && !in; ++i) {
                in = sid[i] == q;
            }
            if (in) {
                ids[n_ids++] = q;
            }
        }
        pm_status st2 = vm_store_rs(&r->m, ids, n_ids, rs, n_rs, false, err, sizeof err);
        RCHECK(r, st2 == PM_OK, "%s", err);
    }
    free(idx);
    free(rows);
    free(rs);
    pm_mctx_free(ctx);
    pm_batch_free(b);
    return st;
}

static pm_status do_read(replay *r, char **args, int n_args, step_ctx *sc) {
    RCHECK(r, n_args >= 3, "read needs TARGET ENV hex:");
    if (r->broken) {
        return PM_E_INVALID_ARG;
    }
    pm_seq_id seq = -1;
    if (strcmp(args[0], "whole") != 0) {
        seq = atoi(args[0]);
    }
    uint32_t env = strcmp(args[1], "llama") == 0 ? PM_ENVELOPE_LLAMA : PM_ENVELOPE_NONE;
    uint32_t flags = (n_args > 3 && strcmp(args[2], "partial") == 0) ? PM_STATE_PARTIAL_ONLY : 0;
    uint8_t *blob;
    size_t n;
    RCHECK(r, vec_hex(args[n_args - 1], &blob, &n) == 0, "read blob");
    if (r->broken) {
        return PM_E_INVALID_ARG;
    }
    uint64_t c1 = 0, c2 = 0;
    pm_status s1 = pm_mem_state_check(r->mem, seq, flags, env, blob, n, &c1);
    pm_status s2 = pm_mem_state_read(r->mem, seq, flags, env, blob, n, true, &c2);
    RCHECK(r, s1 == s2 || (s1 == PM_OK && s2 == PM_E_NO_SLOT), "state_check %s, state_read %s",
           status_name(s1), status_name(s2));
    if (s2 == PM_OK) {
        RCHECK(r, c1 == c2, "state_check consumed %llu, state_read %llu", (unsigned long long)c1,
               (unsigned long long)c2);
        sc->result = (int64_t)c2;
    }
    free(blob);
    return s2;
}

static void step(replay *r, char *val, pm_status want) {
    char *tok[16];
    int nt = vec_split(val, tok, 16);
    int64_t arrow = 0;
    bool has_arrow = nt >= 3 && strcmp(tok[nt - 2], "->") == 0;
    if (has_arrow) {
        RCHECK(r, vec_ints(tok[nt - 1], ' ', &arrow, 1) == 1, "-> value");
        nt -= 2;
    }
    RCHECK(r, nt >= 1, "empty step");
    if (r->broken) {
        return;
    }
    const char *op = tok[0];
    char **args = tok + 1;
    int na = nt - 1;
    int64_t a[4] = {0, 0, 0, 0};
    const char *rs_arg = NULL; /* seq_rm S P0 P1 rs=hex:... (rollback rows) */
    if (strcmp(op, "seq_rm") == 0 && na == 4 && strncmp(args[3], "rs=", 3) == 0) {
        rs_arg = args[3] + 3;
        na = 3;
    }
    step_ctx sc = {NULL, 0, 0};
    retake(r, &sc);
    pm_status st = PM_E_INVALID_ARG;
    if (strcmp(op, "decode") == 0) {
        st = do_decode(r, args, na, &sc);
    } else if (strcmp(op, "read") == 0) {
        st = do_read(r, args, na, &sc);
    } else {
        for (int k = 0; k < na && k < 4; ++k) {
            RCHECK(r, vec_ints(args[k], ' ', &a[k], 1) == 1, "argument %s", args[k]);
        }
        if (r->broken) {
            free(sc.before);
            return;
        }
        bool res = false;
        if (strcmp(op, "seq_rm") == 0 && na == 3) {
            st = pm_mem_seq_rm(r->mem, (pm_seq_id)a[0], (pm_pos)a[1], (pm_pos)a[2], &res);
            sc.result = res;
            if (st == PM_OK && rs_arg != NULL) {
                uint8_t *rs;
                size_t n_rs;
                char err[512] = "rs: not hex";
                pm_seq_id q = (pm_seq_id)a[0];
                bool ok = vec_hex(rs_arg, &rs, &n_rs) == 0;
                if (ok) {
                    ok = vm_store_rs(&r->m, &q, 1, rs, n_rs, true, err, sizeof err) == PM_OK;
                    free(rs);
                }
                RCHECK(r, ok, "%s", err);
            }
        } else if (strcmp(op, "seq_cp") == 0 && na == 4) {
            st = pm_mem_seq_cp(r->mem, (pm_seq_id)a[0], (pm_seq_id)a[1], (pm_pos)a[2], (pm_pos)a[3]);
        } else if (strcmp(op, "seq_keep") == 0 && na == 1) {
            st = pm_mem_seq_keep(r->mem, (pm_seq_id)a[0]);
        } else if (strcmp(op, "seq_add") == 0 && na == 4) {
            st = pm_mem_seq_add(r->mem, (pm_seq_id)a[0], (pm_pos)a[1], (pm_pos)a[2], (pm_pos)a[3]);
        } else if (strcmp(op, "seq_div") == 0 && na == 4) {
            st = pm_mem_seq_div(r->mem, (pm_seq_id)a[0], (pm_pos)a[1], (pm_pos)a[2], (int32_t)a[3]);
        } else if (strcmp(op, "update") == 0 && na == 0) {
            st = pm_mem_update(r->mem, &res);
            sc.result = res;
        } else if (strcmp(op, "clear") == 0 && na == 1) {
            st = pm_mem_clear(r->mem, a[0] != 0);
        } else {
            RCHECK(r, 0, "unknown step %s with %d arguments", op, na);
        }
    }
    n_steps++;
    if (!r->broken) {
        RCHECK(r, st == want, "%s: status %s, expected %s", op, status_name(st), status_name(want));
    }
    if (!r->broken && st != PM_OK) {
        size_t n_after = 0;
        uint8_t *after = snapshot(r, &n_after);
        RCHECK(r, after != NULL && n_after == sc.n_before && memcmp(after, sc.before, n_after) == 0,
               "the failing %s changed the memory", op);
        free(after);
    } else if (!r->broken && has_arrow) {
        RCHECK(r, sc.result == arrow, "%s returned %lld, expected %lld", op, (long long)sc.result,
               (long long)arrow);
    }
    free(sc.before);
}

/* ---- expectations -------------------------------------------------------------------------- */
static void expect_blob(replay *r, pm_seq_id seq, const char *hex) {
    uint8_t *want;
    size_t n;
    RCHECK(r, vec_hex(hex, &want, &n) == 0, "expected blob");
    if (r->broken) {
        return;
    }
    uint64_t size = 0, w = 0;
    pm_status st = pm_mem_state_size(r->mem, seq, 0, PM_ENVELOPE_LLAMA, &size);
    RCHECK(r, st == PM_OK && size == n, "state_size(%d) = %llu, expected %zu", seq, (unsigned long long)size, n);
    uint8_t *got = malloc(size + 1);
    if (!r->broken && got != NULL) {
        st = pm_mem_state_write(r->mem, seq, 0, PM_ENVELOPE_LLAMA, got, size, &w);
        RCHECK(r, st == PM_OK && w == n, "state_write(%d)", seq);
        if (!r->broken) {
            size_t at = 0;
            while (at < n && got[at] == want[at]) {
                at++;
            }
            RCHECK(r, at == n, "state of seq %d differs at byte %zu of %zu", seq, at, n);
            n_bytes += (long)n;
        }
    }
    free(got);
    free(want);
}

static void expect(replay *r, const vec_item *it) {
    n_expect++;
    char buf[64];
    if (strcmp(it->key, "expect_pos") == 0) {
        int64_t v[3];
        RCHECK(r, vec_ints(it->val, ' ', v, 3) == 3, "expect_pos");
        if (r->broken) {
            return;
        }
        pm_pos lo = -2, hi = -2;
        pm_mem_seq_pos_min(r->mem, (pm_seq_id)v[0], &lo);
        pm_mem_seq_pos_max(r->mem, (pm_seq_id)v[0], &hi);
        RCHECK(r, lo == v[1] && hi == v[2], "seq %lld positions %d..%d, expected %lld..%lld", (long long)v[0], lo,
               hi, (long long)v[1], (long long)v[2]);
    } else if (strcmp(it->key, "expect_whole") == 0) {
        expect_blob(r, -1, it->val);
    } else {
        const char *sp = strchr(it->val, ' ');
        RCHECK(r, sp != NULL && (size_t)(sp - it->val) < sizeof buf, "expect_seq");
        if (r->broken) {
            return;
        }
        memcpy(buf, it->val, (size_t)(sp - it->val));
        buf[sp - it->val] = '\0';
        expect_blob(r, (pm_seq_id)atoi(buf), sp + 1);
    }
}

static void replay_case(const char *file, const vec_case *c) {
    replay r;
    memset(&r, 0, sizeof r);
    r.file = file;
    r.c = c;
    r.line = c->line;
    n_cases++;
    if (!build(&r)) {
        vm_free(&r.m);
        return;
    }
    for (size_t i = 0; i < c->n_items && !r.broken; ++i) {
        const vec_item *it = &c->items[i];
        if (!it->is_event) {
            continue;
        }
        r.line = it->line;
        if (strcmp(it->key, "step") == 0) {
            pm_status want = PM_OK;
            if (i + 1 < c->n_items && strcmp(c->items[i + 1].key, "expect_error") == 0) {
                RCHECK(&r, status_of(c->items[i + 1].val, &want) == 0, "status %s", c->items[i + 1].val);
                i++;
            }
            char *val = malloc(strlen(it->val) + 1);
            strcpy(val, it->val);
            step(&r, val, want);
            free(val);
        } else if (strcmp(it->key, "expect_error") == 0) {
            RCHECK(&r, 0, "expect_error must follow a step");
        } else {
            expect(&r, it);
        }
    }
    vm_free(&r.m);
}

/* ---- files ------------------------------------------------------------------------------- */
static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int list_txt(const char *dir, char **names, int cap) {
    int n = 0;
#ifdef _WIN32
    char pat[1024];
    snprintf(pat, sizeof pat, "%s/*.txt", dir);
    struct _finddata_t fd;
    intptr_t h = _findfirst(pat, &fd);
    if (h == -1) {
        return 0;
    }
    do {
        if (n < cap) {
            names[n] = malloc(strlen(fd.name) + 1);
            strcpy(names[n++], fd.name);
        }
    } while (_findnext(h, &fd) == 0);
    _findclose(h);
#else
    DIR *d = opendir(dir);
    if (d == NULL) {
        return -1;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (len > 4 && strcmp(e->d_name + len - 4, ".txt") == 0 && n < cap) {
            names[n] = malloc(len + 1);
            strcpy(names[n++], e->d_name);
        }
    }
    closedir(d);
#endif
    qsort(names, (size_t)n, sizeof(char *), cmp_str);
    return n;
}

static const char *vectors_dir(void) {
    const char *env = getenv("PYMEM_VECTORS_DIR");
    return env != NULL && *env != '\0' ? env : PYMEM_VECTORS_DIR;
}

static void test_all_vectors(void) {
    const char *dir = vectors_dir();
    char *names[MAX_FILES];
    int n = list_txt(dir, names, MAX_FILES);
    CHECK_MSG(n > 0, "no vector files (*.txt) in %s", dir);
    for (int i = 0; i < n; ++i) {
        char path[2048], err[512];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        vec_file f;
        int rc = vec_load(path, VM_PARAMS, EVENTS, &f, err, sizeof err);
        CHECK_MSG(rc == 0, "%s", err);
        if (rc == 0) {
            CHECK_MSG(f.n_cases > 0, "%s has no cases", path);
            for (size_t k = 0; k < f.n_cases; ++k) {
                replay_case(names[i], &f.cases[k]);
            }
            vec_free(&f);
        }
        free(names[i]);
    }
    printf("  %ld cases, %ld steps, %ld expectations, %ld state bytes compared (%s)\n", n_cases, n_steps,
           n_expect, n_bytes, dir);
}

/* The reader itself: unknown keys and malformed lines are rejected with file and line. */
static void test_reader_rejects(void) {
    static const char *const bad[] = {
        "kind = kv\n",                              /* outside a case */
        "[case a]\nbogus = 1\n",                    /* unknown key */
        "[case a]\nkind = kv\nkind = kv\n",         /* repeated parameter */
        "[case a]\nstep = clear 1\nsize = 3\n",     /* parameter after a step */
        "[case a]\nkind =\n",                       /* empty value */
        "[case a]\n[case a]\n",                     /* duplicate case */
        "[case a b]\n",                             /* bad name */
        "[case a]\nKind = kv\n",                    /* bad key */
        "[case a]\njust words\n",                   /* no '=' */
    };
    const char *path = "test_vectors_tmp.txt";
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; ++i) {
        FILE *fp = fopen(path, "wb");
        if (fp == NULL) {
            CHECK_MSG(0, "cannot write %s", path);
            return;
        }
        fputs(bad[i], fp);
        fclose(fp);
        vec_file f;
        char err[256] = "";
        int rc = vec_load(path, VM_PARAMS, EVENTS, &f, err, sizeof err);
        CHECK_MSG(rc != 0 && strstr(err, path) != NULL, "accepted: %s", bad[i]);
        if (rc == 0) {
            vec_free(&f);
        }
    }
    FILE *fp = fopen(path, "wb");
    if (fp != NULL) {
        fputs("# c\n\n[case x-1]\r\nkind = kv\nsize=  256 \nstep = clear 1\nexpect_pos = 0 -1 -1\n", fp);
        fclose(fp);
        vec_file f;
        char err[256] = "";
        CHECK(vec_load(path, VM_PARAMS, EVENTS, &f, err, sizeof err) == 0);
        if (f.n_cases == 1) {
            CHECK_EQ_STR(f.cases[0].name, "x-1");
            CHECK_EQ_STR(vec_param(&f.cases[0], "size"), "256");
            CHECK_EQ_INT(f.cases[0].n_items, 4);
            CHECK(vec_param(&f.cases[0], "step") == NULL);
        }
        vec_free(&f);
    }
    /* keys of a part the kind does not have, and unknown kinds, are refused by vm_build */
    static const char *const wrong[] = {
        "[case r]\nkind = recurrent\narch = mamba\nn_layer = 1\nn_seq_max = 1\nsize = 4\n",
        "[case k]\nkind = kv\nn_layer = 1\nn_seq_max = 1\nrec_layers = 0\n",
        "[case i]\nkind = hybrid\nn_layer = 1\nn_seq_max = 1\nswa_size = 4\n",
        "[case x]\nkind = mystery\nn_layer = 1\n",
    };
    for (size_t i = 0; i < sizeof wrong / sizeof wrong[0]; ++i) {
        fp = fopen(path, "wb");
        if (fp == NULL) {
            break;
        }
        fputs(wrong[i], fp);
        fclose(fp);
        vec_file f;
        char err[256] = "";
        CHECK(vec_load(path, VM_PARAMS, EVENTS, &f, err, sizeof err) == 0);
        vm_mem m;
        CHECK_MSG(vm_build(&f.cases[0], &m, err, sizeof err) != 0 && m.mem == NULL, "built: %s", wrong[i]);
        CHECK_MSG(strstr(err, i < 3 ? "does not belong" : "unsupported kind") != NULL, "%s", err);
        vec_free(&f);
    }
    remove(path);
    int64_t v[4];
    float fv[2];
    uint8_t *b;
    size_t n;
    CHECK_EQ_INT(vec_ints("1 -2  3", ' ', v, 4), 3);
    CHECK_EQ_INT(v[1], -2);
    CHECK_EQ_INT(vec_ints("1,2,3", ',', v, 4), 3);
    CHECK_EQ_INT(vec_ints("1 x", ' ', v, 4), -1);
    CHECK_EQ_INT(vec_ints("1 2 3", ' ', v, 2), -1);
    CHECK_EQ_INT(vec_floats("10000 1.0693147182464600", fv, 2), 2);
    CHECK(fv[0] == 10000.0f && fv[1] == 1.06931472f);
    CHECK_EQ_INT(vec_hex("hex:00ff10", &b, &n), 0);
    CHECK(n == 3 && b[1] == 0xff && b[2] == 0x10);
    free(b);
    CHECK_EQ_INT(vec_hex("hex:", &b, &n), 0);
    CHECK(n == 0);
    free(b);
    CHECK_EQ_INT(vec_hex("hex:0", &b, &n), -1);
    CHECK_EQ_INT(vec_hex("hex:zz", &b, &n), -1);
    CHECK_EQ_INT(vec_hex("00ff", &b, &n), -1);
}

int main(void) {
    (void)check_randf; /* check.h helper this file does not need */
    RUN(test_reader_rejects);
    RUN(test_all_vectors);
    return check_report("test_vectors");
}
