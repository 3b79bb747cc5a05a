/*
 * pymem.h - the one public header of pymem's C core.
 *
 * pymem re-implements llama.cpp's inference memory module (KV cache, iSWA, recurrent and
 * hybrid memories) with llama.cpp's exact semantics and byte-compatible state blobs.
 * Target: llama.cpp b11739 (state format 11); format 10 is the older 0c1e570 layout.
 *
 * Conventions
 *  - Every fallible call returns a pm_status (PM_OK == 0, errors < 0) and leaves a message
 *    readable through pm_last_error() (thread-local, valid until the next failing call).
 *  - A failed call leaves every object exactly as it was.
 *  - Handles are opaque; pm_X_free accepts NULL.  Inputs are borrowed for the call only.
 *  - Outputs go to caller buffers: ask the size first, or pass a capacity and get
 *    PM_E_BUFFER_SMALL with the needed size.
 *  - The library never prints, aborts or asserts on caller input.
 *
 * The block between the cffi markers is read verbatim by the cffi build (tools/cffi_gen.py):
 * it holds only typedefs, enums with explicit values, integer #defines, structs and
 * prototypes.
 */
#ifndef PYMEM_H
#define PYMEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cffi:begin */
#define PM_MAX_SEQ 256
#define PM_VERSION_MAJOR 0
#define PM_VERSION_MINOR 1

/* state flags (llama_state_seq_flags) */
#define PM_STATE_PARTIAL_ONLY 1
#define PM_STATE_ON_DEVICE 2

/* envelopes around a bare memory section */
#define PM_ENVELOPE_NONE 0
#define PM_ENVELOPE_LLAMA 1

typedef int32_t pm_pos;
typedef int32_t pm_seq_id;
typedef int32_t pm_token;

typedef enum pm_status {
    PM_OK = 0,
    PM_E_INVALID_ARG = -1,   /* bad argument (llama.cpp would abort or misbehave) */
    PM_E_UNSUPPORTED = -2,   /* legal-looking request llama.cpp cannot do */
    PM_E_NO_SLOT = -3,       /* the batch does not fit */
    PM_E_FORMAT = -4,        /* malformed or mismatched state bytes */
    PM_E_IO = -5,            /* file error */
    PM_E_NOMEM = -6,         /* allocation failure */
    PM_E_STATE = -7,         /* operation not allowed in the current state */
    PM_E_BUFFER_SMALL = -8,  /* output buffer too small; the needed size is reported */
    PM_E_BATCH = -9,         /* llama.cpp would reject this batch (decode returns -1) */
    PM_E_SHIFT = -10         /* a pending K-shift cannot be applied */
} pm_status;

/* ggml type ids of cache elements */
typedef enum pm_type {
    PM_TYPE_F32 = 0,
    PM_TYPE_F16 = 1,
    PM_TYPE_Q4_0 = 2,
    PM_TYPE_Q4_1 = 3,
    PM_TYPE_Q5_0 = 6,
    PM_TYPE_Q5_1 = 7,
    PM_TYPE_Q8_0 = 8,
    PM_TYPE_IQ4_NL = 20,
    PM_TYPE_BF16 = 30
} pm_type;

typedef enum pm_swa_type {
    PM_SWA_NONE = 0,
    PM_SWA_STANDARD = 1,
    PM_SWA_CHUNKED = 2,
    PM_SWA_SYMMETRIC = 3
} pm_swa_type;

typedef enum pm_rope_mode {
    PM_ROPE_NONE = -1,
    PM_ROPE_NORM = 0,
    PM_ROPE_NEOX = 2,
    PM_ROPE_MROPE = 8,
    PM_ROPE_VISION = 24,
    PM_ROPE_IMROPE = 40
} pm_rope_mode;

typedef enum pm_mem_kind {
    PM_MEM_KV = 1,
    PM_MEM_ISWA = 2,
    PM_MEM_RECURRENT = 3,
    PM_MEM_HYBRID = 4,
    PM_MEM_HYBRID_ISWA = 5
} pm_mem_kind;

