"""Executes every notebook in notebooks/ on CPU at a small size (FLORA_SMOKE=1).

The notebooks assert their own claims (e.g. the LoRA == compressed-momentum
equivalence), so a notebook that runs but computes the wrong thing fails here.
"""

import glob
import json
import os

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOTEBOOKS = sorted(glob.glob(os.path.join(_ROOT, 'notebooks', '*.ipynb')))


def test_notebooks_exist_and_are_colab_ready():
  names = {os.path.basename(p) for p in _NOTEBOOKS}
  assert {'quickstart.ipynb', 'lora_is_a_gradient_compressor.ipynb',
          'accumulation.ipynb'} <= names
  for path in _NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == 'markdown'
    assert 'colab.research.google.com/github/' in first.source
    assert os.path.basename(path) in first.source  # the badge opens itself
    code = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
    assert "'pip', 'install" in code  # installs itself where missing
    assert 'jax.devices()' in code and 'make_mesh' in code
    # Committed without outputs: small diffs, no stale results.
    assert all(not c.get('outputs') for c in nb.cells
               if c.cell_type == 'code'), path


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
