"""launch/colab.ipynb runs top to bottom (nbclient, on CPU) with its smoke setting: every stage
trains a few steps, then prompts, variations and an interpolation are drawn."""

import os

import nbclient
import nbformat

from tests import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_colab_notebook_runs_top_to_bottom(data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv('UNCLIP_NOTEBOOK_SMOKE', '1')
  monkeypatch.setenv('UNCLIP_NOTEBOOK_RUN', str(tmp_path / 'run'))
  monkeypatch.setenv('UNCLIP_DATA_DIR', data_dir)
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '3')
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0' + xla_flags.fast_compile())
  notebook = nbformat.read(os.path.join(REPO, 'launch', 'colab.ipynb'), as_version=4)
  nbformat.validate(notebook)
  assert [c.metadata.get('tags') for c in notebook.cells if c.cell_type == 'code'][0] == [
      'parameters']
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': os.path.join(REPO, 'launch')}}).execute()
  code = [c for c in notebook.cells if c.cell_type == 'code']
  errors = [o for c in code for o in c.outputs if o.output_type == 'error']
  assert not errors, errors
  text = lambda cell: ''.join(o.get('text', '') for o in cell.outputs)
  assert 'JAX' in text(code[1]) and 'CpuDevice' in text(code[1])
  assert "'shape_accuracy':" in text(code[2])     # the job's report of its generated images
  assert os.path.isfile(tmp_path / 'run' / 'report.json')
  images = lambda cell: sum('image/png' in o.get('data', {}) for o in cell.outputs)
  assert images(code[3]) == 1 and images(code[4]) == 2   # the prompts; variations, interpolation
  assert 'karlo: skipped' in text(code[5])
