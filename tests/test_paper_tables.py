"""benchmarks/paper_tables.py: rows x seeds through lemumo_jax.main, then the paper-layout table."""

import json
import subprocess
import sys

import pytest

from benchmarks import paper_tables
from conftest import REPO, TINY_FLAGS, TINY_PROBE_FLAGS


def test_markdown_mean_std_best_and_compute_columns():
  def row(method, data, xy, mae, compute):
    return {'row': method, 'method': method, 'training_data': data, 'seeds': ['0', '1'],
            'metrics': {'mAP XY ↑': {'mean': xy, 'std': 0.5},
                        'Depth MAE ↓': {'mean': mae, 'std': 0.01}}, 'compute': compute}
  compute = {'Time (min)': 1.5, 'SSL PFLOPs': 0.0123, 'Memory (GB)': 0.3,
             'memory_is_xla_estimate': True}
  text = paper_tables.markdown({'seeds': ['0', '1'], 'rows': [
      row('lejepa_rgb', 'RGB', 19.3, 4.704, compute),
      row('lemumo', 'RGB+Depth', 23.6, 2.86, compute),
      row('lejepa_rgb encoder frozen', 'RGB', 13.8, 6.734, {})]})
  lines = text.splitlines()
  assert lines[0] == ('| Method | Training Data | mAP XY ↑ | Depth MAE ↓ | Time (min) | SSL PFLOPs '
                      '| Memory (GB) |')
  assert lines[2] == ('| lejepa_rgb | RGB | <u>19.3 ± 0.5</u> | <u>4.704 ± 0.010</u> | 1.50 | '
                      '0.0123 | 0.300* |')
  assert lines[3] == '| lemumo | RGB+Depth | **23.6 ± 0.5** | **2.860 ± 0.010** | 1.50 | 0.0123 | 0.300* |'
  assert lines[4] == '| lejepa_rgb encoder frozen | RGB | 13.8 ± 0.5 | 6.734 ± 0.010 | — | — | — |'
  assert 'Mean ± std over seeds 0, 1.' in text and "XLA's static estimate" in text


@pytest.mark.slow
def test_rows_pretrain_probe_profile_and_table(python_env, tmp_path):
  """Two rows and one encoder-frozen control at the tiny size: every run's report, the
  compute profile, the table; a rerun skips finished runs."""
  cmd = [sys.executable, '-m', 'benchmarks.paper_tables', '--rows=lejepa_rgb,lemumo,lemumo:frozen',
         '--seeds=0', f'--out_dir={tmp_path}', '--', *TINY_FLAGS, *TINY_PROBE_FLAGS,
         '--config.profile.warmup_steps=1', '--config.profile.timed_steps=2']
  proc = subprocess.run(cmd, cwd=REPO, env=python_env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((tmp_path / 'tables.json').read_text())
  assert [r['method'] for r in result['rows']] == ['lejepa_rgb', 'lemumo',
                                                   'lemumo encoder frozen']
  assert [r['training_data'] for r in result['rows']] == ['RGB', 'RGB+Depth', 'RGB+Depth']
  rgb, fused, frozen = result['rows']
  assert {'mAP XY ↑', 'Depth MAE ↓', 'mAP XZ ↑', 'Seg. mIoU ↑'} <= set(rgb['metrics'])
  assert 0 < fused['metrics']['Depth MAE ↓']['mean'] < 80
  assert fused['compute']['SSL PFLOPs'] > rgb['compute']['SSL PFLOPs'] > 0
  assert frozen['compute'] == {}
  table = (tmp_path / 'tables.md').read_text()
  assert table.startswith('| Method | Training Data | mAP XY ↑ | Depth MAE ↓ | mAP XZ ↑ | '
                          'Seg. mIoU ↑ | Time (min) | SSL PFLOPs | Memory (GB) |')
  again = subprocess.run(cmd, cwd=REPO, env=python_env, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0 and again.stdout.count('done earlier') == 3


def test_unknown_row_fails_with_the_row_named(python_env, tmp_path):
  cmd = [sys.executable, '-m', 'benchmarks.paper_tables', '--rows=no_such_row', '--seeds=0',
         f'--out_dir={tmp_path}', '--', *TINY_FLAGS]
  proc = subprocess.run(cmd, cwd=REPO, env=python_env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  assert 'no_such_row' in proc.stdout + proc.stderr
