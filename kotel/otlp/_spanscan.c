/* Native twin of kotel/otlp/spanwire.py: reads the identity material of every span of an OTLP/protobuf
 * ExportTraceServiceRequest and rebuilds the request with some spans dropped and scopes time-sorted.
 *
 * Why: on the dedup stage's hot path the Python/numpy version costs ~2.3 us per span on the one thread
 * that holds the GIL (loadtest/results/stages.md); this walk is one pass of C over the bytes.
 *
 * The accepted layout and every refusal are those of spanwire.py: a record answered None takes the decoded
 * path, which validates (and dead-letters what is broken). Stricter than upb in one way: group fields
 * (wire types 3 and 4, never written by OTLP encoders) also send a record to the decoded path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_wire.h"

#define MATERIAL 34 /* trace id 16, span id 8, start time 8 (little endian), then the id lengths 16, 8 */
#define START_TAG 0x39 /* field 7, fixed64 */
#define HEAD 28        /* 0a 10 <trace id> 12 08 <span id> */
#define MAX_FIELDS 16  /* fields 3-6 before the start time; past this many, the decoded path */

typedef struct {
    const uint8_t *p;   /* the whole field, tag first */
    Py_ssize_t size;    /* of the whole field */
    uint64_t start;     /* start time */
    Py_ssize_t index;   /* position in its scope, for a stable sort */
} SpanRef;

/* A span in the usual layout: its start time (and material when ``material`` is given); else 0. */
static int span_fields(const uint8_t *s, Py_ssize_t n, uint64_t *start, uint8_t *material) {
    if (n < HEAD + 9 || s[0] != 0x0A || s[1] != 0x10 || s[18] != 0x12 || s[19] != 0x08)
        return 0;
    Py_ssize_t at = HEAD;
    for (int i = 0; i < MAX_FIELDS; i++) {
        uint8_t tag = s[at];
        if (tag == START_TAG)
            break;
        int kind = tag & 7;
        uint8_t length = s[at + 1];
        if (tag < 0x18 || tag > START_TAG || kind == 3 || kind == 4 || kind == 6 || kind == 7 ||
            ((kind == 0 || kind == 2) && length >= 0x80))
            return 0;
        at += kind == 2 ? 2 + length : kind == 1 ? 9 : kind == 5 ? 5 : 2;
        if (at + 9 > n)
            return 0;
    }
    if (s[at] != START_TAG || all_zero(s + 2, 16) || all_zero(s + 20, 8))
        return 0;
    *start = le64(s + at + 1);
    if (material) {
        memcpy(material, s + 2, 16);
        memcpy(material + 16, s + 20, 8);
        memcpy(material + 24, s + at + 1, 8);
        material[32] = 16;
        material[33] = 8;
    }
    return 1;
}

/* scan(value) -> (material, spans, groups, unordered groups) or None */
static PyObject *scan(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *p = view.buf, *end = p + view.len;
    PyObject *material = PyBytes_FromStringAndSize(NULL, view.len / (HEAD + 11) * MATERIAL + MATERIAL);
    PyObject *unordered = PyList_New(0);
    PyObject *result = NULL;
    if (!material || !unordered)
        goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(material);
    Py_ssize_t spans = 0, groups = 0;
    const uint8_t *rb, *re, *sb, *se, *b, *e;
    while (p < end) { /* fields of the ExportTraceServiceRequest; 1: a ResourceSpans */
        int resource = next_child(&p, end, 1, &rb, &re);
        if (resource < 0)
            goto refuse;
        while (resource && rb < re) { /* fields of a ResourceSpans; 2: a ScopeSpans */
            int scope = next_child(&rb, re, 2, &sb, &se);
            if (scope < 0)
                goto refuse;
            if (!scope)
                continue;
            int sorted = 1;
            uint64_t last = 0;
            Py_ssize_t in_group = 0;
            while (sb < se) { /* fields of a ScopeSpans; 2: a Span */
                int span = next_child(&sb, se, 2, &b, &e);
                if (span < 0)
                    goto refuse;
                if (!span)
                    continue;
                uint64_t start;
                if (!span_fields(b, e - b, &start, out + spans * MATERIAL) || !framed(b, e))
                    goto refuse;
                if (in_group++ && start < last)
                    sorted = 0;
                last = start;
                spans++;
            }
            if (!sorted) {
                PyObject *g = PyLong_FromSsize_t(groups);
                if (!g || PyList_Append(unordered, g) < 0) {
                    Py_XDECREF(g);
                    goto done;
                }
                Py_DECREF(g);
            }
            groups++;
        }
    }
    if (_PyBytes_Resize(&material, spans * MATERIAL) < 0)
        goto done;
    result = Py_BuildValue("(OnnO)", material, spans, groups, unordered);
    goto done;
refuse:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(material);
    Py_XDECREF(unordered);
    PyBuffer_Release(&view);
    return result;
}

