# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""Sphinx extension: the parts of the docs that are computed, not written.

Two MyST directives, both read from the committed results at build time so
that a page can never disagree with them:

``{flora-quality-table}`` *name*
  A table of the quality study, from ``benchmarks/results/quality.json``,
  made by the generators of ``python -m benchmarks.quality.readme``
  (``loss``, ``benefit``) and ``benchmarks/quality/per_byte.py``
  (``budget``), preceded by a line naming the version and machine that
  measured it.

``{flora-demo-table} train_lm``
  The demo's reference table (``examples/results/train_lm/results.json``),
  made by ``examples.train_lm.memory_table`` as the demo prints it.

``{flora-results-label}`` *stem*
  "Measured with flora_optax X (jax Y) on Z": the label of
  ``benchmarks/results/<stem>.md``, read from ``<stem>.json`` (or from a
  repository path ending in ``.json``); for files that predate a version
  field, the version of the commit that last wrote them.

A results file that cannot be read, or a name that is not known, is a build
error naming the page (``-W`` turns the warning into a failure).
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from flora_tables import (DEMO, ROOT, demo_table, quality_table,  # noqa: F401
                          results_label)

LOGGER = logging.getLogger(__name__)


class _Generated(SphinxDirective):
  required_arguments = 1
  has_content = False

  def markdown(self, arg: str) -> str:
    raise NotImplementedError

  def run(self) -> list[nodes.Node]:
    arg = self.arguments[0]
    try:
      text = self.markdown(arg)
    except Exception as e:  # noqa: BLE001 (any failure names the page)
      LOGGER.warning('%s: cannot generate %r (%s: %s)', self.env.docname,
                     arg, type(e).__name__, e, location=self.get_location())
      return []
    container = nodes.container(
        classes=['flora-generated', f'flora-{self.name}-{arg}'])
    self.state.nested_parse(StringList(text.splitlines(), self.env.docname),
                            self.content_offset, container)
    return [container]


class QualityTable(_Generated):
  """``{flora-quality-table} loss|benefit|budget``."""

  def markdown(self, arg: str) -> str:
    label = results_label('quality')
    return f'{label}\n\n{quality_table(arg)}'


class ResultsLabel(_Generated):
  """``{flora-results-label} <stem>``: a note naming version and machine."""

  def markdown(self, arg: str) -> str:
    return f':::{{note}}\n{results_label(arg)}\n:::'


class DemoTable(_Generated):
  """``{flora-demo-table} train_lm``: the demo's reference table."""

  def markdown(self, arg: str) -> str:
    if arg != 'train_lm':
      raise KeyError(arg)
    return f'{results_label(DEMO)}\n\n{demo_table()}'


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """NamedTuple fields are documented by their class's Attributes section;
  their own docstrings only say "Alias for field number N"."""
  del app, what, name, options
  doc = getattr(obj, '__doc__', None) or ''
  return True if doc.startswith('Alias for field number') else skip


def setup(app: Any) -> dict[str, Any]:
  app.connect('autodoc-skip-member', _skip_namedtuple_fields)
  app.add_directive('flora-quality-table', QualityTable)
  app.add_directive('flora-demo-table', DemoTable)
  app.add_directive('flora-results-label', ResultsLabel)
  return {'version': '1', 'parallel_read_safe': True,
          'parallel_write_safe': True}
