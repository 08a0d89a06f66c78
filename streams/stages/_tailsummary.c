/* The tail stage's read of a trace's spans in C: tail_core.TraceSummary's span ids, times and status
 * codes in one pass over the bytes (the `summary` function of streams.stages._tailwire; see _tailwire.c).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_wire.h"
#include "_tailwire.h"

typedef struct {
    uint8_t *ids;
    Py_ssize_t count, room;
    uint64_t first, last, codes;
} Summary;

/* One span's id, times and status code into ``s``; 0 when the decoded path should judge it. */
static int summarize_span(Summary *s, const uint8_t *at, const uint8_t *end) {
    const uint8_t *id = NULL, *b, *e;
    uint64_t number, start = 0, stop = 0, code = 0;
    int wire;
    while (at < end) {
        if (!read_field(&at, end, &number, &wire, &b, &e))
            return 0;
        if (number == 2) {
            if (wire != 2 || e - b != SPAN_ID)
                return 0;
            id = b;
        } else if (number == 7 || number == 8) {
            if (wire != 1)
                return 0;
            *(number == 7 ? &start : &stop) = le64(b);
        } else if (number == 15) { /* Status, merged as protobuf merges repeated message fields */
            if (wire != 2)
                return 0;
            while (b < e) {
                const uint8_t *cb, *ce;
                if (!read_field(&b, e, &number, &wire, &cb, &ce))
                    return 0;
                if (number == 3 && (wire != 0 || !read_varint(&cb, ce, &code)))
                    return 0;
            }
        }
    }
    if (!id || s->count >= s->room)
        return 0;
    memcpy(s->ids + s->count++ * SPAN_ID, id, SPAN_ID);
    if (start && (!s->first || start < s->first))
        s->first = start;
    if (stop > s->last)
        s->last = stop;
    int32_t status = (int32_t)(uint32_t)code; /* an enum is an int32 */
    if (status >= 0 && status < 64)
        s->codes |= 1ULL << status;
    return 1;
}

/* summary(value) -> (spans, earliest non-zero start, latest end, status code bits, span ids), or None */
PyObject *tailwire_summary(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Summary s = {NULL, 0, view.len / (SPAN_ID + 4) + 1, 0, 0, 0}; /* a span field takes >= 12 bytes */
    PyObject *ids = PyBytes_FromStringAndSize(NULL, s.room * SPAN_ID), *result = NULL;
    if (!ids)
        goto done;
    s.ids = (uint8_t *)PyBytes_AS_STRING(ids);
    const uint8_t *at = view.buf, *end = at + view.len, *rb, *re, *sb, *se, *b, *e;
    while (at < end) {
        int found = next_child(&at, end, 1, &rb, &re);
        if (found < 0)
            goto refuse;
        while (found && rb < re) {
            int scope = next_child(&rb, re, 2, &sb, &se);
            if (scope < 0)
                goto refuse;
            while (scope && sb < se) {
                int one = next_child(&sb, se, 2, &b, &e);
                if (one < 0 || (one && !summarize_span(&s, b, e)))
                    goto refuse;
            }
        }
    }
    if (_PyBytes_Resize(&ids, s.count * SPAN_ID) < 0)
        goto done;
    result = Py_BuildValue("(nKKKO)", s.count, (unsigned long long)s.first, (unsigned long long)s.last,
                           (unsigned long long)s.codes, ids);
    goto done;
refuse:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(ids);
    PyBuffer_Release(&view);
    return result;
}
