"""The native parts (metadata lives in pyproject.toml): the dedup stage's span reader
kotel/otlp/_spanscan.c and the tail stage's trace splitter streams/stages/_tailwire.c (with
_tailsummary.c).

Optional: without a C compiler the install goes on and both stages take their Python paths (slower);
tests/unit/test_spanscan.py and test_tailwire.py fail then, so CI notices.
"""

from setuptools import Extension, setup

WIRE = "kotel/otlp/_wire.h"
setup(ext_modules=[
    Extension("kotel.otlp._spanscan", ["kotel/otlp/_spanscan.c"], depends=[WIRE], optional=True,
              extra_compile_args=["-O2"]),
    Extension("streams.stages._tailwire", ["streams/stages/_tailwire.c", "streams/stages/_tailsummary.c"],
              depends=[WIRE, "streams/stages/_tailwire.h"],
              include_dirs=["kotel/otlp"], optional=True, extra_compile_args=["-O2"]),
])