/* non-causal attention variants (llama_non_causal_type), used by the KQ mask */
typedef enum pm_non_causal {
    PM_NON_CAUSAL_ALL = 0,
    PM_NON_CAUSAL_SWA_ONLY = 1,
    PM_NON_CAUSAL_SWA_FULL = 2
} pm_non_causal;

/* ---------------------------------------------------------------------------------------
 * Types and kernels
 * ------------------------------------------------------------------------------------- */

/* Bytes of one row of n elements of type t (n must be a multiple of the block size). */
pm_status pm_type_row_size(int32_t type, uint64_t n, uint64_t *out);
/* Block size (elements) and block bytes; 0 for unknown types. */
uint32_t pm_type_block_size(int32_t type);
uint32_t pm_type_size(int32_t type);
const char *pm_type_name(int32_t type);        /* static text; "?" for unknown types */
pm_status pm_type_from_name(const char *name, int32_t *out);
/* Convert n float32 values to a row of type t (n multiple of the block size), and back. */
pm_status pm_type_from_float(int32_t type, const float *src, void *dst, uint64_t n);
pm_status pm_type_to_float(int32_t type, const void *src, float *dst, uint64_t n);

/* Runtime-dispatched SIMD kernels.  All kernels give results bit-identical to "scalar". */
const char *pm_kernels_name(void);                /* active kernel table */
pm_status pm_kernels_select(const char *name);    /* "scalar", "avx2", "avx512", "neon", or "auto" */
uint32_t pm_kernels_available(const char **names, uint32_t cap);  /* names usable on this CPU */

/* Copy runs of rows and take the XXH3-128 of the source bytes in run order, in one pass: each
 * chunk is hashed right after it is copied, while it is in the CPU's cache (the prompt-cache
 * store checks a stored value's checksum while it moves the value's rows into place).  A run
 * moves n_rows rows of row_bytes from src (rows src_stride apart) to dst (dst_stride apart);
 * with dst NULL it is only hashed.  digest receives the canonical (big-endian) XXH3-128, as
 * xxHash's XXH128_canonicalFromHash and Python's xxhash.xxh3_128().digest() give it. */
typedef struct pm_copy_run {
    const void *src;
    void *dst;
    uint64_t n_rows;
    uint64_t row_bytes;
    uint64_t src_stride;
    uint64_t dst_stride;
} pm_copy_run;
pm_status pm_copy_hash128(const pm_copy_run *runs, uint64_t n_runs, uint8_t *digest);

const char *pm_status_str(pm_status status);     /* static text, never NULL */
const char *pm_last_error(void);                 /* detail of the last failure on this thread */
const char *pm_version(void);

/* ---------------------------------------------------------------------------------------
 * Memory (any type): one opaque handle, one interface
 * ------------------------------------------------------------------------------------- */
typedef struct pm_memory pm_memory;

/* RoPE parameters used by the K-shift of one cache layer. */
typedef struct pm_rope {
    int32_t mode;           /* pm_rope_mode; MROPE/IMROPE shift with NEOX ordering */
    uint32_t n_rot;         /* rotated dimensions per head (<= n_embd_head_k) */
    float freq_base;
    float freq_scale;
    float ext_factor;       /* YaRN */
    float attn_factor;
    float beta_fast;
    float beta_slow;
    uint32_t n_ctx_orig;
    uint32_t n_freq_factors; /* 0, or n_rot / 2 */
    const float *freq_factors; /* copied at creation */
} pm_rope;

/* One layer held by a KV cache. */
typedef struct pm_kv_layer {
    uint32_t il;            /* model layer id */
    uint32_t n_head_kv;
    uint32_t n_embd_head_k;
    uint32_t n_embd_head_v; /* 0: the layer has no V tensor (MLA) */
    uint32_t k_rope_offset; /* elements of each head before the rotated part (MLA "nope") */
    uint32_t has_rope;      /* 0: the K-shift leaves this layer alone */
    pm_rope rope;
} pm_kv_layer;

