/* vec.h - reader of the shared test-vector files (format: tests/vectors/README.md).
 *
 *   vec_file f;
 *   char err[256];
 *   if (vec_load(path, PARAM_KEYS, EVENT_KEYS, &f, err, sizeof err) != 0) { puts(err); ... }
 *   for each f.cases[i]: vec_param(&case, "size"), then case.items in file order
 *   vec_free(&f);
 *
 * The reader checks the syntax only: `[case NAME]` headers, `key = value` lines, whole-line
 * `#` comments; keys must be in one of the two lists (parameters: at most once per case and
 * before the first event; events: repeatable, ordered).  Value helpers convert on demand.
 * No dependencies beyond the C standard library. */
#ifndef PM_VEC_H
#define PM_VEC_H

#include <stddef.h>
#include <stdint.h>

typedef struct vec_item {
    const char *key;
    const char *val;      /* trimmed, non-empty */
    int line;
    int is_event;
} vec_item;

typedef struct vec_case {
    const char *name;
    int line;
    vec_item *items;      /* parameters and events, in file order */
    size_t n_items;
} vec_case;

typedef struct vec_file {
    char *text;           /* the file, split in place */
    vec_case *cases;
    size_t n_cases;
} vec_file;

/* Read and check a file; 0 on success, -1 with a "path:line: why" message in err. */
int vec_load(const char *path, const char *const *params, const char *const *events, vec_file *out,
             char *err, size_t errcap);
void vec_free(vec_file *f);

/* The value of a parameter, or NULL. */
const char *vec_param(const vec_case *c, const char *key);

/* Integers / float32 values separated by blanks (or `sep`, e.g. ','); the count, or -1 on a
 * malformed value or more than cap values. */
int vec_ints(const char *s, char sep, int64_t *out, int cap);
/* Format a message into err (cap bytes); returns -1, for `return vec_fail(...)`. */
int vec_fail(char *err, size_t cap, const char *fmt, ...);
int vec_floats(const char *s, float *out, int cap);
/* `hex:...` bytes into a malloc'ed buffer (free it; a 1-byte buffer when empty); -1 if
 * malformed. */
int vec_hex(const char *s, uint8_t **out, size_t *n);
/* Split s in place at blanks; the token count (at most cap). */
int vec_split(char *s, char **tok, int cap);

#endif /* PM_VEC_H */
