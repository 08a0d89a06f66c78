/* The tail-sampling stage's wire work in C (streams/stages/tail_core.py: regroup, TraceSummary).
 *
 * Why: the stage cuts every input record into one resource entry per trace and, when deciding, reads
 * a trace's span ids, times and status codes. In Python both build a wrapper per span and re-encode
 * (about a fifth and a tenth of the worker's time, loadtest/results/tail.md); here they are one pass
 * over the bytes, copying span fields as they are.
 *
 * split(value, partitions) answers exactly what tail_core.regroup answers for the same request, or
 * None off the usual layout (fields between spans or between scopes, a span without a valid trace id),
 * where the caller takes the decoded path. summary(value) (_tailsummary.c) answers None for anything the decoded path
 * should judge (a span id not 8 bytes, a known field of another wire type). Neither validates what lies
 * inside a span's fields: the stage decodes each input record once before splitting it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_wire.h"
#include "_tailwire.h"

#define TRACE_ID 16
#define INDEX_ENTRY 25 /* tail_core._INDEX, ">16sIBI": trace id, spans, root, framed length */

typedef struct {
    const uint8_t *b, *e;
} Range;

typedef struct {
    const uint8_t *field, *tid;
    Py_ssize_t size, scope, next; /* next: the next span of its trace, -1 at the end */
    uint32_t crc;
    int root;
} Span;

typedef struct {
    Range pre, post; /* fields before the first span and after the last; none between spans */
} Scope;

typedef struct {
    const uint8_t *id;
    Py_ssize_t first, last, spans, size, resource; /* size: of the entry's body */
    long partition;
    int root;
} Trace;

typedef struct {
    Range body, pre, post;
    Py_ssize_t traces;
} Resource;

typedef struct {
    Span *spans;
    Scope *scopes;
    Trace *traces;
    Resource *resources;
    Py_ssize_t nspans, nscopes, ntraces, nresources, cspans, cscopes, ctraces, cresources;
} Parsed;

static uint32_t CRC[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        CRC[i] = c;
    }
}

/* zlib.crc32, the partitioner of tail_core.trace_partition */
static uint32_t crc32(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = CRC[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* Room for one more item in a growing array; 0 when out of memory. */
static int room(void **items, Py_ssize_t *cap, Py_ssize_t used, size_t size) {
    if (used < *cap)
        return 1;
    Py_ssize_t want = *cap ? *cap * 2 : 64;
    void *grown = PyMem_Realloc(*items, (size_t)want * size);
    if (!grown)
        return 0;
    *items = grown;
    *cap = want;
    return 1;
}

#define ROOM(p, kind) room((void **)&(p)->kind, &(p)->c##kind, (p)->n##kind, sizeof(*(p)->kind))

/* The fields of a message around its repeated field ``child``: ``pre`` before the first, ``post`` after
 * the last; calls ``each`` per child. -1: broken framing, the child of another wire type, or another
 * field between two children; -2: out of memory. */
typedef int (*ChildFn)(Parsed *, const uint8_t *field, const uint8_t *b, const uint8_t *e);

static int walk(Parsed *p, const uint8_t *at, const uint8_t *end, uint64_t child, Range *pre, Range *post,
                ChildFn each) {
    const uint8_t *start = at, *first = NULL, *last_end = NULL, *b, *e;
    uint64_t number;
    int wire;
    while (at < end) {
        const uint8_t *field = at;
        if (!read_field(&at, end, &number, &wire, &b, &e))
            return -1;
        if (number != child)
            continue;
        if (wire != 2 || (last_end != NULL && last_end != field))
            return -1;
        if (!first)
            first = field;
        last_end = at;
        int rc = each(p, field, b, e);
        if (rc < 0)
            return rc;
    }
    *pre = (Range){start, first ? first : end};
    *post = (Range){last_end ? last_end : end, end};
    return 0;
}

static int span(Parsed *p, const uint8_t *field, const uint8_t *at, const uint8_t *end) {
    const uint8_t *tid = NULL, *b, *e;
    uint64_t number;
    int wire, root = 1;
    while (at < end) {
        if (!read_field(&at, end, &number, &wire, &b, &e))
            return -1;
        if (number == 1) {
            if (wire != 2 || e - b != TRACE_ID)
                return -1;
            tid = b;
        } else if (number == 4) {
            if (wire != 2)
                return -1;
            root = e == b;
        }
    }
    if (!tid || all_zero(tid, TRACE_ID))
        return -1;
    if (!ROOM(p, spans))
        return -2;
    p->spans[p->nspans++] = (Span){field, tid, end - field, p->nscopes - 1, -1, crc32(tid, TRACE_ID), root};
    return 0;
}

static int scope(Parsed *p, const uint8_t *field, const uint8_t *b, const uint8_t *e) {
    if (!ROOM(p, scopes))
        return -2;
    Scope *s = &p->scopes[p->nscopes++];
    return walk(p, b, e, 2, &s->pre, &s->post, span);
}

/* The traces of the resource whose spans start at span ``from``, first seen first. */
static int traces_of(Parsed *p, Py_ssize_t from, long partitions) {
    Py_ssize_t count = p->nspans - from, mask = 1;
    while (mask < 2 * count)
        mask <<= 1;
    Py_ssize_t *slots = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)mask), known = p->ntraces;
    if (!slots)
        return -2;
    memset(slots, 0xFF, sizeof(Py_ssize_t) * (size_t)mask);
    mask -= 1;
    for (Py_ssize_t i = from; i < p->nspans; i++) {
        Span *s = &p->spans[i];
        Py_ssize_t h = s->crc & mask;
        while (slots[h] >= 0 && memcmp(p->traces[slots[h]].id, s->tid, TRACE_ID) != 0)
            h = (h + 1) & mask;
        if (slots[h] < 0) {
            if (!ROOM(p, traces)) {
                PyMem_Free(slots);
                return -2;
            }
            slots[h] = p->ntraces;
            p->traces[p->ntraces++] = (Trace){s->tid, i, i, 1, 0, p->nresources - 1,
                                              (long)(s->crc % (uint32_t)partitions), s->root};
        } else {
            Trace *t = &p->traces[slots[h]];
            p->spans[t->last].next = i;
            t->last = i;
            t->spans++;
            t->root |= s->root;
        }
    }
    PyMem_Free(slots);
    p->resources[p->nresources - 1].traces = p->ntraces - known;
    return 0;
}

