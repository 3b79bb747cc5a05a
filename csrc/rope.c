/* rope.c - K-shift math: ggml's CPU RoPE cache, and the in-place re-rotation of K rows.
 *
 * The cache follows ggml-cpu's ops.cpp (rope_yarn, ggml_rope_cache_init) and ggml.c
 * (ggml_rope_yarn_corr_dims) operation for operation in float arithmetic (SPEC 4.10.3), with
 * the multiply-adds that llama.cpp's x86 CPU backend fuses (its C++ is compiled with FMA and
 * contraction on) written as fmaf: the YaRN theta mix, the YaRN magnitude correction, and
 * the rotation itself (kernels: fmaf(a, c, -(b*s)), fmaf(a, s, b*c)).  Checked bit for bit
 * against ggml_rope_ext of the llama.cpp b11739 CPU wheel (x86-64, AVX2/FMA), f32 and f16,
 * NORM and NEOX, with and without YaRN and freq factors; quantized K-shifts byte for byte
 * against llama.cpp's graph (cast, Hadamard mul_mat, rope, Hadamard, cpy).
 * Quantized K follows llama.cpp's build_rope_shift: dequantize, Hadamard (FWHT), rope,
 * Hadamard, quantize with the CPU backend's from_float (SPEC 4.10.4). */
#include "pm_internal.h"
#include "kernels/pmk_common.h"

#include <math.h>

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

/* ggml_rope_yarn_corr_dim: the dimension whose wavelength spans n_ctx_orig / beta turns. */
static float pmi_corr_dim(int n_dims, int n_ctx_orig, float beta, float base) {
    return (float)n_dims * logf((float)n_ctx_orig / (beta * 2.0f * (float)M_PI)) /
           (2.0f * logf(base));
}

/* rope_yarn_ramp: 1 at and below `low`, 0 at and above `high`, i0 / 2 in integer math. */
static float pmi_yarn_ramp(float low, float high, int i0) {
    const float span = 0.001f > high - low ? 0.001f : high - low;
    const float y = ((float)(i0 / 2) - low) / span;
    const float y0 = 0.0f > y ? 0.0f : y;   /* MAX(0, y) */
    const float y1 = 1.0f < y0 ? 1.0f : y0; /* MIN(1, .) */
    return 1.0f - y1;
}

void pmi_rope_cache(const pm_rope *rope, float p, float *cs) {
    const int n_dims = (int)rope->n_rot;
    if (n_dims < 2) {
        return; /* nothing to fill */
    }
    const float freq_base = rope->freq_base;
    const float freq_scale = rope->freq_scale;
    const float ext_factor = rope->ext_factor;
    const float theta_scale = powf(freq_base, -2.0f / (float)n_dims);
    const int n_ctx_orig = pmk_wrap_i32(rope->n_ctx_orig);

    /* ggml_rope_yarn_corr_dims */
    const float start = floorf(pmi_corr_dim(n_dims, n_ctx_orig, rope->beta_fast, freq_base));
    const float end = ceilf(pmi_corr_dim(n_dims, n_ctx_orig, rope->beta_slow, freq_base));
    const float lo = 0.0f > start ? 0.0f : start;                               /* MAX(0, start) */
    const float hi = (float)(n_dims - 1) < end ? (float)(n_dims - 1) : end;     /* MIN(n_dims-1, end) */

    const float *ff = (rope->n_freq_factors > 0) ? rope->freq_factors : NULL;
    float theta = p;
    for (int i0 = 0; i0 + 1 < n_dims; i0 += 2) {
        const float f = ff != NULL ? ff[i0 / 2] : 1.0f;
        const float theta_extrap = theta / f;
        const float theta_interp = freq_scale * theta_extrap;
        float t = theta_interp;
        float mscale = rope->attn_factor;
        if (ext_factor != 0.0f) {
            const float ramp_mix = pmi_yarn_ramp(lo, hi, i0) * ext_factor;
            /* theta_interp * (1 - ramp_mix) + theta_extrap * ramp_mix, and
             * 1 + 0.1 * logf(1 / freq_scale), contracted as the x86 build contracts them */
            t = fmaf(theta_interp, 1 - ramp_mix, theta_extrap * ramp_mix);
            mscale *= fmaf(0.1f, logf(1.0f / freq_scale), 1.0f);
        }
        cs[i0] = cosf(t) * mscale;
        cs[i0 + 1] = sinf(t) * mscale;
        theta *= theta_scale;
    }
}

