"""The notebooks in notebooks/: Colab-ready, honest about where they install
from, and executed on CPU at a small size (FLORA_SMOKE=1).

The notebooks assert their own claims (e.g. the LoRA == compressed-momentum
equivalence), so a notebook that runs but computes the wrong thing fails here.
"""

import ast
import glob
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

import flora_optax

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOTEBOOKS = sorted(glob.glob(os.path.join(_ROOT, 'notebooks', '*.ipynb')))
# The install cell's marked variable and its default (a wheel built with the
# README's command and uploaded to the Colab session).
_SOURCE_VARIABLE = 'FLORA_OPTAX_SOURCE'
_DEFAULT_SOURCE = 'flora_optax-*-py3-none-any.whl'
# The only sites the notebooks may link to: ones that exist independently of
# this project (no repository or package page that we cannot show exists).
_ALLOWED_HOSTS = {'arxiv.org'}


def _pyproject() -> dict:
  with open(os.path.join(_ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)


def _install_cell(nb) -> str:
  return nb.cells[1].source


def _requirement_name(req: str) -> str:
  return re.split(r'[\s\[<>=!~;]', req, maxsplit=1)[0].lower().replace('_', '-')


def test_notebooks_exist_and_are_colab_ready():
  names = {os.path.basename(p) for p in _NOTEBOOKS}
  assert {'quickstart.ipynb', 'lora_is_a_gradient_compressor.ipynb',
          'accumulation.ipynb'} <= names
  for path in _NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == 'markdown'
    assert 'On Colab' in first.source and 'wheel' in first.source, path
    # No link to a repository, Colab-from-GitHub badge or package index that
    # nothing in the project shows to exist.
    text = '\n'.join(c.source for c in nb.cells)
    hosts = {h.lower() for h in re.findall(r'https?://([^/\s)\]\'"]+)', text)}
    assert hosts <= _ALLOWED_HOSTS, (path, hosts - _ALLOWED_HOSTS)
    assert 'git+' not in text and 'github' not in text.lower(), path
    code = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
    assert 'jax.devices()' in code and 'make_mesh' in code
    # Committed without outputs: small diffs, no stale results.
    assert all(not c.get('outputs') for c in nb.cells
               if c.cell_type == 'code'), path


def test_committed_notebooks_are_what_the_builder_writes():
  spec = importlib.util.spec_from_file_location(
      '_build_notebooks', os.path.join(_ROOT, 'notebooks',
                                       '_build_notebooks.py'))
  builder = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(builder)
  built = {'quickstart': builder.quickstart,
           'lora_is_a_gradient_compressor': builder.lora,
           'accumulation': builder.accumulation}
  assert set(built) == {os.path.basename(p)[:-6] for p in _NOTEBOOKS}
  for path in _NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    cells = built[os.path.basename(path)[:-6]]()
    assert [(c.cell_type, c.source) for c in nb.cells] == [
        (c.cell_type, c.source) for c in cells], (
            f'{path} is stale: run python notebooks/_build_notebooks.py')


def test_install_cell_has_one_marked_source_and_installs_only_the_extra():
  for path in _NOTEBOOKS:
    install = _install_cell(nbformat.read(path, as_version=4))
    tree = ast.parse(install)
    # The first statement is the marked variable, with the wheel as default.
    first = tree.body[0]
    assert isinstance(first, ast.Assign), path
    assert [t.id for t in first.targets] == [_SOURCE_VARIABLE], path
    assert first.value.value == _DEFAULT_SOURCE, path
    assert install.splitlines()[0].startswith('# ===== Where to install')
    assigned = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and any(
        getattr(t, 'id', None) == _SOURCE_VARIABLE for t in n.targets)]
    assert len(assigned) == 1, path
    # It says how to make the wheel (the README's command) and that PyPI
    # does not have it yet.
    assert 'pip wheel --no-deps -w dist .' in install, path
    assert 'not on PyPI yet' in install, path
    # One pip call, with the runtime extra only: no test tooling, no
    # ipykernel (Colab pins its own), no --upgrade of what is there.
    assert install.count("run_line_magic('pip'") == 1, path
    assert '[notebooks]' in install, path
    for word in ('ipykernel', 'nbmake', '--upgrade', ' -U ', '[test]'):
      code_only = '\n'.join(l.split('#')[0] for l in install.splitlines())
      assert word not in code_only, (path, word)


