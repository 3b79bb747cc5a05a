/* envelope.c - the state of a whole memory: its sections in part order (state/kv_state.c,
 * state/rec_state.c) inside llama.cpp's context or sequence envelope; size / write / check /
 * read, all-or-nothing (parse everything, place the cells in a transaction, then copy data).
 */
#include "memory/memory.h"
#include "state/kv_state.h"
#include "state/rec_state.h"

#include <stdio.h>
#include <stdlib.h>

#define IO_MAGIC 0xAF143CD8u

/* ---- state and envelopes -------------------------------------------------------------------- */

static pm_status check_overlap(const pm_memory *m, const uint8_t *p, uint64_t n, const char *op,
                               const char *buf) {
    char what[64];
    if (pmi_mem_overlaps(m, p, n, what, sizeof what)) {
        return pmi_fail(PM_E_INVALID_ARG, "%s: the %s buffer overlaps this memory's own tensors (%s); copy it first",
                        op, buf, what);
    }
    return PM_OK;
}

static pm_status check_flags(uint32_t flags, uint32_t envelope) {
    if (flags & ~(uint32_t)(PM_STATE_PARTIAL_ONLY | PM_STATE_ON_DEVICE)) {
        return pmi_fail(PM_E_INVALID_ARG, "unknown state flags 0x%x", flags);
    }
    if (flags & PM_STATE_ON_DEVICE) {
        return pmi_fail(PM_E_UNSUPPORTED, "the ON_DEVICE state flag is not supported");
    }
    if (envelope != PM_ENVELOPE_NONE && envelope != PM_ENVELOPE_LLAMA) {
        return pmi_fail(PM_E_INVALID_ARG, "unknown envelope %u", envelope);
    }
    return PM_OK;
}

static pm_status write_all(const pm_memory *m, pmi_writer *w, pm_seq_id s, uint32_t flags,
                           uint32_t envelope) {
    pm_status st = check_flags(flags, envelope);
    if (st != PM_OK) {
        return st;
    }
    if (s < -1 || s >= PM_MAX_SEQ) {
        return pmi_fail(PM_E_INVALID_ARG, "state_write: seq_id %d is not -1 or in [0, %d)", s, PM_MAX_SEQ);
    }
    if (envelope == PM_ENVELOPE_LLAMA) {
        if (s == -1) {
            if (m->arch == NULL) {
                return pmi_fail(PM_E_INVALID_ARG,
                                "the llama.cpp context envelope needs the architecture name (arch)");
            }
            uint32_t n = (uint32_t)strlen(m->arch);
            pmi_w_u32(w, n);
            pmi_w_bytes(w, m->arch, n);
        } else {
            pmi_w_u32(w, IO_MAGIC);
            pmi_w_i32(w, s);
        }
    }
    /* sections in order; with PARTIAL_ONLY the caches without a sliding window (plain, base,
     * attention) write nothing and the SWA and recurrent parts everything */
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pm_status st = pmi_kv_state_write(m->kv[p], w, s, flags);
        if (st != PM_OK) {
            return st;
        }
    }
    return m->rec ? pmi_rec_state_write(m->rec, w, s) : PM_OK;
}

/* Parsed sections of one state, one plan per included part. */
typedef struct state_plan {
    pmi_kv_plan kv[2];
    pmi_rec_plan rec;
} state_plan;

static void plan_free(pm_memory *m, state_plan *sp) {
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pmi_kv_plan_free(&sp->kv[p]);
    }
    pmi_rec_plan_free(&sp->rec);
}

static pm_status parse_state(const pm_memory *m, pmi_reader *r, pm_seq_id s, uint32_t flags, state_plan *sp) {
    memset(sp, 0, sizeof(*sp));
    if (m->n_kv > 0) {
        if (s != -1) {
            pm_status st = pmi_kv_check_seq(m->kv[0], s, "state_read");
            if (st != PM_OK) {
                return st;
            }
        }
    }
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pm_status st = pmi_kv_state_parse(m->kv[p], r, s, flags, &sp->kv[p]);
        if (st != PM_OK) {
            if (m->n_kv > 1 || m->rec) {
                pmi_fail_ctx(st, "%s section", m->n_kv == 2 ? (p == 0 ? "base KV" : "SWA KV") : "attention KV");
            }
            return st;
        }
    }
    if (m->rec) {
        pm_status st = pmi_rec_state_parse(m->rec, r, s, &sp->rec);
        if (st != PM_OK) {
            return m->n_kv ? pmi_fail_ctx(st, "recurrent section") : st;
        }
    }
    return PM_OK;
}

pm_status pm_mem_state_size(const pm_memory *m, pm_seq_id s, uint32_t flags, uint32_t envelope,
                            uint64_t *out) {
    PMI_CHECK_MEM(m);
    pmi_writer w = {NULL, 0, 0, false};
    pm_status st = write_all(m, &w, s, flags, envelope);
    if (st == PM_OK && out) {
        *out = w.n;
    }
    return st;
}

pm_status pm_mem_state_write(const pm_memory *m, pm_seq_id s, uint32_t flags, uint32_t envelope,
                             uint8_t *dst, uint64_t cap, uint64_t *written) {
    PMI_CHECK_MEM(m);
    if (dst == NULL && cap > 0) {
        return pmi_fail(PM_E_INVALID_ARG, "dst is NULL");
    }
    pm_status st = check_overlap(m, dst, cap, "state_write", "destination");
    if (st != PM_OK) {
        return st;
    }
    pmi_writer w = {dst ? dst : (uint8_t *)"", cap, 0, false};
    st = write_all(m, &w, s, flags, envelope);
    if (st != PM_OK) {
        return st;
    }
    if (written) {
        *written = w.n;
    }
    if (w.overflow || w.n > cap) {
        return pmi_fail(PM_E_BUFFER_SMALL, "the state needs %llu bytes, the buffer has %llu",
                        (unsigned long long)w.n, (unsigned long long)cap);
    }
    return PM_OK;
}