static int resource(Parsed *p, const uint8_t *b, const uint8_t *e, long partitions) {
    if (!ROOM(p, resources))
        return -2;
    Resource *r = &p->resources[p->nresources++];
    r->body = (Range){b, e};
    Py_ssize_t from = p->nspans;
    int rc = walk(p, b, e, 2, &r->pre, &r->post, scope);
    return rc < 0 ? rc : traces_of(p, from, partitions);
}

static Py_ssize_t range_size(Range r) { return r.e - r.b; }

static uint8_t *put(uint8_t *o, Range r) {
    memcpy(o, r.b, (size_t)(r.e - r.b));
    return o + (r.e - r.b);
}

/* A trace's entry body: the resource's other fields, then per scope it has spans in: that scope with
 * only its spans. Sizes only when ``o`` is NULL. A resource of one trace is copied as it is. */
static Py_ssize_t entry(const Parsed *p, const Trace *t, uint8_t *o) {
    const Resource *r = &p->resources[t->resource];
    if (r->traces == 1)
        return o ? (put(o, r->body), range_size(r->body)) : range_size(r->body);
    Py_ssize_t size = range_size(r->pre) + range_size(r->post);
    if (o)
        o = put(o, r->pre);
    for (Py_ssize_t i = t->first; i >= 0;) {
        const Scope *s = &p->scopes[p->spans[i].scope];
        Py_ssize_t body = range_size(s->pre) + range_size(s->post), j = i;
        for (; j >= 0 && p->spans[j].scope == p->spans[i].scope; j = p->spans[j].next)
            body += p->spans[j].size;
        size += 1 + varint_size((uint64_t)body) + body;
        if (o) {
            *o++ = 0x12;
            o = write_varint(o, (uint64_t)body);
            o = put(o, s->pre);
            for (Py_ssize_t k = i; k != j; k = p->spans[k].next)
                o = put(o, (Range){p->spans[k].field, p->spans[k].field + p->spans[k].size});
            o = put(o, s->post);
        }
        i = j;
    }
    if (o)
        put(o, r->post);
    return size;
}

static void pack_index(uint8_t *o, const Trace *t, Py_ssize_t framed) {
    memcpy(o, t->id, TRACE_ID);
    for (int k = 0; k < 4; k++) {
        o[TRACE_ID + k] = (uint8_t)((uint64_t)t->spans >> (24 - 8 * k));
        o[TRACE_ID + 5 + k] = (uint8_t)((uint64_t)framed >> (24 - 8 * k));
    }
    o[TRACE_ID + 4] = (uint8_t)t->root;
}

