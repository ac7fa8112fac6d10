"""Table 5's training regimes: the FLIR configs, end-to-end fine-tuning (schedule, two learning
rates, random-resized crops with their boxes, early stopping, resume) and the transfer probes."""

import json
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, TINY_FLAGS, tiny_config
from configs import common, flir
from lemumo_jax import modes
from lemumo_jax.data import finetune_views, pipeline
from lemumo_jax.tasks import heads as heads_lib
from lemumo_jax.training import downstream, finetune, loop, pretrain, probe
from lemumo_jax.training import state as state_lib


@pytest.fixture(scope='module')
def encoder_dir(tmp_path_factory):
  """An encoder exported by a tiny (2-step, global views only) pretraining run."""
  workdir = tmp_path_factory.mktemp('pretrained')
  config = tiny_config('lemumo', num_steps=2)
  config.views.num_local = 0  # a faster compile; the encoder is the same
  pretrain.train(config, str(workdir))
  return str(workdir / 'encoder')


# ---------------------------------------------------------------------------------- configs


def test_flir_regimes_are_configs_with_the_s1_settings():
  scratch = flir.get_config('lemumo')
  assert (scratch.method, scratch.mode, scratch.train.num_epochs) == ('lemumo', 'pretrain', 20)
  assert scratch.probe.encoder_dir == '' and scratch.finetune.encoder_dir == ''
  assert flir.get_config('lemumo,scratch').to_dict() == scratch.to_dict()

  transfer = flir.get_config('lemumo,transfer')
  assert (transfer.method, transfer.mode) == ('lemumo', 'probe')
  assert (transfer.views.num_global, transfer.views.num_local) == (1, 0)
  p = transfer.probe
  assert (p.num_epochs, p.batch_size, p.lr, tuple(p.image_size), p.val_every) == (
      5, 64, 1e-3, (640, 640), 100)
  assert tuple(p.heads) == ('centernet2d', 'occupancy')
  assert p.encoder_dir is None  # a required placeholder

  tune = flir.get_config('imagebind,finetune')
  assert (tune.method, tune.mode, tune.model.family) == ('imagebind', 'finetune', 'dual')
  f = tune.finetune
  assert (f.batch_size, f.num_epochs, f.encoder_lr, f.head_lr, f.weight_decay) == (
      64, 30, 2e-5, 2e-4, 0.05)
  assert (f.warmup_fraction, f.warmup_init_fraction, f.end_lr) == (0.05, 0.01, 1e-7)
  assert (f.val_every, f.patience, tuple(f.crop_scale)) == (100, 8, (0.8, 1.0))
  assert (f.decoder_layers, f.decoder_hidden, tuple(f.heads)) == (3, 512, ('centernet2d',))
  assert tuple(tune.probe.image_size) == (640, 640) and f.encoder_dir is None
  # The model (what the Waymo encoder was pretrained with) is the row's, as on Waymo.
  from configs import waymo  # pylint: disable=g-import-not-at-top
  assert tune.model.to_dict() == waymo.get_config('imagebind').model.to_dict()

  other = flir.get_config('lemumo,transfer')
  other.probe.encoder_dir = '/somewhere/encoder'
  assert transfer.probe.encoder_dir is None  # placeholders are not shared across configs
  with pytest.raises(ValueError, match="unknown training regime 'tune'"):
    flir.get_config('lemumo,tune')
  with pytest.raises(ValueError, match="unknown method row 'nope'"):
    flir.get_config('nope,transfer')
  assert modes.default_workdir('configs/flir.py:lemumo,transfer', 'lemumo') == (
      'runs/flir_lemumo_transfer')
  assert modes.default_workdir('configs/flir.py:lemumo', 'lemumo') == 'runs/flir_lemumo'
  # big_vision's key=value form names the same config and workdir.
  assert flir.get_config('row=lemumo,regime=transfer').to_dict() == (
      flir.get_config('lemumo,transfer').to_dict())
  assert flir.get_config('regime=transfer').method == 'lemumo'
  assert modes.default_workdir('configs/flir.py:row=lemumo,regime=transfer', 'lemumo') == (
      'runs/flir_lemumo_transfer')
  with pytest.raises(ValueError, match=r"give row=<row>\[,regime=<regime>\].*'rows=x'"):
    flir.get_config('rows=x')
  assert 'finetune' in modes.MODES


# -------------------------------------------------------------------------------- optimizer