/* Read llama.cpp's envelope (if any) in front of the memory section. */
static pm_status read_envelope(const pm_memory *m, pmi_reader *r, pm_seq_id s, uint32_t envelope) {
    if (envelope != PM_ENVELOPE_LLAMA) {
        return PM_OK;
    }
    if (s == -1) {
        uint32_t n;
        const uint8_t *name;
        if (!pmi_r_u32(r, &n, "architecture name length") || !pmi_r_span(r, n, &name, "architecture name")) {
            return PM_E_FORMAT;
        }
        if (m->arch != NULL && (strlen(m->arch) != n || memcmp(m->arch, name, n) != 0)) {
            return pmi_fail(PM_E_FORMAT, "wrong model arch: '%.*s' instead of '%s' (offset %llu)",
                            (int)(n > 64 ? 64 : n), (const char *)name, m->arch,
                            (unsigned long long)(r->off - n));
        }
        return PM_OK;
    }
    uint32_t magic;
    int32_t src_seq;
    if (!pmi_r_u32(r, &magic, "sequence state magic")) {
        return PM_E_FORMAT;
    }
    if (magic != IO_MAGIC) {
        return pmi_fail(PM_E_FORMAT, "wrong sequence state magic 0x%08x (expected 0x%08x) (offset %llu)", magic,
                        IO_MAGIC, (unsigned long long)(r->off - 4));
    }
    if (!pmi_r_i32(r, &src_seq, "source seq id")) {
        return PM_E_FORMAT;
    }
    return PM_OK;
}

static pm_status check_all(const pm_memory *m, pm_seq_id s, uint32_t flags, uint32_t envelope,
                           pmi_reader *r) {
    pm_status st = check_flags(flags, envelope);
    if (st == PM_OK) {
        st = read_envelope(m, r, s, envelope);
    }
    if (st == PM_OK) {
        state_plan sp;
        st = parse_state(m, r, s, flags, &sp);
        plan_free((pm_memory *)m, &sp);
    }
    return st;
}

pm_status pm_mem_state_check(const pm_memory *m, pm_seq_id s, uint32_t flags, uint32_t envelope,
                             const uint8_t *src, uint64_t len, uint64_t *consumed) {
    PMI_CHECK_MEM(m);
    if (src == NULL && len > 0) {
        return pmi_fail(PM_E_INVALID_ARG, "src is NULL");
    }
    pmi_reader r = {src ? src : (const uint8_t *)"", len, 0};
    pm_status st = check_all(m, s, flags, envelope, &r);
    if (st == PM_OK && consumed) {
        *consumed = r.off;
    }
    return st;
}

/* Apply parsed sections: cells of every part first (in a transaction when a part can still
 * fail), then the tensor bytes, so a failure leaves no trace. */
static pm_status apply_state(pm_memory *m, state_plan *sp, pm_seq_id s) {
    bool need_tx = s != -1 || m->n_kv + (m->rec != NULL) > 1;
    pm_status st = need_tx ? pmi_mem_tx_begin(m) : PM_OK;
    if (st != PM_OK) {
        return st;
    }
    for (uint32_t p = 0; p < m->n_kv && st == PM_OK; ++p) {
        st = pmi_kv_state_meta(m->kv[p], &sp->kv[p]);
    }
    if (st == PM_OK && m->rec) {
        st = pmi_rec_state_meta(m->rec, &sp->rec);
    }
    if (need_tx) {
        pmi_mem_tx_end(m, st == PM_OK);
    }
    if (st != PM_OK) {
        return st;
    }
    for (uint32_t p = 0; p < m->n_kv; ++p) {
        pmi_kv_state_data(m->kv[p], &sp->kv[p]);
    }
    if (m->rec) {
        pmi_rec_state_data(m->rec, &sp->rec);
    }
    return PM_OK;
}

pm_status pm_mem_state_read(pm_memory *m, pm_seq_id s, uint32_t flags, uint32_t envelope,
                            const uint8_t *src, uint64_t len, bool allow_trailing, uint64_t *consumed) {
    PMI_CHECK_MEM(m);
    if (src == NULL && len > 0) {
        return pmi_fail(PM_E_INVALID_ARG, "src is NULL");
    }
    pm_status st = check_flags(flags, envelope);
    if (st == PM_OK) {
        st = check_overlap(m, src, len, "state_read", "source");
    }
    if (st != PM_OK) {
        return st;
    }
    pmi_reader r = {src ? src : (const uint8_t *)"", len, 0};
    st = read_envelope(m, &r, s, envelope);
    state_plan sp;
    if (st == PM_OK) {
        st = parse_state(m, &r, s, flags, &sp);
        if (st == PM_OK && !allow_trailing && r.off != len) {
            st = pmi_fail(PM_E_FORMAT, "%llu trailing bytes after the state (offset %llu of %llu)",
                          (unsigned long long)(len - r.off), (unsigned long long)r.off, (unsigned long long)len);
        }
        if (st == PM_OK) {
            st = apply_state(m, &sp, s);
        }
        plan_free(m, &sp);
    }
    if (st == PM_OK) {
        m->gen++;
        if (consumed) {
            *consumed = r.off;
        }
    }
    return st;
}
