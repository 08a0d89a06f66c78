"""The one native part: kotel/otlp/_spanscan.c (metadata lives in pyproject.toml).

Optional: without a C compiler the install goes on and kotel.otlp.spanwire reads spans in Python/numpy
(slower); tests/unit/test_spanscan.py fails then, so CI notices.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kotel.otlp._spanscan", ["kotel/otlp/_spanscan.c"], optional=True,
                             extra_compile_args=["-O2"])])
