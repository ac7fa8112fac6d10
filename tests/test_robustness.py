"""Robustness conditions of the probe report (evaluation/robustness.py): the companion
perturbations against hand-written arrays, the condition names, which encoders read the
companion (checked on the encoders themselves). The probe runs that report them are in
test_probe.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from lemumo_jax.data import pipeline
from lemumo_jax.evaluation import robustness
from lemumo_jax.models import encoders
from lemumo_jax.training import probe


def test_zero_and_shift():
  companion = np.array([[[1, 2, 3, 4, 5],
                         [0, 7, 0, 9, 6]]], np.float32)              # [1, 2, 5]
  np.testing.assert_array_equal(robustness.zero_companion(companion), np.zeros((1, 2, 5)))
  np.testing.assert_array_equal(robustness.shift_companion(companion, 2),
                                [[[0, 0, 1, 2, 3],
                                  [0, 0, 0, 7, 0]]])
  np.testing.assert_array_equal(robustness.shift_companion(companion, 0), companion)
  np.testing.assert_array_equal(robustness.shift_companion(companion, 5), np.zeros((1, 2, 5)))
  channels = np.stack([companion, -companion], -1)                  # [1, 2, 5, 2]
  shifted = robustness.shift_companion(channels, 1)
  np.testing.assert_array_equal(shifted[..., 0], [[[0, 1, 2, 3, 4], [0, 0, 7, 0, 9]]])
  np.testing.assert_array_equal(shifted[..., 1], -shifted[..., 0])
  # perturb() by name: the input is never modified in place.
  before = companion.copy()
  np.testing.assert_array_equal(
      robustness.perturb(companion, 'shift_4px', seed=0, records=np.arange(1)),
      [[[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]])
  np.testing.assert_array_equal(companion, before)


def _sparse_depth(frames=3, seed=0):
  rng = np.random.default_rng(seed)
  depth = rng.uniform(0.05, 1.0, size=(frames, 24, 32)).astype(np.float32)
  return depth * (rng.uniform(size=depth.shape) < 0.3)


@pytest.mark.parametrize('name, fraction', [('drop_50', 0.5), ('drop_90', 0.9)])
def test_drop_returns_zeroes_that_fraction_of_the_returns(name, fraction):
  companion = _sparse_depth()
  before = companion.copy()
  out = robustness.perturb(companion, name, seed=3, records=np.array([0, 1, 2]))
  np.testing.assert_array_equal(companion, before)
  for b in range(3):
    returns = companion[b] > 0
    dropped = returns & (out[b] == 0)
    assert dropped.sum() == round(fraction * returns.sum()), b
    kept = out[b] != 0
    np.testing.assert_array_equal(out[b][kept], companion[b][kept])   # kept returns unchanged
    assert not np.any(kept & ~returns)                                  # no new returns
  # Same (seed, condition, frame) -> the same pixels; another frame, condition or seed differs.
  again = robustness.perturb(companion, name, seed=3, records=np.array([0, 1, 2]))
  np.testing.assert_array_equal(out, again)
  moved = robustness.perturb(companion, name, seed=3, records=np.array([5, 1, 2]))
  assert not np.array_equal(moved[0], out[0]) and np.array_equal(moved[1:], out[1:])
  assert not np.array_equal(robustness.perturb(companion, name, seed=4, records=np.arange(3)),
                            out)
  other = robustness.drop_returns(companion, fraction,
                                  [robustness.frame_rng(3, 'drop_other', r) for r in range(3)])
  assert not np.array_equal(other, out)


def test_drop_returns_treats_a_pixel_with_any_channel_as_one_return():
  companion = np.zeros((1, 4, 4, 2), np.float32)
  companion[0, :2, :, 0] = 1.0                                       # 8 returns
  companion[0, :2, :, 1] = 2.0
  out = robustness.drop_returns(companion, 0.25, [np.random.default_rng(0)])
  cleared = np.all(out[0] == 0, -1)
  assert cleared[:2].sum() == 2 and np.all(cleared[2:])
  np.testing.assert_array_equal(out[0][~cleared], companion[0][~cleared])


def test_eval_record_indices_name_the_loaders_frames():
  config = tiny_config()
  config.data.num_val = 11
  geo = pipeline.ProbeGeometry.create((48, 64), 8, (24, 32))
  frame = pipeline.ProbeFrame(geo, ('depth',), 3, 3, 4, 16)
  batches = list(pipeline.probe_eval_loader(config.data, frame, 4))
  frames = np.concatenate([b['companion'] for b in batches])
  for i, batch in enumerate(batches):
    records = pipeline.eval_record_indices(i, 4)
    assert records.tolist() == list(range(4 * i, 4 * i + 4))
    valid = batch['valid'] > 0
    np.testing.assert_array_equal(batch['companion'][valid], frames[records[valid]])


def test_unknown_conditions_are_an_error_before_any_file(tmp_path):
  robustness.check_conditions(())
  robustness.check_conditions(tuple(robustness.CONDITIONS))
  with pytest.raises(ValueError, match=r"config.probe.robustness=.*unknown \['fog'\].*"
                                        r"'companion_missing', 'shift_2px'"):
    robustness.check_conditions(('shift_2px', 'fog'))
  with pytest.raises(ValueError, match=r"unknown \['drop_50'\]"):
    robustness.check_conditions('drop_50')
  config = tiny_config()
  config.probe.update(encoder='random', robustness=('companion_missing', 'rain'))
  with pytest.raises(ValueError, match=r"config.probe.robustness.*unknown \['rain'\]"):
    probe.run(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_not_applicable():
  fusion = {'family': 'fusion'}
  assert robustness.not_applicable('drop_50', fusion, 'depth') is None
  assert 'thermal' in robustness.not_applicable('drop_90', fusion, 'thermal')
  assert robustness.not_applicable('shift_8px', fusion, 'thermal') is None
  assert robustness.not_applicable('companion_missing', None, 'depth') is None   # raw patches
  for rgb_only in ({'family': 'vit', 'inputs': 'rgb'}, {'family': 'dual'}):
    for name in robustness.CONDITIONS:
      assert 'does not read the companion' in robustness.not_applicable(name, rgb_only, 'depth')


@pytest.mark.parametrize('method', ['lemumo', 'ft_persistent', 'lejepa_rgb', 'lidar_only',
                                    'early_fusion', 'late_fusion', 'imagebind', 'multimae_ss',
                                    'raw'])
def test_reads_companion_is_what_the_patch_grid_depends_on(method):
  """reads_companion(cfg) is True exactly when the probed patches change with the companion."""
  config = tiny_config('lemumo' if method == 'raw' else method)
  if method == 'raw':
    module, model_cfg = encoders.InputPatches(8), None
  else:
    module, model_cfg = encoders.build_encoder(config.model), config.model
  rng = np.random.default_rng(0)
  rgb = jnp.asarray(rng.normal(size=(1, 32, 32, 3)), jnp.float32)
  companion = jnp.asarray(rng.uniform(size=(1, 32, 32, 1)), jnp.float32)
  params = module.init(jax.random.PRNGKey(0), rgb, companion, train=False)
  patches = lambda c: np.asarray(module.apply(params, rgb, c, train=False).patches)
  changed = not np.array_equal(patches(companion), patches(jnp.zeros_like(companion)))
  assert changed == robustness.reads_companion(model_cfg)