typedef struct pm_kv_params {
    uint32_t n_layer_model;       /* layers of the model */
    uint32_t n_layer;             /* layers held by this cache */
    const pm_kv_layer *layers;    /* n_layer entries, ascending model layer id */
    uint32_t size;                /* cells per stream */
    uint32_t n_seq_max;           /* 1..256 */
    int32_t type_k;
    int32_t type_v;
    uint32_t v_trans;             /* 1: V stored transposed (llama.cpp without flash attention) */
    uint32_t unified;             /* 1: one stream; 0: one stream per sequence */
    uint32_t n_swa;
    int32_t swa_type;             /* pm_swa_type */
    uint32_t n_pos_per_embd;      /* 1, or 4 for M-RoPE */
    uint32_t cell_ext;            /* 1: cells serialize ext (M-RoPE or PLE models) */
    uint32_t n_embd_v_gqa_max;    /* transposed V row count; 0 = max over this cache's layers */
    int32_t k_rot;                /* Hadamard block size of K (b11739); -1 = derive */
    int32_t v_rot;                /* same for V; -1 = derive */
    uint32_t can_shift;           /* 0 for architectures that cannot shift (STEP35) */
    uint32_t format;              /* state format: 11 (b11739) or 10 (0c1e570) */
    const char *arch;             /* architecture name for the context envelope; may be NULL */
} pm_kv_params;

/* One recurrent layer (Mamba / RWKV / short-conv state rows). */
typedef struct pm_rec_layer {
    uint32_t il;            /* model layer id */
    uint32_t n_embd_r;      /* elements of the r (conv / token-shift) row */
    uint32_t n_embd_s;      /* elements of the s (ssm / wkv) row; may be 0 */
    uint32_t n_embd_p;      /* elements of the PLE conv row; 0 = none */
} pm_rec_layer;

typedef struct pm_rec_params {
    uint32_t n_layer_model;       /* layers of the model (written in the state) */
    uint32_t n_layer;             /* recurrent layers held */
    const pm_rec_layer *layers;   /* ascending model layer id */
    uint32_t size;                /* cells: llama.cpp uses max(1, n_seq_max) */
    uint32_t n_seq_max;
    int32_t type_r;
    int32_t type_s;
    uint32_t n_rs_seq;            /* rollback snapshots per sequence (0 = off) */
    const char *arch;
} pm_rec_params;

/* Constructors of the five memory types.  Composite memories take the parameters of their
 * parts; all parts must agree on n_seq_max (and the KV parts on unified, types, v_trans). */
pm_status pm_kv_new(const pm_kv_params *params, pm_memory **out);
pm_status pm_iswa_new(const pm_kv_params *base, const pm_kv_params *swa, pm_memory **out);
pm_status pm_recurrent_new(const pm_rec_params *params, pm_memory **out);
pm_status pm_hybrid_new(const pm_kv_params *attn, const pm_rec_params *rec, pm_memory **out);
pm_status pm_hybrid_iswa_new(const pm_kv_params *base, const pm_kv_params *swa,
                             const pm_rec_params *rec, pm_memory **out);
void pm_memory_free(pm_memory *mem);
/* Bytes per part (llama_memory_i::memory_breakdown): KV parts first, then the recurrent. */
typedef struct pm_breakdown {
    int32_t part_kind;      /* PM_MEM_KV or PM_MEM_RECURRENT */
    uint32_t cells;         /* cells per stream (KV) or cells (recurrent) */
    uint32_t n_stream;
    uint32_t n_layer;
    uint64_t bytes[3];      /* KV: K, V, cell metadata; recurrent: r (+ p), s, cell metadata */
} pm_breakdown;
uint32_t pm_mem_breakdown(const pm_memory *mem, pm_breakdown *out, uint32_t cap);
/* Number of KV parts (0, 1 or 2) and whether there is a recurrent part. */
uint32_t pm_memory_n_kv(const pm_memory *mem);
bool pm_memory_has_rec(const pm_memory *mem);
int32_t pm_memory_kind(const pm_memory *mem);
/* Bytes allocated for cell metadata and tensors. */
uint64_t pm_memory_nbytes(const pm_memory *mem);

