/* pm_internal.h - private helpers shared by the core's .c files (never seen by cffi). */
#ifndef PM_INTERNAL_H
#define PM_INTERNAL_H

#include "pymem.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PMI_MIN(a, b) ((a) < (b) ? (a) : (b))
#define PMI_MAX(a, b) ((a) > (b) ? (a) : (b))
#define PMI_NONE UINT32_MAX

#if defined(__GNUC__) || defined(__clang__)
#define PMI_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define PMI_LIKELY(x) __builtin_expect(!!(x), 1)
#define PMI_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define PMI_PRINTF(f, a)
#define PMI_LIKELY(x) (x)
#define PMI_UNLIKELY(x) (x)
#endif

/* ---- status.c ------------------------------------------------------------------------ */
/* Record a message for pm_last_error() and return st. */
pm_status pmi_fail(pm_status st, const char *fmt, ...) PMI_PRINTF(2, 3);
/* Prefix the current message with context ("what: ..."), return st unchanged. */
pm_status pmi_fail_ctx(pm_status st, const char *fmt, ...) PMI_PRINTF(2, 3);

/* 64-byte aligned, zeroed allocations (NULL on failure or n == 0). */
void *pmi_aligned_calloc(size_t n);
void pmi_aligned_free(void *p);

/* ---- types.c ------------------------------------------------------------------------- */
bool pmi_type_known(int32_t type);
bool pmi_type_is_quantized(int32_t type);
/* Row size; the caller guarantees n % block == 0 and a known type. */
uint64_t pmi_row_size(int32_t type, uint64_t n);

float pmi_f16_to_f32(uint16_t h);
uint16_t pmi_f32_to_f16(float f); /* round to nearest even */
float pmi_bf16_to_f32(uint16_t h);
uint16_t pmi_f32_to_bf16(float f); /* llama.cpp's rounding; NaN -> quiet */

/* Dequantize / quantize one row of n elements (n multiple of the block size).
 * pmi_quantize_row uses llama.cpp's x86 CPU backend quantizer (what ggml_cpy / set_rows
 * produce there); pmi_quantize_row_ref uses ggml's reference (*_ref) quantizers. */
void pmi_dequantize_row(int32_t type, const void *src, float *dst, uint64_t n);
void pmi_quantize_row(int32_t type, const float *src, void *dst, uint64_t n);
void pmi_quantize_row_ref(int32_t type, const float *src, void *dst, uint64_t n);

/* ---- rope.c: K-shift math ------------------------------------------------------------- */
/* Fill cs[2*i], cs[2*i+1] (i < n_rot/2) with cos/sin * mscale for position p, exactly as
 * ggml's CPU rope cache (rope_yarn, theta *= theta_scale). */
void pmi_rope_cache(const pm_rope *rope, float p, float *cs);
/* Can a K-shift be applied to this layer?  PM_OK, or PM_E_SHIFT with a message for types
 * that cannot be shifted: BF16 (ggml's CPU rope has no BF16), a quantized type without a
 * Hadamard rotation (rot <= 0: llama.cpp dereferences a null matrix), a quantized type with
 * n_rot != head_dim or rot_off != 0, or odd n_rot. */
pm_status pmi_kshift_check(int32_t type, uint32_t head_dim, uint32_t n_rot, uint32_t rot_off,
                           int32_t rot);
/* Apply the K-shift to the K rows of n_cells cells of one layer and stream (row_bytes per
 * cell, n_head_kv heads of head_dim elements).  shift[c] is the position delta of cell c
 * (0 for empty cells; every cell is rotated, as llama.cpp does, so attn_factor != 1 scales
 * zero-shift cells too).  f32/f16: in place, exactly ggml's CPU rope.  Quantized (after
 * pmi_kshift_check): dequantize, FWHT(rot), rope, FWHT(rot), quantize (pmi_quantize_row).
 * Allocates its work memory first: PM_E_NOMEM leaves k untouched. */
pm_status pmi_kshift(uint8_t *k, uint64_t row_bytes, uint32_t n_cells, const int32_t *shift,
                     int32_t type, uint32_t n_head_kv, uint32_t head_dim, uint32_t rot_off,
                     const pm_rope *rope, int32_t rot);
/* The same in caller-provided work memory of pmi_kshift_work_bytes() bytes (float-aligned):
 * allocates nothing (update() allocates it when the cache is created, so a K-shift cannot
 * fail half way).  pmi_kshift_work_bytes gives UINT64_MAX when the size overflows. */