def test_schedule_warms_up_from_one_percent_then_cosine_to_end_lr():
  ft = common.base_config().finetune
  total, peak = 200, 2e-4
  schedule = finetune.learning_rate_schedule(peak, total, ft)
  warmup = 10  # 5% of 200
  for t in range(total + 1):
    if t < warmup:
      want = 0.01 * peak + (peak - 0.01 * peak) * t / warmup
    else:
      want = 1e-7 + (peak - 1e-7) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
    np.testing.assert_allclose(float(schedule(t)), want, rtol=1e-5, atol=1e-6 * peak,
                               err_msg=f'step {t}')  # float32
  assert float(schedule(0)) == pytest.approx(2e-6) and float(schedule(total)) == pytest.approx(1e-7)


def test_encoder_and_head_get_their_own_learning_rates():
  """One AdamW step with gradient 1 everywhere: the update is -lr (1 + wd * param) on kernels
  and -lr on biases, with the encoder's lr on encoder params and the head's on head params."""
  ft = common.base_config().finetune
  tx, schedules = finetune.make_optimizer(ft, 100)
  params = {'encoder': {'dense': {'kernel': jnp.full((2, 3), 2.0), 'bias': jnp.ones(3)}},
            'head': {'conv': {'kernel': jnp.full((1, 1, 3, 4), 2.0), 'bias': jnp.ones(4)}}}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for group, lr in (('encoder', 2e-7), ('head', 2e-6)):  # 1% of 2e-5 and of 2e-4 at step 0
    assert float(schedules[group](0)) == pytest.approx(lr)
    layer = next(iter(updates[group].values()))
    np.testing.assert_allclose(layer['kernel'], -lr * (1 + 0.05 * 2.0), rtol=1e-5)
    np.testing.assert_allclose(layer['bias'], -lr, rtol=1e-5)  # no weight decay on biases


# ---------------------------------------------------------------------------- crop and boxes


def test_random_resized_crop_box_sampling():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = finetune_views.random_resized_crop_box(rng, (512, 640), (0.8, 1.0))
    assert 0 <= top and top + h <= 512 and 0 <= left and left + w <= 640
    assert 0.8 - 0.01 <= h * w / (512 * 640) <= 1.0
    assert 3 / 4 - 0.01 <= w / h <= 4 / 3 + 0.01
  a = finetune_views.random_resized_crop_box(np.random.default_rng(5), (512, 640), (0.8, 1.0))
  b = finetune_views.random_resized_crop_box(np.random.default_rng(5), (512, 640), (0.8, 1.0))
  assert a == b
  # Nothing fits a 10 x 100 strip at these aspects: torchvision's fallback, the widest centred
  # box of aspect 4/3.
  assert finetune_views.random_resized_crop_box(rng, (10, 100), (0.9, 1.0)) == (0, 43, 10, 13)


def _record(height=60, width=80):
  rows, cols = np.mgrid[:height, :width]
  return {
      'rgb': np.stack([rows, cols, (rows + cols) % 256], -1).astype(np.uint8),
      'companion': (rows * 1000 + cols).astype(np.float32),
      'depth_target': np.ones((height, width), np.float32),
      'seg': (cols % 3).astype(np.uint8),
      'boxes3d': np.zeros((0, 7), np.float32), 'boxes3d_cls': np.zeros((0,), np.int32),
      'boxes2d': np.array([[25, 15, 45, 35],     # inside the crop
                           [10, 5, 30, 20],      # partly outside: clipped
                           [70, 52, 79, 59],     # outside: dropped
                           [0, 0, 20.5, 10]],    # clipped to under a pixel wide: dropped
                          np.float32),
      'boxes2d_cls': np.array([0, 1, 2, 1], np.int32),
      'intrinsics': np.array([[50.0, 0, 40.0], [0, 50.0, 30.0], [0, 0, 1]], np.float32),
      'meta': {},
  }