/* Sequence operations, llama.cpp semantics (ranges [p0, p1), negative = open). */
pm_status pm_mem_clear(pm_memory *mem, bool data);
pm_status pm_mem_seq_rm(pm_memory *mem, pm_seq_id seq, pm_pos p0, pm_pos p1, bool *out);
pm_status pm_mem_seq_cp(pm_memory *mem, pm_seq_id src, pm_seq_id dst, pm_pos p0, pm_pos p1);
pm_status pm_mem_seq_keep(pm_memory *mem, pm_seq_id seq);
pm_status pm_mem_seq_add(pm_memory *mem, pm_seq_id seq, pm_pos p0, pm_pos p1, pm_pos shift);
pm_status pm_mem_seq_div(pm_memory *mem, pm_seq_id seq, pm_pos p0, pm_pos p1, int32_t d);
pm_status pm_mem_seq_pos_min(const pm_memory *mem, pm_seq_id seq, pm_pos *out);
pm_status pm_mem_seq_pos_max(const pm_memory *mem, pm_seq_id seq, pm_pos *out);
bool pm_mem_can_shift(const pm_memory *mem);
/* Is an update (K-shift or stream copy) pending? */
bool pm_mem_update_pending(const pm_memory *mem);
/* Apply pending K-shifts and stream copies, as llama.cpp does before a decode.
 * *did (may be NULL) tells whether anything was pending. */
pm_status pm_mem_update(pm_memory *mem, bool *did);

/* State.  seq = -1: whole memory.  flags: PM_STATE_*.  envelope: PM_ENVELOPE_*.
 * With PM_ENVELOPE_LLAMA a whole write gets llama_state_get_data's arch prefix and a
 * per-sequence write gets llama_state_seq_get_data's magic + seq id. */
pm_status pm_mem_state_size(const pm_memory *mem, pm_seq_id seq, uint32_t flags,
                            uint32_t envelope, uint64_t *out);
pm_status pm_mem_state_write(const pm_memory *mem, pm_seq_id seq, uint32_t flags,
                             uint32_t envelope, uint8_t *dst, uint64_t cap, uint64_t *written);
/* Restore; *consumed gets the bytes read.  Nothing changes on failure.  Unless
 * allow_trailing, bytes after the state are an error (PM_E_FORMAT). */
pm_status pm_mem_state_read(pm_memory *mem, pm_seq_id seq, uint32_t flags, uint32_t envelope,
                            const uint8_t *src, uint64_t len, bool allow_trailing,
                            uint64_t *consumed);
/* Validate a state for this memory without changing anything; *consumed as state_read. */
pm_status pm_mem_state_check(const pm_memory *mem, pm_seq_id seq, uint32_t flags,
                             uint32_t envelope, const uint8_t *src, uint64_t len,
                             uint64_t *consumed);

/* ---------------------------------------------------------------------------------------
 * KV cache inspection and data access
 * ------------------------------------------------------------------------------------- */
typedef struct pm_kv_info {
    uint32_t size;
    uint32_t n_stream;
    uint32_t n_seq_max;
    uint32_t n_layer;            /* cache layers */
    uint32_t n_layer_model;
    int32_t type_k;
    int32_t type_v;
    uint32_t v_trans;
    uint32_t n_swa;
    int32_t swa_type;
    uint32_t n_pos_per_embd;
    uint32_t cell_ext;
    uint32_t n_embd_v_gqa_max;
    int32_t k_rot;
    int32_t v_rot;
    uint32_t format;
} pm_kv_info;

typedef struct pm_kv_layer_info {
    uint32_t il;
    uint32_t n_embd_k_gqa;
    uint32_t n_embd_v_gqa;       /* 0: no V */
    uint64_t k_row_bytes;        /* bytes of one cell's K row */
    uint64_t v_row_bytes;        /* untransposed: one cell's V row; transposed: element size */
    uint64_t k_stream_bytes;     /* bytes of one stream of K */
    uint64_t v_stream_bytes;
} pm_kv_layer_info;

/* For iSWA / hybrid memories, part selects a sub-cache (0 = first KV part, 1 = second). */
pm_status pm_kv_info_get(const pm_memory *mem, uint32_t part, pm_kv_info *out);
pm_status pm_kv_layer_info_get(const pm_memory *mem, uint32_t part, uint32_t layer,
                               pm_kv_layer_info *out);
