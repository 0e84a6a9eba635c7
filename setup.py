"""The one compiled part of l7proxy: the C twin of the quick request-head read
(``parsers/http1/_quickscan.c``). Everything else is in pyproject.toml.

``pip install -e .`` and ``scripts/setup.sh`` (``python setup.py build_ext --inplace``)
build it next to its source. It is optional: when it does not compile, the install
goes on and ``parsers.http1.quick`` reads every head with its Python twin, which
``l7proxy status`` then names (``http1_quick=python``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "parsers.http1._quickscan",
            ["parsers/http1/_quickscan.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        ),
        Extension(
            "parsers._fastnew",
            ["parsers/_fastnew.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            optional=True,
        ),
    ]
)
