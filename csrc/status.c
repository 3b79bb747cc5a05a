/* status.c - status text, the thread-local error message, version, aligned allocations. */
#include "pm_internal.h"

#include <stdio.h>
#include <stdlib.h>

#if defined(_WIN32)
#include <malloc.h>
#endif

#define PMI_ERR_CAP 1024
#define PMI_ALIGN 64

/* The detail of the last failure on this thread ("" until something fails). */
static _Thread_local char g_err[PMI_ERR_CAP];

/* Static text for a status code; never NULL. */
const char *pm_status_str(pm_status status) {
    switch (status) {
    case PM_OK: return "ok";
    case PM_E_INVALID_ARG: return "invalid argument";
    case PM_E_UNSUPPORTED: return "unsupported";
    case PM_E_NO_SLOT: return "no slot for the batch";
    case PM_E_FORMAT: return "malformed or mismatched state";
    case PM_E_IO: return "i/o error";
    case PM_E_NOMEM: return "out of memory";
    case PM_E_STATE: return "operation not allowed in the current state";
    case PM_E_BUFFER_SMALL: return "buffer too small";
    case PM_E_BATCH: return "batch rejected";
    case PM_E_SHIFT: return "K-shift cannot be applied";
    }
    return "unknown status";
}

/* The message recorded by the last failing call on this thread; "" when none. */
const char *pm_last_error(void) { return g_err; }

/* Library version, "MAJOR.MINOR.PATCH": pyproject.toml's, passed in by CMake. */
#ifndef PM_VERSION_STRING
#error "PM_VERSION_STRING is defined by CMakeLists.txt from pyproject.toml's version"
#endif
const char *pm_version(void) { return PM_VERSION_STRING; }

/* Record a formatted message for pm_last_error() and return st. */
pm_status pmi_fail(pm_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    if (n < 0) {
        g_err[0] = '\0';
    }
    return st;
}

/* Append s to the message buffer at *pos, keeping room for the terminator. */
static void pmi_append(char *buf, size_t *pos, const char *s) {
    size_t n = strlen(s);
    size_t room = PMI_ERR_CAP - 1 - *pos;
    if (n > room) {
        n = room;
    }
    memcpy(buf + *pos, s, n);
    *pos += n;
}

/* Prefix the recorded message with "<context>: " (or set it to the context when there is no
 * message yet) and return st unchanged. */
pm_status pmi_fail_ctx(pm_status st, const char *fmt, ...) {
    char ctx[PMI_ERR_CAP];
    char old[PMI_ERR_CAP];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(ctx, sizeof ctx, fmt, ap);
    va_end(ap);
    if (n < 0) {
        ctx[0] = '\0';
    }
    memcpy(old, g_err, sizeof old);
    old[sizeof old - 1] = '\0';
    /* g_err = ctx [+ ": " + old], truncated to the buffer */
    size_t pos = 0;
    pmi_append(g_err, &pos, ctx);
    if (old[0] != '\0') {
        pmi_append(g_err, &pos, ": ");
        pmi_append(g_err, &pos, old);
    }
    g_err[pos] = '\0';
    return st;
}

/* 64-byte aligned, zero-filled block of n bytes; NULL when n == 0 or on failure.
 * Release with pmi_aligned_free. */
void *pmi_aligned_calloc(size_t n) {
    if (n == 0 || n > SIZE_MAX - (PMI_ALIGN - 1)) {
        return NULL;
    }
    size_t sz = (n + (PMI_ALIGN - 1)) & ~(size_t)(PMI_ALIGN - 1);
#if defined(_WIN32)
    void *p = _aligned_malloc(sz, PMI_ALIGN);
#else
    void *p = aligned_alloc(PMI_ALIGN, sz);
#endif
    if (p != NULL) {
        memset(p, 0, sz);
    }
    return p;
}

/* Release a block from pmi_aligned_calloc (NULL is a no-op). */
void pmi_aligned_free(void *p) {
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}