pm_status pmi_kshift_check(int32_t type, uint32_t head_dim, uint32_t n_rot, uint32_t rot_off,
                           int32_t rot) {
    if (!pmi_type_known(type)) {
        return pmi_fail(PM_E_SHIFT, "K-shift: unsupported K type %d", (int)type);
    }
    if (type == PM_TYPE_BF16) {
        return pmi_fail(PM_E_SHIFT,
                        "K-shift: a bf16 K cache cannot be shifted (ggml's CPU rope has no bf16)");
    }
    if (n_rot % 2 != 0) {
        return pmi_fail(PM_E_SHIFT, "K-shift: n_rot %u is odd", (unsigned)n_rot);
    }
    if ((uint64_t)rot_off + n_rot > head_dim) {
        return pmi_fail(PM_E_SHIFT, "K-shift: rotated part [%u, %u) exceeds the head (%u)",
                        (unsigned)rot_off, (unsigned)(rot_off + n_rot), (unsigned)head_dim);
    }
    if (pmi_type_is_quantized(type)) {
        const char *tn = pm_type_name(type);
        if (rot <= 0) {
            return pmi_fail(PM_E_SHIFT,
                            "K-shift: quantized K (%s) without a Hadamard rotation (llama.cpp "
                            "dereferences a null rotation matrix)", tn);
        }
        if (n_rot != head_dim || rot_off != 0) {
            return pmi_fail(PM_E_SHIFT,
                            "K-shift: quantized K (%s) needs n_rot == head_dim and no offset "
                            "(n_rot %u, head_dim %u, offset %u)", tn, (unsigned)n_rot,
                            (unsigned)head_dim, (unsigned)rot_off);
        }
        if (!pmk_is_pow2((size_t)rot) || head_dim % (uint32_t)rot != 0) {
            return pmi_fail(PM_E_SHIFT,
                            "K-shift: Hadamard size %d is not a power of two dividing "
                            "head_dim %u", (int)rot, (unsigned)head_dim);
        }
        if (head_dim % pm_type_block_size(type) != 0) {
            return pmi_fail(PM_E_SHIFT, "K-shift: head_dim %u is not a multiple of the %s block",
                            (unsigned)head_dim, tn);
        }
    }
    return PM_OK;
}

/* FWHT of every rot-float chunk of x[0..n). */
static void pmi_fwht_chunks(const pmk_table *kt, float *x, size_t n, size_t rot) {
    const float scale = 1.0f / sqrtf((float)rot);
    for (size_t i = 0; i + rot <= n; i += rot) {
        kt->fwht_f32(x + i, rot, scale);
    }
}

/* Bytes of pmi_kshift_into's work memory (the rope cache, the rotated head(s), f16 staging). */
uint64_t pmi_kshift_work_bytes(int32_t type, uint32_t n_head_kv, uint32_t head_dim, uint32_t n_rot) {
    const uint64_t n_work = pmi_type_is_quantized(type) ? (uint64_t)n_head_kv * head_dim : (uint64_t)n_rot;
    if (n_work > (UINT64_MAX / sizeof(float) - n_rot) / 2) {
        return UINT64_MAX;
    }
    return ((uint64_t)n_rot + n_work) * sizeof(float) + (uint64_t)n_rot * sizeof(uint16_t);
}

pm_status pmi_kshift(uint8_t *k, uint64_t row_bytes, uint32_t n_cells, const int32_t *shift,
                     int32_t type, uint32_t n_head_kv, uint32_t head_dim, uint32_t rot_off,
                     const pm_rope *rope, int32_t rot) {
    /* work memory first: a failure leaves k untouched */
    uint64_t nb = rope != NULL ? pmi_kshift_work_bytes(type, n_head_kv, head_dim, rope->n_rot) : 0;
    if (nb > SIZE_MAX / 2) {
        return pmi_fail(PM_E_NOMEM, "K-shift: work buffer too large");
    }
    void *work = pmi_aligned_calloc((size_t)nb + sizeof(float));
    if (work == NULL) {
        return pmi_fail(PM_E_NOMEM, "K-shift: cannot allocate work memory");
    }
    pm_status st = pmi_kshift_into(work, k, row_bytes, n_cells, shift, type, n_head_kv, head_dim, rot_off, rope, rot);
    pmi_aligned_free(work);
    return st;
}