def test_crop_moves_boxes_and_every_map_together():
  """Crop (top 10, left 20, 40 x 48) then the probe view: against a direct numpy computation,
  at the crop's own size (no resize) and resized by 1.5 (x) and 2 (y)."""
  record, (top, left, h, w) = _record(), (10, 20, 40, 48)
  want = np.clip(record['boxes2d'][:2].astype(np.float64) - [left, top, left, top], 0,
                 [w, h, w, h])                  # [[5, 5, 25, 25], [0, 0, 10, 10]]
  for view, scale in (((40, 48), (1.0, 1.0)), ((80, 72), (1.5, 2.0))):  # (sx, sy)
    geo = pipeline.ProbeGeometry.create(view, 8, (8, 8))
    frame = pipeline.ProbeFrame(geo, ('centernet2d', 'occupancy'), 3, 3, max_objects=8,
                                max_gt_boxes=8)
    out = frame.map(finetune_views.crop_record(record, (top, left, h, w)))
    sx, sy = scale
    assert out['gt2d_mask'].tolist() == [1, 1] + [0] * 6
    np.testing.assert_allclose(out['gt2d_boxes'][:2], want * [sx, sy, sx, sy], atol=1e-5)
    assert out['gt2d_classes'][:2].tolist() == [0, 1]
    np.testing.assert_allclose(out['intrinsics'], [[50 * sx, 0, (40 - left) * sx],
                                                   [0, 50 * sy, (30 - top) * sy], [0, 0, 1]],
                               rtol=1e-6)
    if scale == (1.0, 1.0):  # no resize: the crop itself, RGB and companion alike
      np.testing.assert_array_equal(out['rgb'], record['rgb'][top:top + h, left:left + w])
      np.testing.assert_array_equal(out['companion'],
                                    record['companion'][top:top + h, left:left + w])
  # The random transform is this crop with the box drawn from its generator.
  frame = pipeline.ProbeFrame(pipeline.ProbeGeometry.create((40, 48), 8, (8, 8)),
                              ('centernet2d',), 3, 3, 8, 8)
  cropped = finetune_views.CroppedProbeFrame(frame, (0.5, 0.9)).random_map(
      record, np.random.default_rng(3))
  box = finetune_views.random_resized_crop_box(np.random.default_rng(3), (60, 80), (0.5, 0.9))
  direct = frame.map(finetune_views.crop_record(record, box))
  for key in ('rgb', 'companion', 'gt2d_boxes', 'ct2d_heatmap'):
    np.testing.assert_array_equal(cropped[key], direct[key], err_msg=key)
  with pytest.raises(ValueError, match='crop_scale'):
    finetune_views.CroppedProbeFrame(frame, (0.8, 1.2))


# ----------------------------------------------------------------------------- early stop


def test_early_stopping_rule():
  # Validations every 100 steps, best at 200: the 8th without a new best is at step 1000.
  stale = [downstream.stale_validations(s, 200, 100) for s in (100, 200, 299, 300, 999, 1000)]
  assert stale == [0, 0, 0, 1, 7, 8]
  assert downstream.stale_validations(500, None, 100) == 0
  best = {'metrics': {'loss': 1.0, 'mAP50': 0.2}}
  assert loop.is_better({'loss': 0.9}, best, 'loss')
  assert not loop.is_better({'loss': 1.0}, best, 'loss')  # a tie is not a new best
  assert loop.is_better({'mAP50': 0.3}, best, 'mAP50')
  assert not loop.is_better({'mAP50': float('nan')}, best, 'mAP50')
  assert loop.is_better({'loss': 5.0}, None, 'loss')


def test_early_stop_in_the_loop_and_rerun(tmp_path, encoder_dir, monkeypatch):
  """A validation loss that never improves stops training `patience` validations after the
  first; the stop is checkpointed, so a rerun trains nothing."""
  result_of = heads_lib.ProbeEvaluator.result
  monkeypatch.setattr(heads_lib.ProbeEvaluator, 'result',
                      lambda self: dict(result_of(self), loss=1.0))
  config = tiny_config()
  config.finetune.update(encoder_dir=encoder_dir, num_steps=12, val_every=1, patience=2,
                         decoder_layers=1)
  result = finetune.run(config, str(tmp_path))
  assert [s for s, _ in result['val_history']] == [1, 2, 3]
  assert result['stopped_early_at'] == 3 and result['best_step'] == 1
  details = json.loads((tmp_path / 'finetune' / 'report.json').read_text())['details']
  assert details['stopped_early_at'] == 3
  again = finetune.run(config, str(tmp_path))
  assert again['history'] == [] and again['val_history'] == []
  assert again['stopped_early_at'] == 3 and again['best_step'] == 1


# ------------------------------------------------------------------------------- end to end


