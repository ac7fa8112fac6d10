"""Out-of-range settings are refused by name before a pretraining reads, compiles or writes
anything (issue 33, part 3/4)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_config
from lemumo_jax.training import pretrain


@pytest.mark.parametrize('key, value, message', [
    ('optim.lr', -1.0, r'config.optim.lr=-1.0 must be a number in \(0.0, inf\)'),
    ('optim.lr', 0.0, r'config.optim.lr=0.0 must be a number in \(0.0, inf\)'),
    ('optim.weight_decay', -0.1, r'config.optim.weight_decay=-0.1'),
    ('optim.b2', 1.0, r'config.optim.b2=1.0 must be a number in \[0.0, 1.0\)'),
    ('optim.warmup_fraction', 1.5, r'config.optim.warmup_fraction=1.5'),
    ('optim.final_lr_fraction', -1e-3, r'config.optim.final_lr_fraction'),
    ('optim.grad_clip', -1.0, r'config.optim.grad_clip=-1.0'),
    ('model.patch_size', 0, r'config.model.patch_size=0 must be an integer >= 1'),
    ('model.patch_size', 5, r'config.model.img_size=32 is not a multiple of'),
    ('views.num_global', 0, r'config.views.num_global=0 must be an integer >= 1'),
    ('views.num_local', -1, r'config.views.num_local=-1 must be an integer >= 0'),
    ('views.local_size', 12, r'config.views.local_size=12 is not a multiple of'),
])
def test_bad_values_are_named(key, value, message):
  config = tiny_config()
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    pretrain.check_config(config)


def test_the_default_and_tiny_configs_pass():
  pretrain.check_config(tiny_config())
  config = tiny_config()
  config.views.update(num_local=0, local_size=12)  # no local crops: their size is unused
  pretrain.check_config(config)


@pytest.mark.slow
def test_a_negative_lr_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  run = subprocess.run(
      [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py',
       f'--workdir={workdir}', '--config.optim.lr=-1.0', '--config.train.num_steps=2'],
      cwd=REPO, capture_output=True, text=True, check=False,
      env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'})
  assert run.returncode != 0
  assert 'config.optim.lr=-1.0 must be a number' in run.stderr
  assert not workdir.exists() or not any(workdir.iterdir())


def test_config_method_override_is_refused(tmp_path):
  workdir = tmp_path / 'run'
  run = subprocess.run(
      [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py',
       f'--workdir={workdir}', '--config.method=lejepa_rgb'],
      cwd=REPO, capture_output=True, text=True, check=False,
      env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'})
  assert run.returncode != 0
  assert "--config=<config file>:<row>" in run.stderr
  assert not workdir.exists()


def _main(*args):
  return subprocess.run(
      [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py', *args],
      cwd=REPO, capture_output=True, text=True, check=False,
      env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'})


@pytest.mark.parametrize('key, message', [
    ('profile.warmup', "--config.profile.warmup: the config has no key 'warmup'"),
    ('optim.lrr', "--config.optim.lrr: the config has no key 'lrr' (Did you mean \"lr\""),
    ('nosuch', "--config.nosuch: the config has no key 'nosuch'"),
])
def test_an_unknown_key_is_a_flags_error(tmp_path, key, message):
  run = _main(f'--workdir={tmp_path / "run"}', f'--config.{key}=3')
  assert run.returncode == 1
  assert f'FATAL Flags parsing error: {message}' in run.stderr
  assert 'Traceback' not in run.stderr
  assert not (tmp_path / 'run').exists()


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  path = tmp_path / 'run'
  path.write_text('notes')
  run = _main(f'--workdir={path}', '--config.train.num_steps=2')
  assert run.returncode == 1
  assert f'error: {path} is a file, not a folder' in run.stderr
  assert 'Traceback' not in run.stderr and path.read_text() == 'notes'