/* Raw tensor memory of a cache layer (layer = index among the cache's layers), one stream.
 * which: 0 = K, 1 = V.  The pointer stays valid until the memory is freed. */
pm_status pm_kv_tensor(pm_memory *mem, uint32_t part, uint32_t layer, uint32_t stream,
                       uint32_t which, uint8_t **ptr, uint64_t *nbytes);
/* Copy cell metadata of one stream: arrays of `size` entries (any may be NULL).
 * seq_bits: 4 x uint64 per cell (bit s = sequence s).  ext: 3 x int32 per cell (x, y, tok). */
pm_status pm_kv_cells_get(const pm_memory *mem, uint32_t part, uint32_t stream, pm_pos *pos,
                          int32_t *shift, uint64_t *seq_bits, int32_t *ext);
/* head, used count, used_max_p1 and has_shift of a stream. */
pm_status pm_kv_stream_get(const pm_memory *mem, uint32_t part, uint32_t stream,
                           uint32_t *head, uint32_t *used, uint32_t *used_max_p1,
                           bool *has_shift);

/* ---------------------------------------------------------------------------------------
 * Recurrent inspection and data access
 * ------------------------------------------------------------------------------------- */
typedef struct pm_rec_info {
    uint32_t size;
    uint32_t n_seq_max;
    uint32_t n_rs_seq;
    uint32_t n_layer;             /* recurrent layers held */
    uint32_t n_layer_model;
    int32_t type_r;
    int32_t type_s;
    uint32_t head;                /* first cell of the last placed range */
    uint32_t n;                   /* cells of that range */
    uint32_t used;
    int32_t rs_z;
} pm_rec_info;

typedef struct pm_rec_layer_info {
    uint32_t il;
    uint64_t row_bytes[3];        /* r, s, p (0 when absent) */
    uint32_t n_rows;              /* size * (1 + n_rs_seq) */
} pm_rec_layer_info;

pm_status pm_rec_info_get(const pm_memory *mem, pm_rec_info *out);
pm_status pm_rec_layer_info_get(const pm_memory *mem, uint32_t layer, pm_rec_layer_info *out);
/* Cell metadata: arrays of `size` entries (any may be NULL); seq_bits 4 x uint64 per cell;
 * rs_idx: n_seq_max entries. */
pm_status pm_rec_cells_get(const pm_memory *mem, pm_pos *pos, int32_t *src, int32_t *src0,
                           int32_t *tail, uint64_t *seq_bits, uint32_t *rs_idx);
/* Rows of layer `layer` (index among the held layers); which: 0 = r, 1 = s, 2 = p.  All
 * planes: row k*size + c is snapshot plane k of cell c. */
pm_status pm_rec_tensor(pm_memory *mem, uint32_t layer, uint32_t which, uint8_t **ptr,
                        uint64_t *nbytes);

/* ---------------------------------------------------------------------------------------
 * Batches, ubatches and memory contexts
 * ------------------------------------------------------------------------------------- */
typedef struct pm_batch pm_batch;

/* A decode batch, as llama_batch.  tokens: NULL for an embedding batch.  pos: NULL = positions
 * follow each sequence (llama.cpp's rule, at init_batch time); else n_tokens * n_pos entries,
 * section-major.  n_seq_id / seq_id (flattened, sum(n_seq_id) entries): NULL = all in seq 0.
 * Each token's ids are reordered as llama.cpp (libstdc++ unordered_set) orders them.
 * output: NULL = only the last token. */
pm_status pm_batch_new(uint32_t n_tokens, const pm_token *tokens, const pm_pos *pos,
                       uint32_t n_pos, const int32_t *n_seq_id, const pm_seq_id *seq_id,
                       const int8_t *output, pm_batch **out);
void pm_batch_free(pm_batch *batch);
uint32_t pm_batch_n_tokens(const pm_batch *batch);
/* The ids of token i in llama.cpp's order (primary first); returns the count. */
uint32_t pm_batch_seq_ids(const pm_batch *batch, uint32_t i, pm_seq_id *out, uint32_t cap);
/* The order llama.cpp gives to a set of ids inserted in this order (libstdc++ rules). */
uint32_t pm_seq_set_order(const pm_seq_id *ids, uint32_t n, pm_seq_id *out);