uint64_t pmi_kshift_work_bytes(int32_t type, uint32_t n_head_kv, uint32_t head_dim, uint32_t n_rot);
pm_status pmi_kshift_into(void *work, uint8_t *k, uint64_t row_bytes, uint32_t n_cells, const int32_t *shift,
                          int32_t type, uint32_t n_head_kv, uint32_t head_dim, uint32_t rot_off,
                          const pm_rope *rope, int32_t rot);

/* ---- state/io.c: bounded writer and reader -------------------------------------------- */
typedef struct pmi_writer {
    uint8_t *buf;     /* NULL: count only */
    uint64_t cap;
    uint64_t n;       /* bytes written (or counted) so far */
    bool overflow;
} pmi_writer;

void pmi_w_bytes(pmi_writer *w, const void *src, uint64_t n);
void pmi_w_u32(pmi_writer *w, uint32_t v);
void pmi_w_i32(pmi_writer *w, int32_t v);
void pmi_w_u64(pmi_writer *w, uint64_t v);
/* Reserve n bytes and return a pointer to fill (NULL when counting or on overflow). */
uint8_t *pmi_w_reserve(pmi_writer *w, uint64_t n);

typedef struct pmi_reader {
    const uint8_t *buf;
    uint64_t len;
    uint64_t off;
} pmi_reader;

/* Each returns false (and records a PM_E_FORMAT message naming `what` and the offset)
 * when fewer bytes remain. */
bool pmi_r_u32(pmi_reader *r, uint32_t *v, const char *what);
bool pmi_r_i32(pmi_reader *r, int32_t *v, const char *what);
bool pmi_r_u64(pmi_reader *r, uint64_t *v, const char *what);
/* Point at the next n bytes and skip them. */
bool pmi_r_span(pmi_reader *r, uint64_t n, const uint8_t **p, const char *what);

/* An owned, growable copy of the caller bytes an apply step trusts.  Parsers copy each
 * record first and validate the copy, so a caller that rewrites its buffer while the GIL is
 * released (state_read runs without it) cannot change a validated value. */
typedef struct pmi_copy {
    uint8_t *buf;
    uint64_t n;
    uint64_t cap;
} pmi_copy;

/* Copy the next n bytes of r to the end of c and skip them; *out points at the copy (valid
 * until the next call).  PM_E_FORMAT (message as pmi_r_span) or PM_E_NOMEM. */
pm_status pmi_r_copy(pmi_reader *r, pmi_copy *c, uint64_t n, const uint8_t **out, const char *what);
void pmi_copy_free(pmi_copy *c);
/* Bulk variant: make c hold bytes [m0, m0 + end) of r's buffer (c mirrors the buffer from m0;
 * grows geometrically, never past r->len).  The caller checks m0 + end <= r->len. */
pm_status pmi_copy_window(const pmi_reader *r, uint64_t m0, pmi_copy *c, uint64_t end);
static inline pm_status pmi_copy_need(const pmi_reader *r, uint64_t m0, pmi_copy *c, uint64_t end) {
    return end <= c->n ? PM_OK : pmi_copy_window(r, m0, c, end);
}

/* memcpy of a large block as pieces of 256 KB: glibc's memcpy of one multi-megabyte block
 * runs about a fifth slower than the same bytes in pieces on the machines measured (bench/
 * README.md); the tensor copies of state reads and writes go through here. */
static inline void pmi_copy_big(void *dst, const void *src, size_t n) {
    const size_t piece = (size_t)256 << 10;
    uint8_t *d = (uint8_t *)dst;
    const uint8_t *s = (const uint8_t *)src;
    while (n > piece) {
        memcpy(d, s, piece);
        d += piece;
        s += piece;
        n -= piece;
    }
    memcpy(d, s, n);
}

/* Set bits of x.  The portable x86-64 baseline has no POPCNT instruction, and
 * __builtin_popcountll then becomes a libgcc call; this stays inline on every target. */
static inline uint32_t pmi_popcount64(uint64_t x) {
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (uint32_t)((x * 0x0101010101010101ULL) >> 56);
}

/* little-endian 32-bit fields of the state format: one plain (unaligned) access on
 * little-endian hosts, bytes elsewhere */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
static inline uint32_t pmi_rd_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static inline void pmi_wr_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
#else
static inline uint32_t pmi_rd_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}
static inline void pmi_wr_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
#endif
static inline int32_t pmi_rd_i32(const uint8_t *p) { return (int32_t)pmi_rd_u32(p); }

#endif /* PM_INTERNAL_H */
