/* batch.c - decode batches: llama.cpp's sequence-id order, validation
 * (llama_batch_allocr::init) and the ubatch splits (SPEC section 9). */
#include "memory/memory.h"

#include <stdlib.h>

/* ---- the order of a token's sequence ids (libstdc++ unordered_set, SPEC 9.1.1) ---------- */

static uint64_t bucket_count(uint32_t n) {
    if (n <= 13) {
        return 13;
    }
    if (n <= 29) {
        return 29;
    }
    if (n <= 59) {
        return 59;
    }
    if (n <= 127) {
        return 127;
    }
    return 257;
}

static uint64_t bucket_of(pm_seq_id v, uint64_t bc) {
    return (uint64_t)(int64_t)v % bc; /* std::hash<int> is the value, as size_t */
}

static void place(pm_seq_id *list, uint32_t *n, pm_seq_id v, uint64_t bc) {
    uint32_t at = 0;
    uint64_t b = bucket_of(v, bc);
    for (uint32_t k = 0; k < *n; ++k) {
        if (bucket_of(list[k], bc) == b) {
            at = k;
            break;
        }
    }
    memmove(list + at + 1, list + at, sizeof(pm_seq_id) * (*n - at));
    list[at] = v;
    (*n)++;
}

uint32_t pm_seq_set_order(const pm_seq_id *ids, uint32_t n, pm_seq_id *out) {
    uint32_t len = 0;
    uint64_t bc = 13;
    for (uint32_t i = 0; i < n; ++i) {
        bool dup = false;
        for (uint32_t k = 0; k < len; ++k) {
            if (out[k] == ids[i]) {
                dup = true;
                break;
            }
        }
        if (dup) {
            continue;
        }
        uint64_t nbc = bucket_count(len + 1);
        if (nbc != bc) {
            /* rehash: re-place the current elements in their current order */
            pm_seq_id old[PM_MAX_SEQ + 1];
            uint32_t n_old = len;
            memcpy(old, out, sizeof(pm_seq_id) * len);
            len = 0;
            bc = nbc;
            for (uint32_t k = 0; k < n_old; ++k) {
                place(out, &len, old[k], bc);
            }
        }
        place(out, &len, ids[i], bc);
    }
    return len;
}

/* ---- pm_batch ----------------------------------------------------------------------------- */

