"""Build of the one compiled part: tierstore/io/_hostcopy.c (metadata lives in pyproject.toml).

The extension is optional: where it does not compile (no C compiler, a platform it does not
know), the install goes on and tierstore.io.hostcopy falls back to torch's copy_
(``tierstore.io.hostcopy.available()`` says which one runs).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("tierstore.io._hostcopy", ["tierstore/io/_hostcopy.c"],
                             extra_compile_args=["-O2"], optional=True)])