static int by_start(const void *a, const void *b) {
    const SpanRef *x = a, *y = b;
    if (x->start != y->start)
        return x->start < y->start ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

typedef struct {
    const uint8_t *keep;  /* a flag per span of the record */
    Py_ssize_t nkeep, span;
    const uint8_t *sort;  /* a flag per scope of the record */
    Py_ssize_t nsort, group;
    SpanRef *refs;        /* room for the spans of one scope */
} Rebuild;

/* A scope's kept spans, time-sorted when asked; -1 on an inconsistency. Sets *dropped when the scope
 * had spans and keeps none (it is then removed), else *size to its new body size. */
static int scope_spans(Rebuild *r, const uint8_t *p, const uint8_t *end, Py_ssize_t *count, Py_ssize_t *size,
                       int *dropped) {
    uint64_t number;
    int wire;
    const uint8_t *b, *e, *field;
    Py_ssize_t had = 0, kept = 0, body = 0;
    while (p < end) {
        field = p;
        if (!read_field(&p, end, &number, &wire, &b, &e))
            return -1;
        if (number != 2) {
            body += p - field;
            continue;
        }
        if (r->span >= r->nkeep)
            return -1;
        if (r->keep[r->span++]) {
            uint64_t start = 0;
            span_fields(b, e - b, &start, NULL);
            r->refs[kept] = (SpanRef){field, p - field, start, had};
            kept++;
            body += p - field;
        }
        had++;
    }
    if (r->group >= r->nsort)
        return -1;
    if (r->sort[r->group++] && kept > 1)
        qsort(r->refs, (size_t)kept, sizeof(SpanRef), by_start);
    *count = kept;
    *size = body;
    *dropped = had > 0 && kept == 0;
    return 0;
}

/* Writes a scope body: its other fields in place, its kept spans (in order) where its first span was. */
static uint8_t *write_scope(const uint8_t *p, const uint8_t *end, const SpanRef *refs, Py_ssize_t count,
                            uint8_t *o) {
    uint64_t number;
    int wire, spans_written = 0;
    const uint8_t *b, *e, *field;
    while (p < end) {
        field = p;
        read_field(&p, end, &number, &wire, &b, &e);
        if (number != 2) {
            memcpy(o, field, p - field);
            o += p - field;
        } else if (!spans_written) {
            for (Py_ssize_t i = 0; i < count; i++) {
                memcpy(o, refs[i].p, refs[i].size);
                o += refs[i].size;
            }
            spans_written = 1;
        }
    }
    return o;
}

/* One ResourceSpans rebuilt into ``o`` (its header included); returns the new end, ``o`` when dropped. */
static uint8_t *write_resource(Rebuild *r, const uint8_t *p, const uint8_t *end, uint8_t *o, int *failed) {
    uint8_t *scratch = o + 16; /* room for the resource's tag and length, moved once the size is known */
    uint8_t *w = scratch;
    uint64_t number;
    int wire, scopes = 0;
    const uint8_t *b, *e, *field;
    while (p < end) {
        field = p;
        if (!read_field(&p, end, &number, &wire, &b, &e)) {
            *failed = 1;
            return o;
        }
        if (number != 2) {
            memcpy(w, field, p - field);
            w += p - field;
            continue;
        }
        Py_ssize_t count, size;
        int dropped;
        if (scope_spans(r, b, e, &count, &size, &dropped) < 0) {
            *failed = 1;
            return o;
        }
        if (dropped)
            continue;
        *w++ = 0x12;
        w = write_varint(w, (uint64_t)size);
        w = write_scope(b, e, r->refs, count, w);
        scopes++;
    }
    if (!scopes)
        return o;
    Py_ssize_t size = w - scratch;
    *o++ = 0x0A;
    o = write_varint(o, (uint64_t)size);
    memmove(o, scratch, (size_t)size);
    return o + size;
}

/* rebuild(value, keep, sort) -> bytes or None (no span kept) */
static PyObject *rebuild(PyObject *self, PyObject *args) {
    Py_buffer value, keep, sort;
    if (!PyArg_ParseTuple(args, "y*y*y*", &value, &keep, &sort))
        return NULL;
    PyObject *result = NULL;
    Rebuild r = {keep.buf, keep.len, 0, sort.buf, sort.len, 0, NULL};
    r.refs = PyMem_Malloc(sizeof(SpanRef) * (size_t)(keep.len + 1));
    /* The output is never larger than the input; +32 for the scratch offset of a resource's header. */
    uint8_t *buffer = PyMem_Malloc((size_t)value.len + 32);
    if (!r.refs || !buffer) {
        PyErr_NoMemory();
        goto done;
    }
    const uint8_t *p = value.buf, *end = p + value.len;
    uint8_t *o = buffer;
    int failed = 0, resources = 0;
    uint64_t number;
    int wire;
    const uint8_t *b, *e, *field;
    while (p < end && !failed) {
        field = p;
        if (!read_field(&p, end, &number, &wire, &b, &e)) {
            failed = 1;
            break;
        }
        if (number != 1) {
            memcpy(o, field, p - field);
            o += p - field;
            continue;
        }
        uint8_t *next = write_resource(&r, b, e, o, &failed);
        resources += next != o;
        o = next;
    }
    if (failed || r.span != r.nkeep || r.group != r.nsort)
        PyErr_SetString(PyExc_ValueError, "rebuild: the flags do not match the record's spans and scopes");
    else if (!resources)
        result = Py_NewRef(Py_None);
    else
        result = PyBytes_FromStringAndSize((const char *)buffer, o - buffer);
done:
    PyMem_Free(r.refs);
    PyMem_Free(buffer);
    PyBuffer_Release(&value);
    PyBuffer_Release(&keep);
    PyBuffer_Release(&sort);
    return result;
}

/* Span identities, bit for bit those of streams/stages/dedup_hash.py: two 64-bit lanes (MurmurHash3's and
 * SplitMix64's finalizers) chained over the four little-endian words of each MATERIAL-byte row. */
static const uint64_t LANES[2][6] = {
    {0x9E3779B97F4A7C15ULL, 33, 0xFF51AFD7ED558CCDULL, 33, 0xC4CEB9FE1A85EC53ULL, 33},
    {0x632BE59BD9B4E019ULL, 30, 0xBF58476D1CE4E5B9ULL, 27, 0x94D049BB133111EBULL, 31},
};

/* digests(material) -> [16-byte identity per row] */
static PyObject *digests(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t count = view.len / MATERIAL;
    PyObject *list = PyList_New(count);
    for (Py_ssize_t i = 0; list && i < count; i++) {
        const uint8_t *row = (const uint8_t *)view.buf + i * MATERIAL;
        uint8_t out[16];
        for (int lane = 0; lane < 2; lane++) {
            const uint64_t *c = LANES[lane];
            uint64_t h = c[0];
            for (int k = 0; k < 4; k++) {
                h ^= le64(row + 8 * k);
                h ^= h >> c[1];
                h *= c[2];
                h ^= h >> c[3];
                h *= c[4];
                h ^= h >> c[5];
            }
            for (int b = 0; b < 8; b++)
                out[8 * lane + b] = (uint8_t)(h >> (8 * b));
        }
        PyObject *digest = PyBytes_FromStringAndSize((const char *)out, 16);
        if (!digest) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, digest);
    }
    PyBuffer_Release(&view);
    return list;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_O,
     "scan(value) -> (material, spans, scopes, unordered scope indexes), or None off the usual layout"},
    {"rebuild", rebuild, METH_VARARGS,
     "rebuild(value, keep, sort) -> the request with the kept spans, flagged scopes time-sorted; None if empty"},
    {"digests", digests, METH_O, "digests(material) -> [16-byte span identity per 34-byte row]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_spanscan", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__spanscan(void) { return PyModule_Create(&module); }