pm_status pmi_kshift_into(void *work, uint8_t *k, uint64_t row_bytes, uint32_t n_cells, const int32_t *shift,
                          int32_t type, uint32_t n_head_kv, uint32_t head_dim, uint32_t rot_off,
                          const pm_rope *rope, int32_t rot) {
    if (rope == NULL || (n_cells > 0 && (k == NULL || shift == NULL))) {
        return pmi_fail(PM_E_INVALID_ARG, "K-shift: NULL argument");
    }
    int neox;
    switch (rope->mode) {
    case PM_ROPE_NONE: return PM_OK; /* llama.cpp only resets the shifts */
    case PM_ROPE_NORM: neox = 0; break;
    case PM_ROPE_NEOX:
    case PM_ROPE_MROPE:
    case PM_ROPE_IMROPE: neox = 1; break; /* M-RoPE shifts with NEOX ordering */
    default:
        return pmi_fail(PM_E_SHIFT, "K-shift: rope mode %d cannot be shifted", (int)rope->mode);
    }
    const uint32_t n_rot = rope->n_rot;
    pm_status st = pmi_kshift_check(type, head_dim, n_rot, rot_off, rot);
    if (st != PM_OK) {
        return st;
    }
    if (rope->n_freq_factors > 0 &&
        (rope->freq_factors == NULL || rope->n_freq_factors < n_rot / 2)) {
        return pmi_fail(PM_E_INVALID_ARG, "K-shift: %u freq factors for n_rot %u",
                        (unsigned)rope->n_freq_factors, (unsigned)n_rot);
    }
    const bool quant = pmi_type_is_quantized(type);
    const uint64_t head_bytes = pmi_row_size(type, head_dim);
    if (head_bytes != 0 && (uint64_t)n_head_kv > row_bytes / head_bytes) {
        return pmi_fail(PM_E_INVALID_ARG, "K-shift: %u heads of %llu bytes exceed the %llu-byte row",
                        (unsigned)n_head_kv, (unsigned long long)head_bytes,
                        (unsigned long long)row_bytes);
    }
    if (n_cells == 0 || n_rot == 0 || n_head_kv == 0) {
        return PM_OK;
    }
    if (work == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "K-shift: no work memory");
    }

    const uint64_t n_work = quant ? (uint64_t)n_head_kv * head_dim : (uint64_t)n_rot;
    const size_t n_cs = n_rot;
    float *cs = (float *)work;
    float *tmp = cs + n_cs;
    uint16_t *h16 = (uint16_t *)(void *)(tmp + n_work);

    const pmk_table *kt = pmk_get();
    const size_t el = type == PM_TYPE_F32 ? sizeof(float) : sizeof(uint16_t);
    for (uint32_t c = 0; c < n_cells; c++) {
        if (c == 0 || shift[c] != shift[c - 1]) {
            pmi_rope_cache(rope, (float)shift[c], cs);
        }
        uint8_t *row = k + (uint64_t)c * row_bytes;
        if (!quant) {
            for (uint32_t h = 0; h < n_head_kv; h++) {
                uint8_t *p = row + h * head_bytes + (uint64_t)rot_off * el;
                if (type == PM_TYPE_F32) {
                    memcpy(tmp, p, (size_t)n_rot * sizeof(float));
                    kt->rope_f32(tmp, cs, n_rot / 2, neox);
                    memcpy(p, tmp, (size_t)n_rot * sizeof(float));
                } else {
                    memcpy(h16, p, (size_t)n_rot * sizeof(uint16_t));
                    kt->f16_to_f32(h16, tmp, n_rot);
                    kt->rope_f32(tmp, cs, n_rot / 2, neox);
                    kt->f32_to_f16(tmp, h16, n_rot);
                    memcpy(p, h16, (size_t)n_rot * sizeof(uint16_t));
                }
            }
        } else {
            for (uint32_t h = 0; h < n_head_kv; h++) {
                pmi_dequantize_row(type, row + h * head_bytes, tmp + (size_t)h * head_dim,
                                   head_dim);
            }
            pmi_fwht_chunks(kt, tmp, (size_t)n_work, (size_t)rot);
            for (uint32_t h = 0; h < n_head_kv; h++) {
                kt->rope_f32(tmp + (size_t)h * head_dim, cs, n_rot / 2, neox);
            }
            pmi_fwht_chunks(kt, tmp, (size_t)n_work, (size_t)rot);
            /* one from_float call per head row, as ggml_cpy does for the [n_rot, heads] view */
            for (uint32_t h = 0; h < n_head_kv; h++) {
                pmi_quantize_row(type, tmp + (size_t)h * head_dim, row + h * head_bytes,
                                 head_dim);
            }
        }
    }
    return PM_OK;
}