def test_finetune_end_to_end(tmp_path, encoder_dir):
  """Fine-tunes a pretrained encoder + the 2D CenterNet decoder into a fresh workdir: report
  with mAP50 / Car mAP50, the encoder's params trained (the probe stage's stay frozen), a
  rerun resumes without retraining, a changed config is refused."""
  config = tiny_config()
  config.finetune.encoder_dir = encoder_dir
  result = finetune.run(config, str(tmp_path))
  ft_dir = tmp_path / 'finetune'
  for name in ('report.md', 'report.json', 'probe_outputs.png', 'best', 'config.json',
               'tensorboard'):
    assert (ft_dir / name).exists(), name
  assert [s for s, _ in result['val_history']] == [2, 4] and result['stopped_early_at'] is None
  payload = json.loads((ft_dir / 'report.json').read_text())
  assert payload['method'] == 'lemumo fine-tuned' and payload['training_data'] == 'RGB+Depth'
  assert list(payload['table'])[:2] == ['mAP50 ↑', 'Car mAP50 ↑']
  assert {'mAP50', 'AP50/car', 'loss/centernet2d'} <= set(payload['metrics'])
  assert payload['details']['encoder'] == f'fine-tuned from {encoder_dir}'
  assert (ft_dir / 'report.md').read_text().startswith('# End-to-end fine-tuning: lemumo')

  _, pretrained_params, _ = state_lib.load_encoder(encoder_dir)
  best = ocp.StandardCheckpointer().restore(result['best_params_dir'])
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       best['params']['encoder'], pretrained_params)
  assert max(jax.tree.leaves(diffs)) > 0  # fine-tuned ...
  assert jax.tree.structure(diffs) == jax.tree.structure(pretrained_params)
  assert 'decoder0' in best['params']['head'] and 'heads' in best['params']['head']
  _, on_disk, _ = state_lib.load_encoder(encoder_dir)  # ... and the export left as it was
  jax.tree.map(np.testing.assert_array_equal, on_disk, pretrained_params)

  again = finetune.run(config, str(tmp_path))
  assert again['history'] == [] and again['best_step'] == result['best_step']
  assert again['metrics']['loss'] == pytest.approx(result['metrics']['loss'], rel=1e-6)
  config.finetune.decoder_hidden = 24
  with pytest.raises(ValueError, match=r'other settings \(finetune.decoder_hidden: 16 -> 24\)'):
    finetune.run(config, str(tmp_path))


def test_transfer_regime_probes_the_given_encoder(tmp_path, encoder_dir):
  config = common.apply_method(tiny_config(), 'lemumo,transfer')
  config.probe.update(encoder_dir=encoder_dir, heads=('centernet2d',), num_steps=2,
                      val_every=2)
  result = probe.run(config, str(tmp_path))
  assert result['probe_dir'] == str(tmp_path / 'probe')
  payload = json.loads((tmp_path / 'probe' / 'report.json').read_text())
  assert payload['details']['encoder'] == f'pretrained ({encoder_dir})'
  assert 'mAP50' in payload['metrics']


def test_missing_or_mismatched_encoder_is_a_clear_error(tmp_path, encoder_dir):
  config = common.apply_method(tiny_config(), 'lemumo,finetune')
  with pytest.raises(ValueError, match=r'config\.finetune\.encoder_dir is not set'):
    finetune.run(config, str(tmp_path))
  config.finetune.encoder_dir = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'nowhere'))):
    finetune.run(config, str(tmp_path))
  config.finetune.encoder_dir = encoder_dir
  config.model.width = 48
  with pytest.raises(ValueError, match=re.escape(encoder_dir) + r' .*model\.width: encoder 32 vs '
                     r'config 48'):
    finetune.run(config, str(tmp_path))
  transfer = common.apply_method(tiny_config(), 'lemumo,transfer')
  with pytest.raises(ValueError, match=r'config\.probe\.encoder_dir is not set'):
    probe.run(transfer, str(tmp_path))
  transfer.probe.encoder_dir = encoder_dir
  transfer.model.family = 'vit'
  with pytest.raises(ValueError, match="model.family: encoder 'fusion' vs config 'vit'"):
    probe.run(transfer, str(tmp_path))


def test_main_runs_mode_finetune_and_names_the_missing_encoder(python_env, tmp_path):
  cmd = [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py:lemumo,finetune',
         f'--workdir={tmp_path}', *TINY_FLAGS, '--config.mode=finetune']
  proc = subprocess.run(cmd, cwd=REPO, env=python_env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  assert 'config.finetune.encoder_dir is not set' in proc.stderr