/* Per partition: its bundle and index, sized first, then filled trace by trace. */
static PyObject *bundles(Parsed *p, long partitions) {
    Py_ssize_t *bytes = PyMem_Calloc((size_t)partitions, sizeof(Py_ssize_t));
    Py_ssize_t *entries = PyMem_Calloc((size_t)partitions, sizeof(Py_ssize_t));
    PyObject **bundle = PyMem_Calloc((size_t)partitions, sizeof(PyObject *));
    PyObject **index = PyMem_Calloc((size_t)partitions, sizeof(PyObject *));
    PyObject *out = PyDict_New(), *result = NULL;
    Py_ssize_t total = 0;
    if (!bytes || !entries || !bundle || !index || !out) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < p->ntraces; i++) {
        Trace *t = &p->traces[i];
        t->size = entry(p, t, NULL);
        bytes[t->partition] += 1 + varint_size((uint64_t)t->size) + t->size;
        entries[t->partition]++;
        total += t->spans;
        if (t->spans > 0xFFFFFFFF || t->size > 0xFFFFFFF0) {
            result = Py_NewRef(Py_None); /* the index cannot say it: the decoded path */
            goto done;
        }
    }
    for (long q = 0; q < partitions; q++) {
        if (!entries[q])
            continue;
        bundle[q] = PyBytes_FromStringAndSize(NULL, bytes[q]);
        index[q] = PyBytes_FromStringAndSize(NULL, entries[q] * INDEX_ENTRY);
        if (!bundle[q] || !index[q])
            goto done;
        bytes[q] = entries[q] = 0; /* from here: write positions */
    }
    for (Py_ssize_t i = 0; i < p->ntraces; i++) {
        const Trace *t = &p->traces[i];
        long q = t->partition;
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(bundle[q]) + bytes[q], *start = o;
        *o++ = 0x0A;
        o = write_varint(o, (uint64_t)t->size);
        entry(p, t, o);
        o += t->size;
        bytes[q] += o - start;
        pack_index((uint8_t *)PyBytes_AS_STRING(index[q]) + entries[q]++ * INDEX_ENTRY, t, o - start);
        if (entries[q] == 1) { /* first seen: the dict keeps the order regroup's dict has */
            PyObject *key = PyLong_FromLong(q), *pair = Py_BuildValue("(OO)", bundle[q], index[q]);
            int failed = !key || !pair || PyDict_SetItem(out, key, pair) < 0;
            Py_XDECREF(key);
            Py_XDECREF(pair);
            if (failed)
                goto done;
        }
    }
    result = Py_BuildValue("(On)", out, total);
done:
    for (long q = 0; bundle && index && q < partitions; q++) {
        Py_XDECREF(bundle[q]);
        Py_XDECREF(index[q]);
    }
    Py_XDECREF(out);
    PyMem_Free(bytes);
    PyMem_Free(entries);
    PyMem_Free(bundle);
    PyMem_Free(index);
    return result;
}

/* split(value, partitions) -> ({partition: (bundle, index)}, spans), or None off the usual layout */
static PyObject *split(PyObject *self, PyObject *args) {
    Py_buffer view;
    long partitions;
    if (!PyArg_ParseTuple(args, "y*l", &view, &partitions))
        return NULL;
    PyObject *result = NULL;
    Parsed p = {0};
    if (partitions < 1 || partitions > 1 << 20) {
        PyErr_SetString(PyExc_ValueError, "split: partitions must be 1 to 1048576");
        goto done;
    }
    const uint8_t *at = view.buf, *end = at + view.len, *b, *e;
    uint64_t number;
    int wire, rc = 0;
    while (at < end && rc == 0) { /* fields of the request; 1: a ResourceSpans */
        if (!read_field(&at, end, &number, &wire, &b, &e))
            rc = -1;
        else if (number == 1)
            rc = wire == 2 ? resource(&p, b, e, partitions) : -1;
    }
    if (rc == -2)
        PyErr_NoMemory();
    else if (rc == -1)
        result = Py_NewRef(Py_None);
    else
        result = bundles(&p, partitions);
done:
    PyMem_Free(p.spans);
    PyMem_Free(p.scopes);
    PyMem_Free(p.traces);
    PyMem_Free(p.resources);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"split", split, METH_VARARGS,
     "split(value, partitions) -> ({partition: (bundle, index)}, spans) as tail_core.regroup, or None"},
    {"summary", tailwire_summary, METH_O,
     "summary(value) -> (spans, first start, last end, status code bits, span ids), or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_tailwire", .m_size = -1,
                                    .m_methods = methods};

PyMODINIT_FUNC PyInit__tailwire(void) {
    crc_init();
    return PyModule_Create(&module);
}
