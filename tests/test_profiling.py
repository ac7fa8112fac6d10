"""Compute profiling (mode=profile, paper Table 6) and benchmarks/step.py on the tiny config."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from lemumo_jax import profiling
from lemumo_jax.models import encoders
from lemumo_jax.training import state as state_lib
from tests.conftest import REPO, TINY_FLAGS, tiny_config


@pytest.mark.parametrize('kind,tflops', [
    ('NVIDIA H100 80GB HBM3', 989.0), ('NVIDIA H100 PCIe', 756.0), ('NVIDIA H100 NVL', 835.0),
    ('NVIDIA H200', 989.0), ('cpu', None)])
def test_peak_tflops_by_device_kind(kind, tflops):
  assert profiling.peak_tflops(kind) == tflops


def _encoder_flops(row: str, batch: int = 8) -> float:
  config = tiny_config(row)
  encoder = encoders.build_encoder(config.model)
  size = config.views.global_size
  params = jax.eval_shape(lambda: encoder.init(
      jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32),
      np.zeros((1, size, size, 1), np.float32), train=False))['params']
  return profiling.encoder_forward_flops(config, params, state_lib.make_mesh(), batch)


def test_encoder_flops_follow_the_routing():
  """Structured pruned fusion costs about an RGB ViT; persistent fusion ~3x (3n+1 tokens in
  every layer); the dense masked layer 0 sits between."""
  flops = {row: _encoder_flops(row) for row in
           ('lejepa_rgb', 'lemumo', 'lemumo_masked', 'ft_persistent')}
  assert all(v > 0 for v in flops.values())
  rgb = flops['lejepa_rgb']
  assert 1.0 < flops['lemumo'] / rgb < 1.25
  assert flops['lemumo'] < flops['lemumo_masked'] < flops['ft_persistent']
  assert flops['ft_persistent'] / rgb > 2.5

  # A multiply-add counts 2: XLA's count is the matmul FLOPs of the ViT (24 D^2 per token and
  # layer, 4 T D per token for attention, the patch stem) plus elementwise work.
  config = tiny_config('lejepa_rgb')
  width, depth, patch = config.model.width, config.model.depth, config.model.patch_size

  def vit(size, views):
    n = (size // patch) ** 2
    tokens = n + 1
    stem = 2 * n * patch**2 * 3 * width
    per_image = depth * (24 * width**2 * tokens + 4 * tokens**2 * width) + stem
    return 8 * views * per_image

  analytic = (vit(config.views.global_size, config.views.num_global)
              + vit(config.views.local_size, config.views.num_local))
  assert analytic < rgb < 1.5 * analytic


def test_schedule_needs_a_length():
  config = tiny_config()
  config.data.update(name='tfds', data_dir='')
  config.train.num_steps = 0
  with pytest.raises(ValueError, match='config.profile.num_records'):
    profiling.schedule_steps(config)
  config.profile.num_records = 100
  assert profiling.schedule_steps(config) == config.train.num_epochs * (100 // 8)


def test_profile_mode_writes_profile_json(python_env, tmp_path):
  flags = [f for f in TINY_FLAGS if not f.startswith('--config.mode=')]
  result = subprocess.run(
      [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py:ft_persistent',
       f'--workdir={tmp_path}', *flags, '--config.mode=profile',
       '--config.profile.warmup_steps=1', '--config.profile.timed_steps=2'],
      cwd=REPO, env=python_env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| Method | Time (min) | SSL FLOPs (PFLOPs) | VRAM (GB) |' in result.stdout
  profile = json.loads((tmp_path / 'profile.json').read_text())
  assert profile['method'] == 'ft_persistent' and profile['batch_size'] == 8
  assert profile['total_steps'] == 4 * (32 // 8)  # synthetic: 4 epochs of 32 records
  assert len(profile['step_times_s']) == 2 and profile['step_ms'] > 0
  # The step runs the encoder forward and backward (~3x the forward) plus the rest.
  assert profile['step_flops'] > 2 * profile['encoder_forward_flops'] > 0
  np.testing.assert_allclose(profile['ssl_pflops_total'],
                             profile['step_flops'] * profile['total_steps'] / 1e15)
  np.testing.assert_allclose(profile['time_min'],
                             profile['step_ms'] / 1e3 * profile['total_steps'] / 60)
  assert profile['xla_memory_bytes'] > 0
  if jax.default_backend() == 'cpu':
    assert profile['peak_bytes'] is None and '| n/a |' in result.stdout
  assert not (tmp_path / 'checkpoints').exists()  # profiling trains nothing


def test_benchmark_step_table(python_env, tmp_path):
  out = tmp_path / 'rows.json'
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.step', '--config=configs/synthetic.py',
       '--rows=lejepa_rgb,lemumo', '--noisolate', '--steps=2', '--warmup=1', '--batch_size=8',
       '--config.model.width=32', '--config.model.depth=2', '--config.model.num_heads=2',
       '--config.views.global_size=32', '--config.views.local_size=16',
       '--config.views.num_local=2', f'--json_out={out}'],
      cwd=REPO, env=python_env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| row | step ms | samples/s | TFLOP/s | MFU |' in result.stdout
  rows = {r['row']: r for r in json.loads(out.read_text())}
  assert rows['lejepa_rgb']['step_flops'] > 0 and rows['lemumo']['step_ms'] > 0
  assert rows['lemumo']['step_flops'] > rows['lejepa_rgb']['step_flops']
  if jax.default_backend() == 'cpu':
    assert rows['lemumo']['mfu'] is None  # no known peak for a CPU


def test_benchmark_rejects_unknown_row(python_env):
  result = subprocess.run([sys.executable, '-m', 'benchmarks.step', '--rows=lemumo,nope'],
                          cwd=REPO, env=python_env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "unknown rows ['nope']" in result.stderr


def test_a_row_is_not_profiled_into_another_rows_workdir(tmp_path):
  config = tiny_config()  # the default row, lemumo
  profiling.check_workdir_row(config, str(tmp_path))  # an empty workdir: fine
  (tmp_path / 'profile.json').write_text(json.dumps({'method': config.method}))
  profiling.check_workdir_row(config, str(tmp_path))  # its own profile: redone
  for name in ('config.json', 'profile.json'):
    (tmp_path / name).write_text(json.dumps({'method': 'lejepa_rgb'}))
    with pytest.raises(ValueError, match=f"{tmp_path / name} is of row 'lejepa_rgb', not of "
                                         f"this run's '{config.method}'"):
      profiling.check_workdir_row(config, str(tmp_path))
    (tmp_path / name).unlink()
