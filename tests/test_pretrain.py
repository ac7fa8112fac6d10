"""The pretraining loop end to end: configs, checkpoints and resume, NaN stop, multi-device."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import synthetic, waymo
from tests.conftest import REPO, TINY_FLAGS, killed_and_unbroken, tiny_config, xla_flags
from lemumo_jax import modes
from lemumo_jax.training import pretrain
from lemumo_jax.training import state as state_lib


def test_paper_defaults_in_waymo_config():
  c = waymo.get_config()
  assert c.method == 'lemumo'
  assert (c.model.width, c.model.depth, c.model.num_heads, c.model.patch_size) == (384, 12, 6, 16)
  assert c.train.batch_size == 64 and c.train.num_epochs == 5
  assert (c.views.num_global, c.views.global_size, c.views.num_local, c.views.local_size) == (
      2, 224, 8, 96)
  assert c.projector.out_dim == 16 and c.optim.lr == 1e-4 and c.objective.lam == 0.1


@pytest.mark.parametrize('row,family,mode', [
    ('lemumo', 'fusion', 'pruned'), ('ft_persistent', 'fusion', 'persistent'),
    ('lejepa_rgb', 'vit', None), ('lidar_only', 'vit', None),
    ('lemumo_vicreg', 'fusion', 'pruned'), ('lemumo_3pass', 'fusion', 'pruned'),
    ('early_fusion', 'early_fusion', None), ('late_fusion', 'late_fusion', None),
    ('imagebind', 'dual', None), ('dinov3', 'vit', None), ('multimae_ss', 'multimae', None),
    ('multimae_mt', 'multimae', None)])
def test_method_rows(row, family, mode):
  for module in (synthetic, waymo):
    c = module.get_config(row)
    assert c.method == row and c.model.family == family
    if mode:
      assert c.model.fusion_mode == mode
  assert synthetic.get_config('lidar_only').model.inputs == 'companion'


def test_unknown_row_is_a_clear_error():
  with pytest.raises(ValueError, match='unknown method row .*lemumo'):
    synthetic.get_config('not_a_row')


def test_command_line_overrides_and_unknown_key(python_env, tmp_path):
  cmd = [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py',
         f'--workdir={tmp_path}', '--config.train.no_such_key=3']
  result = subprocess.run(cmd, cwd=REPO, env=python_env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0
  assert 'no_such_key' in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_a_tuple_override_given_twice_is_refused():
  """ml_collections appends a tuple override given twice (two --config.probe.heads train the
  union); main refuses that, and still lets a repeated scalar take its last value."""
  config = synthetic.get_config('lemumo')
  argv = ["--config.probe.heads=('seg',)", '--config.mode=pretrain', '--config.seed=1',
          "--config.probe.heads=('depth',)", '--config.mode=probe', '--config.data.image_size',
          '--config.data.image_size=(4, 4)', '--config.no_such.key=1', '--config.no_such.key=2']
  assert modes.repeated_tuple_overrides(argv, config) == ['data.image_size', 'probe.heads']
  assert modes.repeated_tuple_overrides(argv[1:3], config) == []


def test_train_runs_checkpoints_and_exports(tmp_path):
  config = tiny_config(num_steps=4)
  summary = pretrain.train(config, str(tmp_path))
  assert summary['final_step'] == 4 and summary['start_step'] == 0
  losses = [loss for _, loss in summary['history']]
  assert len(losses) == 4 and np.all(np.isfinite(losses))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert any(name.startswith('events') for name in os.listdir(tmp_path / 'tensorboard'))
  module, params, model_cfg = state_lib.load_encoder(str(tmp_path / 'encoder'))
  assert model_cfg.family == 'fusion'
  rgb = np.zeros((1, 32, 32, 3), np.float32)
  features = module.apply({'params': params}, rgb, np.zeros((1, 32, 32, 1), np.float32),
                          train=False)
  assert features.patches.shape == (1, 4, 4, 32) and features.cls.shape == (1, 32)
  # Finished: a rerun restores step 4 and does no work.
  again = pretrain.train(config, str(tmp_path))
  assert again['start_step'] == 4 and again['history'] == []
  # A different model in the same workdir is refused.
  with pytest.raises(ValueError, match=r'other settings \(model.width: 32 -> 64\); use a new'):
    pretrain.train(_with_width(config, 64), str(tmp_path))


def _with_width(config, width):
  config = config.copy_and_resolve_references()
  config.model.width = width
  return config


def test_nonfinite_loss_stops_naming_the_step(tmp_path, monkeypatch):
  real = pretrain.build_objective

  def poisoned(config):
    objective = real(config)
    def nan_from_start(key, outputs):
      loss, metrics = objective(key, outputs)
      return loss * jax.numpy.nan, metrics
    return nan_from_start

  monkeypatch.setattr(pretrain, 'build_objective', poisoned)
  with pytest.raises(pretrain.NonFiniteLossError, match='NaN/Inf at step 1 '):
    pretrain.train(tiny_config(num_steps=4), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints' / '2')


_RUN_STEPS = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from tests.conftest import tiny_config
    from lemumo_jax.training import pretrain
    config = tiny_config(num_steps=int(sys.argv[2]), checkpoint_every=100)
    assert config.views.photometric  # the default views: colour jitter with hue included
    summary = pretrain.train(config, sys.argv[1])
    params = jax.device_get(summary['state'].params)
    np.savez(sys.argv[1] + '/params.npz', **{
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)})
    print('RESULT', json.dumps({'devices': jax.device_count(), 'lr': config.optim.lr,
                                'losses': [loss for _, loss in summary['history']]}))
''')


def _run_steps(env, workdir, devices, steps):
  env = dict(env, XLA_FLAGS=xla_flags(devices),
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _RUN_STEPS, str(workdir), str(steps)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):]), dict(np.load(workdir / 'params.npz'))


# Parameters whose exact gradient is zero, so Adam turns float noise into +-lr steps: the key
# part of timm's qkv bias (softmax is shift-invariant per query) and the final norm's bias
# (a constant shift of every CLS, removed by the projector's first BatchNorm).
NULL_DIRECTIONS = ("['attn']['qkv']['bias']", "['encoder']['norm']['bias']")


def test_four_devices_match_one_device(python_env, tmp_path):
  """30 steps with the default views (photometric augmentation on) on 1 and 4 devices: the
  losses agree to 1e-5 (the hue sector used to be chosen by float equality, which a 4-device
  fusion could miss: 8e-3 apart after 30 steps)."""
  steps = 30
  one, one_params = _run_steps(python_env, tmp_path / 'one', 1, steps)
  four, four_params = _run_steps(python_env, tmp_path / 'four', 4, steps)
  assert one['devices'] == 1 and four['devices'] == 4 and len(one['losses']) == steps
  np.testing.assert_allclose(four['losses'], one['losses'], rtol=1e-5)
  assert one_params.keys() == four_params.keys()
  for name, value in one_params.items():
    if name.endswith(NULL_DIRECTIONS):
      # Each Adam step moves any element by at most ~lr.
      np.testing.assert_array_less(np.abs(four_params[name] - value), 1.25 * steps * one['lr'])
    else:
      np.testing.assert_allclose(four_params[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_kill_and_rerun_resumes_from_last_checkpoint(python_env, tmp_path):
  """SIGKILL mid-run, rerun the same command: it resumes and ends where an unbroken run ends."""
  steps = 60
  resumed, unbroken = killed_and_unbroken(
      [*TINY_FLAGS, f'--config.train.num_steps={steps}', '--config.train.checkpoint_every=5'],
      python_env, tmp_path, 'checkpoints/10')
  assert 'Resuming pretraining from step' in resumed.stdout
  resumed_at = int(resumed.stdout.split('Resuming pretraining from step ')[1].split()[0])
  assert 10 <= resumed_at < steps

  def final_loss(stdout):
    line = [l for l in stdout.splitlines() if l.startswith(f'step {steps}/{steps}')][-1]
    return float(line.split('loss ')[1].split()[0])

  np.testing.assert_allclose(final_loss(resumed.stdout), final_loss(unbroken.stdout), rtol=1e-4)
