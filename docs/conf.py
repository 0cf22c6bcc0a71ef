# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""Sphinx configuration of flora_optax's documentation.

Build (what ``.ci/docs`` runs, warnings are errors)::

  pip install -e ".[docs]"
  sphinx-build -W --keep-going -b html docs docs/_build/html

The generated parts (the decision tables of ``choosing.md``, the labels of
the benchmark pages) are computed at build time by ``_ext/flora_docs.py``
from the committed results, so the pages cannot go stale.
"""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, ROOT)  # flora_optax and benchmarks, from this checkout
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '_ext'))

import flora_optax  # noqa: E402

project = 'flora_optax'
author = 'The flora_optax Authors'
copyright = '2026, The flora_optax Authors'  # noqa: A001
version = release = flora_optax.__version__

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
    'myst_nb',  # Markdown pages (myst-parser) and the notebooks, not executed
    'flora_docs',
]

source_suffix = {'.md': 'myst-nb', '.ipynb': 'myst-nb'}
root_doc = 'index'
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store', '**.ipynb_checkpoints']

# Markdown.
myst_enable_extensions = ['colon_fence', 'deflist', 'dollarmath']
myst_heading_anchors = 3
# The notebooks are shown as committed (code, no outputs): executing them
# would need flax and minutes of CPU; tests/test_notebooks.py runs them.
nb_execution_mode = 'off'

# API reference.
autodoc_default_options = {
    'members': True,
    'member-order': 'bysource',
}
autodoc_typehints = 'signature'
autodoc_typehints_format = 'short'
autodoc_preserve_defaults = True
autodoc_member_order = 'bysource'
autosummary_generate = False
add_module_names = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# HTML.
html_theme = 'furo'
html_title = f'flora_optax {release}'
html_static_path = ['_static']
html_css_files = ['flora.css']
html_theme_options = {
    'sidebar_hide_name': False,
    'navigation_with_keys': True,
}

# NamedTuple fields are documented once, by the docstrings' Attributes
# sections (as :ivar: fields), not again as members.
napoleon_use_ivar = True
# The included report of the paper miniature skips a heading level (H2 to H4).
suppress_warnings = ['myst.header']

# Every cross-reference must resolve (a broken one fails the -W build), except
# those into other projects (no intersphinx: the build runs offline) and the
# type aliases of flora_optax._types, which are documented in the text.
nitpicky = True
nitpick_ignore_regex = [
    (r'py:.*', r'(jax|jaxlib|numpy|optax|collections|typing|flax)\b.*'),
    (r'py:class', r'(KeyLike|ImplLike|RankFn|Side|Projection|Transfer|'
                  r'DimensionNumbersSpec|AxisMap|Any)'),
]
