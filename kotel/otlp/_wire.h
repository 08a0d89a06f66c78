/* Protobuf wire-format helpers shared by the native readers (kotel/otlp/_spanscan.c and
 * streams/stages/_tailwire.c). Header-only: each extension is one translation unit. */
#ifndef KOTEL_WIRE_H
#define KOTEL_WIRE_H

#include <Python.h>
#include <stdint.h>

static inline int read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out) {
    const uint8_t *p = *pp;
    uint64_t value = 0;
    for (int shift = 0; shift < 64 && p < end; shift += 7) {
        uint8_t b = *p++;
        value |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *pp = p;
            *out = value;
            return 1;
        }
    }
    return 0;
}

/* One field at *pp: its number, wire type and payload [*body, *body_end); *pp moves past it. */
static inline int read_field(const uint8_t **pp, const uint8_t *end, uint64_t *number, int *wire,
                      const uint8_t **body, const uint8_t **body_end) {
    uint64_t tag, n;
    const uint8_t *p = *pp;
    if (!read_varint(&p, end, &tag) || (tag >> 3) == 0 || (tag >> 3) > 0x1FFFFFFF)
        return 0;
    *number = tag >> 3;
    *wire = (int)(tag & 7);
    *body = p;
    switch (*wire) {
    case 0:
        if (!read_varint(&p, end, &n))
            return 0;
        break;
    case 1:
        if (end - p < 8)
            return 0;
        p += 8;
        break;
    case 5:
        if (end - p < 4)
            return 0;
        p += 4;
        break;
    case 2:
        if (!read_varint(&p, end, &n) || n > (uint64_t)(end - p))
            return 0;
        *body = p;
        p += n;
        break;
    default:
        return 0;
    }
    *body_end = p;
    *pp = p;
    return 1;
}

/* The next field of a message: 1 with its payload in [*b, *e) when it is field ``want`` and
 * length-delimited, 0 for another field (skipped), -1 for broken framing or ``want`` of another type. */
static inline int next_child(const uint8_t **pp, const uint8_t *end, uint64_t want, const uint8_t **b,
                      const uint8_t **e) {
    uint64_t number;
    int wire;
    if (!read_field(pp, end, &number, &wire, b, e))
        return -1;
    if (number != want)
        return 0;
    return wire == 2 ? 1 : -1;
}

/* Framing of every field of a message (no nesting): tags, varints and lengths within bounds. */
static inline int framed(const uint8_t *p, const uint8_t *end) {
    uint64_t number;
    int wire;
    const uint8_t *body, *body_end;
    while (p < end)
        if (!read_field(&p, end, &number, &wire, &body, &body_end))
            return 0;
    return 1;
}

static inline uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static inline int all_zero(const uint8_t *p, int n) {
    for (int i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static inline uint8_t *write_varint(uint8_t *o, uint64_t n) {
    while (n >= 0x80) {
        *o++ = (uint8_t)(n | 0x80);
        n >>= 7;
    }
    *o++ = (uint8_t)n;
    return o;
}

static inline int varint_size(uint64_t n) {
    int size = 1;
    while (n >= 0x80) {
        n >>= 7;
        size++;
    }
    return size;
}

#endif
