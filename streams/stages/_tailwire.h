/* What the two compilation units of streams.stages._tailwire share. */
#ifndef KOTEL_TAILWIRE_H
#define KOTEL_TAILWIRE_H

#include <Python.h>

#define SPAN_ID 8

/* summary(value) -> (spans, earliest non-zero start, latest end, status code bits, span ids), or None */
PyObject *tailwire_summary(PyObject *self, PyObject *arg);

#endif