typedef struct pm_mctx pm_mctx;

typedef struct pm_ubatch_info {
    uint32_t n_tokens;
    uint32_t n_seq_tokens;
    uint32_t n_seqs;
    uint32_t n_seqs_unq;
    uint32_t equal_seqs;
    uint32_t n_stream;        /* streams of the placement (KV part) */
    uint32_t n_kv;            /* cells the attention looks at, after apply (0 before) */
    uint32_t applied;
} pm_ubatch_info;

/* Validate the batch as llama_decode does first (before its update step): PM_E_BATCH with
 * llama.cpp's reason where it returns -1.  Changes nothing. */
pm_status pm_mem_check_batch(const pm_memory *mem, const pm_batch *batch, uint32_t n_vocab,
                             bool embd_all);
/* Validate the batch as llama_decode does, split it into ubatches and dry-run their
 * placement.  n_vocab = 0 skips the token-id check.  On failure nothing changes:
 * PM_E_BATCH (llama.cpp returns -1), PM_E_NO_SLOT (llama.cpp returns 1). */
pm_status pm_mem_init_batch(pm_memory *mem, const pm_batch *batch, uint32_t n_ubatch,
                            uint32_t n_vocab, bool embd_all, pm_mctx **out);
void pm_mctx_free(pm_mctx *ctx);
uint32_t pm_mctx_n_ubatch(const pm_mctx *ctx);
pm_status pm_mctx_ubatch_info(const pm_mctx *ctx, uint32_t i, pm_ubatch_info *out);
/* Token data of ubatch i (arrays of n_tokens; any may be NULL): index of each token in the
 * batch, its position (section 0), its primary sequence id, its output flag. */
pm_status pm_mctx_ubatch_tokens(const pm_mctx *ctx, uint32_t i, uint32_t *batch_idx,
                                pm_pos *pos, pm_seq_id *seq, int8_t *output);
/* Place ubatch i; ubatches must be applied in order. */
pm_status pm_mctx_apply(pm_mctx *ctx, uint32_t i);
/* The cells of ubatch i: n_stream * n_tps entries (n_tps = n_tokens / n_stream), the
 * stream of each group in streams[n_stream].  part selects an iSWA half. */
pm_status pm_mctx_cells(const pm_mctx *ctx, uint32_t i, uint32_t part, uint32_t *streams,
                        uint32_t *cells);
/* Store K and V rows for the tokens of an applied ubatch (model layer il).  k/v: n_tokens
 * rows; as float32 (is_f32 = 1; converted to the cache type for f32/f16/bf16/q8_0) or as
 * raw rows of the cache type.  NULL skips K or V. */
pm_status pm_mctx_store(pm_mctx *ctx, uint32_t i, uint32_t il, const void *k, uint64_t k_len,
                        const void *v, uint64_t v_len, bool is_f32);
/* Store the new recurrent states of an applied ubatch (model layer il): one r row and one s
 * row per sequence set (n_seqs rows), raw rows of the state types, into the cells llama.cpp
 * computes them into.  NULL skips r or s. */
pm_status pm_mctx_store_rs(pm_mctx *ctx, uint32_t i, uint32_t il, const void *r, uint64_t r_len,
                           const void *s, uint64_t s_len);
/* The recurrent range of an applied ubatch: first cell and count (sets occupy head..head+n_seqs). */
pm_status pm_mctx_rec_range(const pm_mctx *ctx, uint32_t i, uint32_t *head, uint32_t *n);
/* KQ mask of an applied ubatch: float32 [n_stream][n_tps][n_kv], 0 or -INFINITY.
 * part selects the iSWA half; causal/non_causal as the context; alibi adds -|p0 - p1|. */
pm_status pm_mctx_kq_mask(const pm_mctx *ctx, uint32_t i, uint32_t part, bool causal,
                          int32_t non_causal, bool alibi, float *out, uint64_t cap,
                          uint32_t *n_kv);
/* cffi:end */

#ifdef __cplusplus
}
#endif

#endif /* PYMEM_H */
