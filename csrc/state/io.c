/* state/io.c - bounded little-endian writer (with a count-only mode) and reader. */
#include "pm_internal.h"

#include <stdlib.h>

void pmi_w_bytes(pmi_writer *w, const void *src, uint64_t n) {
    uint8_t *p = pmi_w_reserve(w, n);
    if (p != NULL && n > 0) {
        memcpy(p, src, (size_t)n);
    }
}

uint8_t *pmi_w_reserve(pmi_writer *w, uint64_t n) {
    uint64_t at = w->n;
    w->n += n;
    if (w->buf == NULL || w->overflow) {
        return NULL;
    }
    if (w->n > w->cap || w->n < at) {
        w->overflow = true;
        return NULL;
    }
    return w->buf + at;
}

void pmi_w_u32(pmi_writer *w, uint32_t v) {
    uint8_t *p = pmi_w_reserve(w, 4);
    if (p != NULL) {
        pmi_wr_u32(p, v);
    }
}

void pmi_w_i32(pmi_writer *w, int32_t v) { pmi_w_u32(w, (uint32_t)v); }

void pmi_w_u64(pmi_writer *w, uint64_t v) {
    uint8_t *p = pmi_w_reserve(w, 8);
    if (p != NULL) {
        pmi_wr_u32(p, (uint32_t)v);
        pmi_wr_u32(p + 4, (uint32_t)(v >> 32));
    }
}

static bool r_short(pmi_reader *r, uint64_t n, const char *what) {
    pmi_fail(PM_E_FORMAT, "truncated state: %s needs %llu bytes at offset %llu, %llu left", what,
             (unsigned long long)n, (unsigned long long)r->off,
             (unsigned long long)(r->len - r->off));
    return false;
}

bool pmi_r_span(pmi_reader *r, uint64_t n, const uint8_t **p, const char *what) {
    if (n > r->len - r->off) {
        return r_short(r, n, what);
    }
    *p = r->buf + r->off;
    r->off += n;
    return true;
}

bool pmi_r_u32(pmi_reader *r, uint32_t *v, const char *what) {
    const uint8_t *p;
    if (!pmi_r_span(r, 4, &p, what)) {
        return false;
    }
    *v = pmi_rd_u32(p);
    return true;
}

bool pmi_r_i32(pmi_reader *r, int32_t *v, const char *what) {
    uint32_t u;
    if (!pmi_r_u32(r, &u, what)) {
        return false;
    }
    *v = (int32_t)u;
    return true;
}

bool pmi_r_u64(pmi_reader *r, uint64_t *v, const char *what) {
    const uint8_t *p;
    if (!pmi_r_span(r, 8, &p, what)) {
        return false;
    }
    *v = (uint64_t)pmi_rd_u32(p) | ((uint64_t)pmi_rd_u32(p + 4) << 32);
    return true;
}

pm_status pmi_r_copy(pmi_reader *r, pmi_copy *c, uint64_t n, const uint8_t **out, const char *what) {
    if (n > r->len - r->off) {
        r_short(r, n, what);
        return PM_E_FORMAT;
    }
    if (n == 0) {
        *out = c->buf;
        return PM_OK;
    }
    if (n > c->cap - c->n) {
        uint64_t cap = c->cap ? c->cap : 64;
        while (cap - c->n < n) {
            cap *= 2;
        }
        uint8_t *b = realloc(c->buf, (size_t)cap);
        if (b == NULL) {
            return pmi_fail(PM_E_NOMEM, "out of memory");
        }
        c->buf = b;
        c->cap = cap;
    }
    uint8_t *dst = c->buf + c->n;
    memcpy(dst, r->buf + r->off, (size_t)n);
    c->n += n;
    r->off += n;
    *out = dst;
    return PM_OK;
}

void pmi_copy_free(pmi_copy *c) {
    free(c->buf);
    c->buf = NULL;
    c->n = c->cap = 0;
}

pm_status pmi_copy_window(const pmi_reader *r, uint64_t m0, pmi_copy *c, uint64_t end) {
    if (end <= c->n) {
        return PM_OK;
    }
    uint64_t want = PMI_MAX(end, 2 * c->n);
    want = PMI_MIN(want, r->len - m0);
    if (want > c->cap) {
        uint8_t *b = realloc(c->buf, (size_t)want);
        if (b == NULL) {
            return pmi_fail(PM_E_NOMEM, "out of memory");
        }
        c->buf = b;
        c->cap = want;
    }
    memcpy(c->buf + c->n, r->buf + m0 + c->n, (size_t)(want - c->n));
    c->n = want;
    return PM_OK;
}
