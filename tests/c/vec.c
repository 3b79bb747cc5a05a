/* vec.c - reader of the shared test-vector files (see vec.h and tests/vectors/README.md). */
#include "vec.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int vec_fail(char *err, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
    return -1;
}

#define BAIL(...)                                                                              \
    do {                                                                                       \
        vec_fail(err, errcap, __VA_ARGS__);                                                        \
        vec_free(out);                                                                         \
        return -1;                                                                             \
    } while (0)

static int is_blank(char c) { return c == ' ' || c == '\t' || c == '\r'; }

static char *trim(char *s) {
    while (is_blank(*s)) {
        s++;
    }
    size_t n = strlen(s);
    while (n > 0 && is_blank(s[n - 1])) {
        s[--n] = '\0';
    }
    return s;
}

static int in_list(const char *const *list, const char *key) {
    for (; list != NULL && *list != NULL; ++list) {
        if (strcmp(*list, key) == 0) {
            return 1;
        }
    }
    return 0;
}

static int all_of(const char *s, size_t n, const char *extra) {
    for (size_t i = 0; i < n; ++i) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
              (extra != NULL && ((c >= 'A' && c <= 'Z') || strchr(extra, c) != NULL)))) {
            return 0;
        }
    }
    return n > 0;
}

static int grow(void **arr, size_t *cap, size_t n, size_t el) {
    if (n < *cap) {
        return 0;
    }
    size_t nc = *cap ? *cap * 2 : 16;
    void *p = realloc(*arr, nc * el);
    if (p == NULL) {
        return -1;
    }
    *arr = p;
    *cap = nc;
    return 0;
}

int vec_load(const char *path, const char *const *params, const char *const *events, vec_file *out,
             char *err, size_t errcap) {
    memset(out, 0, sizeof(*out));
    FILE *fp = fopen(path, "rb");
    if (fp == NULL) {
        return vec_fail(err, errcap, "%s: %s", path, strerror(errno));
    }
    size_t len = 0, cap = 0;
    char *text = NULL;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 65536;
            char *t = realloc(text, cap);
            if (t == NULL) {
                free(text);
                fclose(fp);
                return vec_fail(err, errcap, "%s: out of memory", path);
            }
            text = t;
        }
        size_t got = fread(text + len, 1, cap - len - 1, fp);
        len += got;
        if (got == 0) {
            break;
        }
    }
    fclose(fp);
    text[len] = '\0';
    out->text = text;
    size_t case_cap = 0, item_cap = 0;
    vec_case *cur = NULL;
    int seen_event = 0;
    char *line = text;
    for (int lineno = 1; line != NULL; ++lineno) {
        char *nl = strchr(line, '\n');
        if (nl != NULL) {
            *nl = '\0';
        }
        char *s = trim(line);
        line = nl ? nl + 1 : NULL;
        if (*s == '\0' || *s == '#') {
            continue;
        }
        size_t n = strlen(s);
        if (strncmp(s, "[case ", 6) == 0 && s[n - 1] == ']') {
            const char *name = s + 6;
            s[n - 1] = '\0';
            if (!all_of(name, strlen(name), ".-")) {
                BAIL("%s:%d: bad case name", path, lineno);
            }
            for (size_t i = 0; i < out->n_cases; ++i) {
                if (strcmp(out->cases[i].name, name) == 0) {
                    BAIL("%s:%d: duplicate case %s", path, lineno, name);
                }
            }
            if (grow((void **)&out->cases, &case_cap, out->n_cases, sizeof(vec_case)) != 0) {
                BAIL("%s: out of memory", path);
            }
            cur = &out->cases[out->n_cases++];
            memset(cur, 0, sizeof(*cur));
            cur->name = name;
            cur->line = lineno;
            item_cap = 0;
            seen_event = 0;
            continue;
        }
        char *eq = strchr(s, '=');
        if (eq == NULL) {
            BAIL("%s:%d: expected [case NAME] or key = value", path, lineno);
        }
        *eq = '\0';
        char *key = trim(s), *val = trim(eq + 1);
        if (!all_of(key, strlen(key), NULL) || *val == '\0') {
            BAIL("%s:%d: expected [case NAME] or key = value", path, lineno);
        }
        if (cur == NULL) {
            BAIL("%s:%d: %s outside a case", path, lineno, key);
        }
        int ev = in_list(events, key);
        if (!ev && !in_list(params, key)) {
            BAIL("%s:%d: unknown key %s", path, lineno, key);
        }
        if (!ev && (seen_event || vec_param(cur, key) != NULL)) {
            BAIL("%s:%d: %s parameter %s", path, lineno,
                        seen_event ? "late" : "repeated", key);
        }
        seen_event |= ev;
        if (grow((void **)&cur->items, &item_cap, cur->n_items, sizeof(vec_item)) != 0) {
            BAIL("%s: out of memory", path);
        }
        vec_item *it = &cur->items[cur->n_items++];
        it->key = key;
        it->val = val;
        it->line = lineno;
        it->is_event = ev;
    }
    return 0;
}

void vec_free(vec_file *f) {
    for (size_t i = 0; i < f->n_cases; ++i) {
        free(f->cases[i].items);
    }
    free(f->cases);
    free(f->text);
    memset(f, 0, sizeof(*f));
}

const char *vec_param(const vec_case *c, const char *key) {
    for (size_t i = 0; i < c->n_items; ++i) {
        if (!c->items[i].is_event && strcmp(c->items[i].key, key) == 0) {
            return c->items[i].val;
        }
    }
    return NULL;
}

int vec_ints(const char *s, char sep, int64_t *out, int cap) {
    int n = 0;
    while (*s != '\0') {
        while (is_blank(*s) || (*s == sep && n > 0)) {
            s++;
        }
        if (*s == '\0') {
            break;
        }
        char *end;
        errno = 0;
        long long v = strtoll(s, &end, 10);
        if (end == s || errno != 0 || n >= cap || (*end != '\0' && *end != sep && !is_blank(*end))) {
            return -1;
        }
        out[n++] = v;
        s = end;
    }
    return n;
}

int vec_floats(const char *s, float *out, int cap) {
    int n = 0;
    while (*s != '\0') {
        while (is_blank(*s)) {
            s++;
        }
        if (*s == '\0') {
            break;
        }
        char *end;
        double v = strtod(s, &end); /* exact: each value is a float32 written with enough digits */
        if (end == s || n >= cap || (*end != '\0' && !is_blank(*end))) {
            return -1;
        }
        out[n++] = (float)v;
        s = end;
    }
    return n;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

int vec_hex(const char *s, uint8_t **out, size_t *n) {
    *out = NULL;
    *n = 0;
    if (strncmp(s, "hex:", 4) != 0) {
        return -1;
    }
    s += 4;
    size_t len = 0;
    while (s[len] != '\0' && !is_blank(s[len])) {
        len++;
    }
    if (len % 2 != 0) {
        return -1;
    }
    uint8_t *b = malloc(len / 2 + 1);
    if (b == NULL) {
        return -1;
    }
    for (size_t i = 0; i < len / 2; ++i) {
        int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            free(b);
            return -1;
        }
        b[i] = (uint8_t)(hi << 4 | lo);
    }
    *out = b;
    *n = len / 2;
    return 0;
}

int vec_split(char *s, char **tok, int cap) {
    int n = 0;
    while (*s != '\0' && n < cap) {
        while (is_blank(*s)) {
            *s++ = '\0';
        }
        if (*s == '\0') {
            break;
        }
        tok[n++] = s;
        while (*s != '\0' && !is_blank(*s)) {
            s++;
        }
    }
    return n;
}