pm_status pm_batch_new(uint32_t n_tokens, const pm_token *tokens, const pm_pos *pos,
                       uint32_t n_pos, const int32_t *n_seq_id, const pm_seq_id *seq_id,
                       const int8_t *output, pm_batch **out) {
    if (out == NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "out is NULL");
    }
    *out = NULL;
    if (pos != NULL && (n_pos < 1 || n_pos > 4)) {
        return pmi_fail(PM_E_INVALID_ARG, "n_pos %u must be 1..4", n_pos);
    }
    if (n_tokens > (1u << 28)) {
        return pmi_fail(PM_E_INVALID_ARG, "too many tokens (%u)", n_tokens);
    }
    if (seq_id == NULL && n_seq_id != NULL) {
        return pmi_fail(PM_E_INVALID_ARG, "n_seq_id given without seq_id");
    }
    /* Every caller array is read once (the GIL is released: another thread may rewrite
     * them): the id counts are copied into seq_off as prefix sums, validated there, and the
     * second pass uses only those. */
    size_t nt = n_tokens ? n_tokens : 1;
    uint32_t *pre = malloc(sizeof(uint32_t) * (nt + 1));
    if (pre == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    uint64_t total = 0;
    pre[0] = 0;
    for (uint32_t i = 0; i < n_tokens; ++i) {
        int32_t n = n_seq_id ? n_seq_id[i] : 1;
        if (n < 1 || n > PM_MAX_SEQ) {
            free(pre);
            return pmi_fail(PM_E_INVALID_ARG, "token %u has %d sequence ids (need 1..%d)", i, n,
                            PM_MAX_SEQ);
        }
        total += (uint64_t)n;
        pre[i + 1] = (uint32_t)total; /* n_tokens <= 2^28, n <= 256: no wrap */
    }
    pm_batch *b = calloc(1, sizeof(*b));
    if (b == NULL) {
        free(pre);
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    b->n_tokens = n_tokens;
    b->n_pos = pos ? n_pos : 0;
    b->seq_off = pre;
    b->seq_id = malloc(sizeof(pm_seq_id) * (total ? total : 1));
    b->first_id = malloc(sizeof(pm_seq_id) * nt);
    b->output = malloc(nt);
    if (tokens) {
        b->token = malloc(sizeof(pm_token) * nt);
    }
    if (pos) {
        b->pos = malloc(sizeof(pm_pos) * nt * n_pos);
    }
    if (!b->seq_off || !b->seq_id || !b->first_id || !b->output || (tokens && !b->token) ||
        (pos && !b->pos)) {
        pm_batch_free(b);
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    if (tokens) {
        memcpy(b->token, tokens, sizeof(pm_token) * n_tokens);
    }
    if (pos) {
        memcpy(b->pos, pos, sizeof(pm_pos) * n_tokens * n_pos);
    }
    uint32_t off = 0, src = 0;
    for (uint32_t i = 0; i < n_tokens; ++i) {
        uint32_t n = pre[i + 1] - src; /* the validated count (pre[i + 1] not yet overwritten) */
        b->seq_off[i] = off;
        if (seq_id == NULL) {
            b->seq_id[off++] = 0;
            b->first_id[i] = 0;
        } else {
            pm_seq_id ids[PM_MAX_SEQ];
            memcpy(ids, seq_id + src, sizeof(pm_seq_id) * n);
            b->first_id[i] = ids[0];
            off += pm_seq_set_order(ids, n, b->seq_id + off);
        }
        src += n;
        b->output[i] = output ? (output[i] != 0) : (i + 1 == n_tokens);
    }
    b->seq_off[n_tokens] = off;
    *out = b;
    return PM_OK;
}

void pm_batch_free(pm_batch *b) {
    if (b == NULL) {
        return;
    }
    free(b->token);
    free(b->pos);
    free(b->seq_off);
    free(b->seq_id);
    free(b->first_id);
    free(b->output);
    free(b);
}

uint32_t pm_batch_n_tokens(const pm_batch *b) { return b ? b->n_tokens : 0; }

uint32_t pm_batch_seq_ids(const pm_batch *b, uint32_t i, pm_seq_id *out, uint32_t cap) {
    if (b == NULL || i >= b->n_tokens) {
        return 0;
    }
    uint32_t n = b->seq_off[i + 1] - b->seq_off[i];
    for (uint32_t k = 0; k < n && k < cap; ++k) {
        out[k] = b->seq_id[b->seq_off[i] + k];
    }
    return n;
}

/* ---- validation ------------------------------------------------------------------------------ */

static inline void set_bit(uint64_t *w, pm_seq_id s) { w[(uint32_t)s >> 6] |= 1ULL << ((uint32_t)s & 63); }

static bool sets_equal(const uint64_t *a, const uint64_t *b) {
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static bool sets_overlap(const uint64_t *a, const uint64_t *b) {
    return (a[0] & b[0]) | (a[1] & b[1]) | (a[2] & b[2]) | (a[3] & b[3]);
}

static bool set_subset(const uint64_t *sub, const uint64_t *sup) {
    for (int k = 0; k < PMI_SEQ_WORDS; ++k) {
        if ((sub[k] & sup[k]) != sub[k]) {
            return false;
        }
    }
    return true;
}

static int cmp_pos(const void *a, const void *b) {
    pm_pos x = *(const pm_pos *)a, y = *(const pm_pos *)b;
    return (x > y) - (x < y);
}

void pmi_balloc_free(pmi_balloc *ba) {
    free(ba->pos);
    free(ba->seq_set);
    free(ba->used);
    free(ba->set_of);
    free(ba->set_start);
    free(ba->set_tok);
    memset(ba, 0, sizeof(*ba));
}

void pmi_balloc_reset(pmi_balloc *ba) {
    memset(ba->used, 0, sizeof(bool) * (ba->n_tokens ? ba->n_tokens : 1));
    ba->n_used = 0;
}

static pm_status mem_pos_max(const pm_memory *mem, pm_seq_id s, pm_pos *out) {
    return mem->ops->seq_pos_max(mem, s, out);
}

static pm_status mem_pos_min(const pm_memory *mem, pm_seq_id s, pm_pos *out) {
    return mem->ops->seq_pos_min(mem, s, out);
}

pm_status pmi_balloc_init(pmi_balloc *ba, const pm_batch *b, const pm_memory *mem,
                          uint32_t n_seq_max, uint32_t n_pos_per_embd, uint32_t n_vocab,
                          bool output_all) {
    memset(ba, 0, sizeof(*ba));
    ba->batch = b;
    ba->n_tokens = b->n_tokens;
    ba->n_pos = n_pos_per_embd;
    const uint32_t n = b->n_tokens;
    if (n == 0) {
        return pmi_fail(PM_E_BATCH, "the batch is empty");
    }
    if (b->token != NULL && n_vocab > 0) {
        for (uint32_t i = 0; i < n; ++i) {
            if (b->token[i] < 0 || (uint32_t)b->token[i] >= n_vocab) {
                return pmi_fail(PM_E_BATCH, "invalid token[%u] = %d (n_vocab %u)", i, b->token[i], n_vocab);
            }
        }
    }
    for (uint32_t i = 0; i < n; ++i) {
        for (uint32_t k = b->seq_off[i]; k < b->seq_off[i + 1]; ++k) {
            pm_seq_id s = b->seq_id[k];
            if (s < 0 || (uint32_t)s >= n_seq_max) {
                return pmi_fail(PM_E_BATCH, "invalid seq_id[%u][%u] = %d >= %u", i, k - b->seq_off[i], s,
                                n_seq_max);
            }
        }
    }
    const bool has_token = b->token != NULL;
    const uint32_t n_sec = has_token ? 1 : n_pos_per_embd;
    if (b->pos != NULL && !has_token && b->n_pos < n_pos_per_embd) {
        return pmi_fail(PM_E_INVALID_ARG, "an embedding batch needs %u position sections, not %u",
                        n_pos_per_embd, b->n_pos);
    }
    size_t nt = n;
    ba->pos = calloc(nt * n_sec, sizeof(pm_pos));
    ba->seq_set = calloc(nt * PMI_SEQ_WORDS, sizeof(uint64_t));
    ba->used = calloc(nt, sizeof(bool));
    ba->set_of = malloc(sizeof(uint32_t) * nt);
    ba->set_start = malloc(sizeof(uint32_t) * (nt + 1));
    ba->set_tok = malloc(sizeof(uint32_t) * nt);
    pm_pos *sorted = malloc(sizeof(pm_pos) * nt);
    uint32_t *first = malloc(sizeof(uint32_t) * nt);
    if (!ba->pos || !ba->seq_set || !ba->used || !ba->set_of || !ba->set_start || !ba->set_tok ||
        !sorted || !first) {
        free(sorted);
        free(first);
        pmi_balloc_free(ba);
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    pm_status st = PM_OK;
    /* positions */
    if (b->pos != NULL) {
        for (uint32_t j = 0; j < n_sec; ++j) {
            for (uint32_t i = 0; i < n; ++i) {
                ba->pos[(size_t)j * n + i] = b->pos[(size_t)j * n + i];
            }
        }
    } else {
        int64_t next[PM_MAX_SEQ]; /* int64: a sequence may end at INT32_MAX */
        for (uint32_t s = 0; s < n_seq_max && st == PM_OK; ++s) {
            pm_pos mx;
            st = mem_pos_max(mem, (pm_seq_id)s, &mx);
            next[s] = (int64_t)mx + 1;
        }
        for (uint32_t i = 0; i < n && st == PM_OK; ++i) {
            pm_seq_id f = b->first_id[i];
            if (f < 0 || (uint32_t)f >= n_seq_max) {
                st = pmi_fail(PM_E_BATCH, "invalid seq_id %d", f);
                break;
            }
            if (next[f] > INT32_MAX) {
                /* llama.cpp's int32 overflow gives INT32_MIN, which its "decreasing" check rejects */
                st = pmi_fail(PM_E_BATCH, "sequence %d: the next position would overflow int32", f);
                break;
            }
            ba->pos[i] = (pm_pos)next[f]++;
        }
    }
    /* sequence sets and coupling */
    for (uint32_t i = 0; i < n && st == PM_OK; ++i) {
        uint64_t *w = ba->seq_set + (size_t)i * PMI_SEQ_WORDS;
        for (uint32_t k = b->seq_off[i]; k < b->seq_off[i + 1]; ++k) {
            set_bit(w, b->seq_id[k]);
            if (k > b->seq_off[i]) {
                ba->has_cpl = true;
            }
        }
    }
    /* distinct sets, entries in batch order */
    uint32_t n_sets = 0;
    for (uint32_t i = 0; i < n && st == PM_OK; ++i) {
        uint32_t sid = PMI_NONE;
        for (uint32_t k = 0; k < n_sets; ++k) {
            if (sets_equal(ba->seq_set + (size_t)first[k] * PMI_SEQ_WORDS,
                           ba->seq_set + (size_t)i * PMI_SEQ_WORDS)) {
                sid = k;
                break;
            }
        }
        if (sid == PMI_NONE) {
            sid = n_sets;
            first[n_sets++] = i;
        }
        ba->set_of[i] = sid;
    }
    if (st == PM_OK) {
        ba->n_sets = n_sets;
        memset(ba->set_start, 0, sizeof(uint32_t) * (n_sets + 1));
        for (uint32_t i = 0; i < n; ++i) {
            ba->set_start[ba->set_of[i] + 1]++;
        }
        for (uint32_t k = 0; k < n_sets; ++k) {
            ba->set_start[k + 1] += ba->set_start[k];
        }
        uint32_t *fill = first; /* reuse as cursors */
        for (uint32_t k = 0; k < n_sets; ++k) {
            fill[k] = ba->set_start[k];
        }
        for (uint32_t i = 0; i < n; ++i) {
            ba->set_tok[fill[ba->set_of[i]]++] = i;
        }
    }
    /* per-sequence position checks */
    for (uint32_t s = 0; s < n_seq_max && st == PM_OK; ++s) {
        uint32_t m = 0;
        for (uint32_t i = 0; i < n; ++i) {
            const uint64_t *w = ba->seq_set + (size_t)i * PMI_SEQ_WORDS;
            if ((w[s >> 6] >> (s & 63)) & 1) {
                sorted[m++] = ba->pos[i];
            }
        }
        if (m == 0) {
            continue;
        }
        qsort(sorted, m, sizeof(pm_pos), cmp_pos);
        uint32_t distinct = 1;
        for (uint32_t k = 1; k < m; ++k) {
            distinct += sorted[k] != sorted[k - 1];
        }
        pm_pos bmin = sorted[0], bmax = sorted[m - 1];
        pm_pos p0;
        st = mem_pos_max(mem, (pm_seq_id)s, &p0);
        if (st != PM_OK) {
            break;
        }
        if (n_pos_per_embd > 1) {
            if (has_token ? (p0 >= 0 && p0 >= bmin) : (p0 >= 0 && p0 > bmin)) {
                st = pmi_fail(PM_E_BATCH,
                              "sequence %u: the memory ends at position %d, the batch starts at %d (M-RoPE needs %s)",
                              s, p0, bmin, has_token ? "X < Y" : "X <= Y");
            }
        } else {
            if (p0 >= 0 && (int64_t)bmin != (int64_t)p0 + 1) {
                st = pmi_fail(PM_E_BATCH,
                              "sequence %u: the memory ends at position %d, the batch starts at %d (positions must continue at %lld)",
                              s, p0, bmin, (long long)p0 + 1);
            } else if ((int64_t)bmax - bmin + 1 > (int64_t)distinct) {
                st = pmi_fail(PM_E_BATCH, "sequence %u: positions %d..%d in the batch are not continuous", s,
                              bmin, bmax);
            }
        }
    }
    /* coupled sequences must not have diverged */
    for (uint32_t i = 0; i < n && st == PM_OK; ++i) {
        pm_seq_id s0 = b->seq_id[b->seq_off[i]];
        for (uint32_t k = b->seq_off[i] + 1; k < b->seq_off[i + 1] && st == PM_OK; ++k) {
            pm_seq_id s1 = b->seq_id[k];
            pm_pos a0, a1, b0, b1;
            if ((st = mem_pos_min(mem, s1, &a0)) != PM_OK || (st = mem_pos_min(mem, s0, &a1)) != PM_OK ||
                (st = mem_pos_max(mem, s1, &b0)) != PM_OK || (st = mem_pos_max(mem, s0, &b1)) != PM_OK) {
                break;
            }
            if (a0 != a1 || b0 != b1) {
                st = pmi_fail(PM_E_BATCH, "sequence %d is coupled to %d in the batch, but they have diverged",
                              s1, s0);
            }
        }
    }
    /* positions must not decrease within a sequence */
    if (st == PM_OK) {
        pm_pos cur[PM_MAX_SEQ];
        for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
            cur[s] = -1;
        }
        for (uint32_t i = 0; i < n && st == PM_OK; ++i) {
            for (uint32_t k = b->seq_off[i]; k < b->seq_off[i + 1]; ++k) {
                pm_seq_id s = b->seq_id[k];
                if (ba->pos[i] < cur[s]) {
                    st = pmi_fail(PM_E_BATCH, "sequence %d: positions are decreasing (token %u)", s, i);
                    break;
                }
                cur[s] = ba->pos[i];
            }
        }
    }
    /* Position -1 passes llama.cpp's checks (decreasing positions catch < -1), but the cell
     * it fills looks empty (pos == -1) while it holds sequences: llama.cpp never writes it in
     * states and its bookkeeping breaks on the next placement.  A documented divergence, as
     * for restored cells with negative positions (SPEC A-16). */
    for (uint32_t i = 0; i < n && st == PM_OK; ++i) {
        if (ba->pos[i] < 0) {
            st = pmi_fail(PM_E_BATCH, "token %u: position %d is negative", i, ba->pos[i]);
        }
    }
    free(sorted);
    free(first);
    if (st != PM_OK) {
        pmi_balloc_free(ba);
        return st;
    }
    (void)output_all;
    return PM_OK;
}

/* ---- ubatches -------------------------------------------------------------------------------- */

void pmi_ubatch_free(pmi_ubatch *ub) {
    free(ub->idx);
    free(ub->token);
    free(ub->pos);
    free(ub->seq_off);
    free(ub->seq_id);
    free(ub->output);
    memset(ub, 0, sizeof(*ub));
}

static pm_status ubatch_alloc(pmi_ubatch *ub, uint32_t n_tokens, uint32_t n_pos, uint64_t n_ids) {
    memset(ub, 0, sizeof(*ub));
    size_t nt = n_tokens ? n_tokens : 1;
    ub->idx = calloc(nt, sizeof(uint32_t));
    ub->token = calloc(nt, sizeof(pm_token));
    ub->pos = calloc(nt * n_pos, sizeof(pm_pos));
    ub->seq_off = calloc(nt + 1, sizeof(uint32_t));
    ub->seq_id = calloc(n_ids ? n_ids : 1, sizeof(pm_seq_id));
    ub->output = calloc(nt, 1);
    if (!ub->idx || !ub->token || !ub->pos || !ub->seq_off || !ub->seq_id || !ub->output) {
        pmi_ubatch_free(ub);
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    ub->n_tokens = n_tokens;
    ub->n_pos = n_pos;
    for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
        ub->seq_idx[s] = -1;
    }
    return PM_OK;
}

pm_status pmi_ubatch_reserve(pmi_ubatch *ub, uint32_t n_tokens, uint32_t n_pos, pm_seq_id seq) {
    pm_status st = ubatch_alloc(ub, n_tokens, n_pos, n_tokens);
    if (st != PM_OK) {
        return st;
    }
    ub->n_seq_tokens = n_tokens;
    ub->n_seqs = 1;
    ub->n_seqs_unq = 1;
    ub->equal_seqs = true;
    ub->has_token = true;
    ub->seq_id_unq[0] = seq;
    ub->seq_idx[0] = 0;
    for (uint32_t i = 0; i < n_tokens; ++i) {
        ub->seq_off[i] = i;
        ub->seq_id[i] = seq;
    }
    ub->seq_off[n_tokens] = n_tokens;
    return PM_OK;
}

static pm_status ubatch_add(pmi_balloc *ba, const uint32_t *idxs, uint32_t n_tokens, uint32_t n_seqs,
                            bool equal, pmi_ubatch *ub) {
    const pm_batch *b = ba->batch;
    uint64_t n_ids = 0;
    for (uint32_t i = 0; i < n_tokens; ++i) {
        n_ids += b->seq_off[idxs[i] + 1] - b->seq_off[idxs[i]];
    }
    pm_status st = ubatch_alloc(ub, n_tokens, ba->n_pos, n_ids);
    if (st != PM_OK) {
        return st;
    }
    ub->equal_seqs = equal;
    ub->n_seqs = n_seqs;
    ub->n_seq_tokens = n_tokens / n_seqs;
    ub->has_token = b->token != NULL;
    uint64_t unq[PMI_SEQ_WORDS] = {0, 0, 0, 0};
    uint32_t off = 0;
    for (uint32_t i = 0; i < n_tokens; ++i) {
        uint32_t bi = idxs[i];
        ub->idx[i] = bi;
        if (b->token) {
            ub->token[i] = b->token[bi];
        }
        for (uint32_t j = 0; j < ba->n_pos; ++j) {
            size_t src = b->token ? 0 : (size_t)j * ba->n_tokens;
            ub->pos[(size_t)j * n_tokens + i] = ba->pos[src + bi];
        }
        ub->seq_off[i] = off;
        for (uint32_t k = b->seq_off[bi]; k < b->seq_off[bi + 1]; ++k) {
            ub->seq_id[off++] = b->seq_id[k];
            set_bit(unq, b->seq_id[k]);
        }
        ub->output[i] = b->output[bi];
    }
    ub->seq_off[n_tokens] = off;
    for (uint32_t s = 0; s < PM_MAX_SEQ; ++s) {
        if ((unq[s >> 6] >> (s & 63)) & 1) {
            ub->seq_idx[s] = (int32_t)ub->n_seqs_unq;
            ub->seq_id_unq[ub->n_seqs_unq++] = (pm_seq_id)s;
        }
    }
    return PM_OK;
}

pm_status pmi_split_simple(pmi_balloc *ba, uint32_t n_ubatch, pmi_ubatch *out) {
    memset(out, 0, sizeof(*out));
    uint32_t cur = 0;
    while (cur < ba->n_tokens && ba->used[cur]) {
        ++cur;
    }
    if (cur >= ba->n_tokens) {
        return PM_OK;
    }
    uint32_t *idxs = malloc(sizeof(uint32_t) * ba->n_tokens);
    if (idxs == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    uint32_t n = 0;
    for (;;) {
        idxs[n++] = cur;
        ba->used[cur] = true;
        ba->n_used++;
        ++cur;
        if (cur >= ba->n_tokens || n >= n_ubatch) {
            break;
        }
    }
    pm_status st = ubatch_add(ba, idxs, n, n, false, out);
    free(idxs);
    return st;
}

pm_status pmi_split_equal(pmi_balloc *ba, uint32_t n_ubatch, bool sequential, uint32_t n_keep_tail,
                          pmi_ubatch *out) {
    memset(out, 0, sizeof(*out));
    if (sequential && ba->has_cpl) {
        return PM_OK; /* llama.cpp logs an error and ends the split; the caller sees unused tokens */
    }
    if (n_keep_tail > 0 && n_ubatch <= n_keep_tail) {
        return pmi_fail(PM_E_INVALID_ARG, "n_ubatch %u must exceed the kept tail %u", n_ubatch, n_keep_tail);
    }
    const pm_batch *b = ba->batch;
    uint32_t *sets = malloc(sizeof(uint32_t) * (ba->n_sets + 1));
    uint32_t *cur = malloc(sizeof(uint32_t) * (ba->n_sets + 1));
    uint32_t *take = malloc(sizeof(uint32_t) * (ba->n_tokens + 1));
    uint32_t *ntake = calloc(ba->n_sets + 1, sizeof(uint32_t));
    if (!sets || !cur || !take || !ntake) {
        free(sets);
        free(cur);
        free(take);
        free(ntake);
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    uint32_t n_seqs = 0;
    pm_seq_id last = -1;
    for (uint32_t i = 0; i < ba->n_tokens; ++i) {
        if (ba->used[i]) {
            continue;
        }
        bool add = true;
        const uint64_t *si = ba->seq_set + (size_t)i * PMI_SEQ_WORDS;
        for (uint32_t k = 0; k < n_seqs; ++k) {
            if (sets_overlap(ba->seq_set + (size_t)ba->set_tok[ba->set_start[sets[k]]] * PMI_SEQ_WORDS, si)) {
                add = false;
                break;
            }
        }
        pm_seq_id prim = b->seq_id[b->seq_off[i]];
        if (sequential) {
            add = add && (n_seqs == 0 || prim == last + 1);
        }
        if (add) {
            sets[n_seqs++] = ba->set_of[i];
            last = prim;
            if (n_seqs > n_ubatch) {
                break;
            }
        }
    }
    pm_status st = PM_OK;
    if (n_seqs == 0) {
        goto done;
    }
    for (uint32_t s = 0; s < n_seqs; ++s) {
        cur[s] = ba->set_start[sets[s]];
        while (ba->used[ba->set_tok[cur[s]]]) {
            ++cur[s];
        }
    }
    /* take[] holds the entries taken per set: set 0 may receive all of its entries (tail
     * rule), the others at most n_tokens / n_seqs (equal rounds over disjoint sets) */
    uint32_t stride = ba->n_tokens / n_seqs + 1;
    uint32_t cap0 = ba->set_start[sets[0] + 1] - ba->set_start[sets[0]];
#define TAKE_OFF(s) ((s) == 0 ? 0 : (size_t)cap0 + (size_t)((s) - 1) * stride)
    free(take);
    take = malloc(sizeof(uint32_t) * ((size_t)stride * n_seqs + cap0));
    if (take == NULL) {
        st = pmi_fail(PM_E_NOMEM, "out of memory");
        goto done;
    }
    for (;;) {
        bool can_expand = true;
        for (uint32_t s = 0; s < n_seqs; ++s) {
            if (cur[s] >= ba->set_start[sets[s] + 1]) {
                can_expand = false;
                break;
            }
        }
        if (!can_expand) {
            break;
        }
        for (uint32_t s = 0; s < n_seqs; ++s) {
            uint32_t idx = ba->set_tok[cur[s]];
            take[TAKE_OFF(s) + ntake[s]++] = idx;
            ba->used[idx] = true;
            ba->n_used++;
            ++cur[s];
        }
        if ((uint64_t)(ntake[0] + 1) * n_seqs > n_ubatch) {
            break;
        }
    }
    if (n_keep_tail > 0) {
#define REMAINING(s) (ba->set_start[sets[s] + 1] - cur[s])
        uint32_t n_keep = 0;
        while (n_keep < n_seqs) {
            uint32_t rem = REMAINING(n_keep);
            if (rem != 0 && rem < n_keep_tail) {
                break;
            }
            n_keep++;
        }
        if (n_keep == 0) {
            if (ntake[0] + REMAINING(0) <= n_ubatch) {
                while (REMAINING(0) > 0) {
                    uint32_t idx = ba->set_tok[cur[0]];
                    take[ntake[0]++] = idx;
                    ba->used[idx] = true;
                    ba->n_used++;
                    ++cur[0];
                }
            } else {
                while (REMAINING(0) < n_keep_tail) {
                    uint32_t idx = take[--ntake[0]];
                    ba->used[idx] = false;
                    ba->n_used--;
                    --cur[0];
                }
            }
            n_keep = 1;
        }
#undef REMAINING
        for (uint32_t s = n_keep; s < n_seqs; ++s) {
            for (uint32_t k = 0; k < ntake[s]; ++k) {
                ba->used[take[TAKE_OFF(s) + k]] = false;
                ba->n_used--;
            }
        }
        n_seqs = n_keep;
    }
    {
        uint32_t total = 0;
        uint32_t *idxs = malloc(sizeof(uint32_t) * ((size_t)ba->n_tokens + 1));
        if (idxs == NULL) {
            st = pmi_fail(PM_E_NOMEM, "out of memory");
            goto done;
        }
        for (uint32_t s = 0; s < n_seqs; ++s) {
            for (uint32_t k = 0; k < ntake[s]; ++k) {
                idxs[total++] = take[TAKE_OFF(s) + k];
            }
        }
        st = ubatch_add(ba, idxs, total, n_seqs, true, out);
        free(idxs);
    }
#undef TAKE_OFF
done:
    free(sets);
    free(cur);
    free(take);
    free(ntake);
    return st;
}

pm_status pmi_split_seq(pmi_balloc *ba, uint32_t n_ubatch, pmi_ubatch *out) {
    memset(out, 0, sizeof(*out));
    uint32_t cur = 0;
    while (cur < ba->n_tokens && ba->used[cur]) {
        ++cur;
    }
    if (cur >= ba->n_tokens) {
        return PM_OK;
    }
    uint32_t *idxs = malloc(sizeof(uint32_t) * ba->n_tokens);
    if (idxs == NULL) {
        return pmi_fail(PM_E_NOMEM, "out of memory");
    }
    const uint64_t *cur_set = ba->seq_set + (size_t)cur * PMI_SEQ_WORDS;
    uint32_t n = 0;
    for (;;) {
        idxs[n++] = cur;
        ba->used[cur] = true;
        ba->n_used++;
        if (n >= n_ubatch) {
            break;
        }
        do {
            ++cur;
        } while (cur < ba->n_tokens &&
                 (ba->used[cur] || !set_subset(ba->seq_set + (size_t)cur * PMI_SEQ_WORDS, cur_set)));
        if (cur == ba->n_tokens) {
            break;
        }
        cur_set = ba->seq_set + (size_t)cur * PMI_SEQ_WORDS;
    }
    pm_status st = ubatch_add(ba, idxs, n, 1, true, out);
    free(idxs);
    return st;
}
