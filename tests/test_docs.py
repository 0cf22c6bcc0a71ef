"""The documentation site (docs/) says what the code does.

- Every ```python block of a page runs: the blocks of one page in order, in
  one fresh process sharing one namespace (as a reader pastes them). A block
  followed by "prints" and a ```text block must print exactly that text.
- Every public name of ``flora_optax.__all__`` has an entry in the API
  reference (an ``autofunction``/``autoclass``/``autoexception`` directive in
  docs/api/), and every entry names a public name.
- The generated tables of the decision page and the demo's page come out of
  the committed results (the Sphinx extension calls the same generators at
  build time), and every benchmark page's label can be made.

None of this builds the site: ``.ci/docs`` does, with warnings as errors.
"""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

import flora_optax

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DOCS = os.path.join(_ROOT, 'docs')

_FENCE = re.compile(r'^```(\S*)[^\n]*\n(.*?)^```\s*$', re.M | re.S)

# Runs the blocks given as JSON on stdin in one namespace; prints, as JSON,
# what each block wrote to stdout.
_DRIVER = r'''
import contextlib, io, json, sys, traceback
blocks = json.load(sys.stdin)
namespace = {'__name__': '__main__'}
outputs = []
for i, (line, code) in enumerate(blocks):
  buf = io.StringIO()
  try:
    with contextlib.redirect_stdout(buf):
      exec(compile(code, f'<block at line {line}>', 'exec'), namespace)
  except BaseException:
    sys.stderr.write(f'block {i} (line {line}) failed:\n')
    traceback.print_exc()
    sys.exit(1)
  outputs.append(buf.getvalue())
print(json.dumps(outputs))
'''


def _pages() -> list[str]:
  pages = glob.glob(os.path.join(_DOCS, '**', '*.md'), recursive=True)
  return sorted(os.path.relpath(p, _DOCS) for p in pages
                if '_build' not in os.path.relpath(p, _DOCS).split(os.sep))


def _read(page: str) -> str:
  with open(os.path.join(_DOCS, page), encoding='utf-8') as f:
    return f.read()


def _blocks(text: str) -> list[tuple[str, str, int, str]]:
  """(language, code, line, text before the block since the last one)."""
  out, last = [], 0
  for m in _FENCE.finditer(text):
    line = text.count('\n', 0, m.start()) + 1
    out.append((m.group(1), m.group(2), line, text[last:m.start()]))
    last = m.end()
  return out


def _python_pages() -> list[str]:
  return [p for p in _pages()
          if any(lang == 'python' for lang, *_ in _blocks(_read(p)))]


@pytest.mark.parametrize('page', _python_pages())
def test_code_blocks_of_page_run(page):
  blocks = _blocks(_read(page))
  code = [(line, src) for lang, src, line, _ in blocks if lang == 'python']
  # What each python block claims to print: a ```text block right after it,
  # introduced by "prints".
  claims, n_python = {}, 0
  for (lang, _, _, _), (next_lang, src, _, before) in zip(blocks, blocks[1:]):
    if lang == 'python':
      n_python += 1
      if next_lang == 'text' and 'prints' in before:
        claims[n_python - 1] = src
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _DRIVER],
                       input=json.dumps(code), capture_output=True,
                       text=True, timeout=600, cwd=_ROOT, env=env)
  assert out.returncode == 0, (
      f'docs/{page}: a python block failed:\n{out.stderr[-4000:]}')
  outputs = json.loads(out.stdout.strip().splitlines()[-1])
  for i, want in claims.items():
    assert outputs[i].strip() == want.strip(), (
        f'docs/{page}: the python block at line {code[i][0]} printed\n'
        f'{outputs[i]}\nbut the page says it prints\n{want}')


_ENTRY = re.compile(
    r'^\.\. auto(?:function|class|exception|data)::\s+(?:flora_optax\.)?'
    r'([A-Za-z_][A-Za-z0-9_]*)\s*$', re.M)


def _reference_entries() -> dict[str, list[str]]:
  entries = {}
  for page in _pages():
    if page.split(os.sep)[0] != 'api':
      continue
    for name in _ENTRY.findall(_read(page)):
      entries.setdefault(name, []).append(page)
  return entries


def test_every_public_name_has_a_reference_entry():
  entries = _reference_entries()
  missing = [n for n in flora_optax.__all__ if n not in entries]
  assert not missing, (
      'public names of flora_optax.__all__ without an API reference entry '
      f'(an autofunction/autoclass/autoexception in docs/api/*.md): {missing}')
  twice = {n: p for n, p in entries.items() if len(p) > 1}
  assert not twice, f'API entries documented more than once: {twice}'
  unknown = sorted(set(entries) - set(flora_optax.__all__))
  assert not unknown, (
      f'API entries for names not in flora_optax.__all__: {unknown}')


def test_generated_parts_come_from_the_committed_results():
  sys.path.insert(0, os.path.join(_DOCS, '_ext'))
  try:
    import flora_tables as flora_docs  # noqa: PLC0415 (no Sphinx needed)
  finally:
    sys.path.pop(0)
  choosing = _read('choosing.md')
  for name in ('loss', 'benefit', 'budget'):
    assert f'```{{flora-quality-table}} {name}\n' in choosing, name
    table = flora_docs.quality_table(name)
    assert table.count('\n|') >= 3, (name, table)
  label = flora_docs.results_label('quality')
  with open(os.path.join(_ROOT, 'benchmarks', 'results', 'quality.json'),
            encoding='utf-8') as f:
    meta = json.load(f)['meta']
  assert meta['flora_optax'] in label and meta['platform'] in label, label
  # The demo's reference table, as the demo prints it.
  assert '{flora-demo-table} train_lm' in _read(os.path.join('benchmarks',
                                                            'demo.md'))
  assert flora_docs.demo_table().count('\n|') >= 3
  # Every benchmark page's label can be made from its results file.
  for page in _pages():
    for stem in re.findall(r'^```\{flora-results-label\} (\S+)', _read(page),
                           re.M):
      assert 'flora_optax ' in flora_docs.results_label(stem), (page, stem)