def _run_install_cell(source: str, cwd, monkeypatch) -> list:
  """Executes an install cell as if flora_optax were missing; returns the
  line magics it ran (pip does not run: get_ipython is a recorder)."""
  calls = []

  class Shell:
    def run_line_magic(self, name, line):
      calls.append((name, line))

  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
      importlib.util, 'find_spec',
      lambda name, *a: None if name == 'flora_optax' else real_find_spec(
          name, *a))
  monkeypatch.chdir(cwd)
  exec(compile(source, 'install_cell', 'exec'),  # pylint: disable=exec-used
       {'get_ipython': Shell})
  return calls


def test_install_cell_installs_the_uploaded_wheel(tmp_path, monkeypatch):
  nb = nbformat.read(_NOTEBOOKS[0], as_version=4)
  install = _install_cell(nb)
  # No wheel uploaded: a clear error naming the variable, before any pip.
  with pytest.raises(FileNotFoundError, match=_SOURCE_VARIABLE):
    _run_install_cell(install, tmp_path, monkeypatch)
  # The wheel the README's command makes (any version): installed with the
  # runtime extra, by absolute path; of two uploads the newer one.
  old = tmp_path / 'flora_optax-0.1.0-py3-none-any.whl'
  new = tmp_path / 'flora_optax-9.9.9-py3-none-any.whl'
  old.write_bytes(b'')
  new.write_bytes(b'')
  os.utime(old, (1, 1))
  calls = _run_install_cell(install, tmp_path, monkeypatch)
  assert calls == [('pip', f'install -q "{new}[notebooks]"')]
  # Any other source given in the variable: used as given.
  edited = install.replace(repr(_DEFAULT_SOURCE), repr('flora-optax'), 1)
  calls = _run_install_cell(edited, tmp_path, monkeypatch)
  assert calls == [('pip', 'install -q "flora-optax[notebooks]"')]


def test_readme_wheel_installs_with_the_extra_and_upgrades_nothing(tmp_path):
  """The README's wheel command makes a file the install cell's default
  matches, and pip installs it with `[notebooks]` without touching anything
  already installed (here: the test environment, at or above the floors)."""
  out = subprocess.run(
      [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w',
       str(tmp_path), _ROOT], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  wheels = glob.glob(str(tmp_path / _DEFAULT_SOURCE))
  # The checkout's version (an editable install's metadata may be older).
  version = flora_optax.__version__
  assert [os.path.basename(w) for w in wheels] == [
      f'flora_optax-{version}-py3-none-any.whl']
  # What the install cell runs, offline and as a dry run: every requirement
  # of the extra must already be satisfied, so pip would install at most
  # flora-optax itself.
  report = tmp_path / 'report.json'
  out = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--dry-run', '--no-index',
       '-q', '--report', str(report), f'{wheels[0]}[notebooks]'],
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(report, encoding='utf-8') as f:
    installs = {i['metadata']['name'] for i in json.load(f)['install']}
  assert installs <= {'flora-optax', 'flora_optax'}, installs


def test_notebooks_extra_is_exactly_what_the_notebooks_import():
  """`[notebooks]` holds the notebooks' third-party imports beyond the
  runtime's, and nothing else (no test tooling on Colab)."""
  project = _pyproject()['project']
  core = {_requirement_name(r) for r in project['dependencies']}
  extra = {_requirement_name(r)
           for r in project['optional-dependencies']['notebooks']}
  distributions = importlib.metadata.packages_distributions()
  imported = set()
  for path in _NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
      if cell.cell_type != 'code':
        continue
      for node in ast.walk(ast.parse(cell.source)):
        if isinstance(node, ast.Import):
          imported |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          imported.add(node.module.split('.')[0])
  third_party = set()
  for module in imported - set(sys.stdlib_module_names) - {'flora_optax'}:
    dists = distributions.get(module)
    assert dists, f'{module} is imported by a notebook but not installed'
    third_party |= {d.lower().replace('_', '-') for d in dists}
  assert third_party - core == extra, (third_party - core, extra)
  for tooling in ('nbmake', 'ipykernel', 'pytest'):
    assert tooling not in extra
    assert any(_requirement_name(r) == tooling
               for r in project['optional-dependencies']['test'])


@pytest.mark.parametrize('path', _NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, monkeypatch):
  monkeypatch.setenv('FLORA_SMOKE', '1')
  # The kernel is a fresh process: one CPU device, quiet XLA.
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name='python3',
      resources={'metadata': {'path': os.path.dirname(path)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == 'code'
            for o in c.get('outputs', []) if o.get('output_type') == 'error']
  assert not errors, json.dumps(errors)[:2000]
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.get('outputs', []))
  assert 'running on CPU' in text
