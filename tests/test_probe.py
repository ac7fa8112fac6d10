"""Probe heads (S3 shapes), probe losses vs float64 numpy, probe views/targets, the probe stage
end to end (report, figure, resume, random-encoder control, raw input patches, 4 devices).

Over 450 lines on purpose: the probe stage's reference checks share one set of tiny records
and numpy formulas, and are read together against S3."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (REPO, TINY_FLAGS, TINY_PROBE_FLAGS, killed_and_unbroken, tiny_config,
                      xla_flags)
from lemumo_jax.data import geometry, pipeline, synthetic
from lemumo_jax.evaluation import metrics, report, robustness
from lemumo_jax.models import probes
from lemumo_jax.tasks import heads as heads_lib
from lemumo_jax.tasks import targets
from lemumo_jax.training import loop, pretrain, probe


# ------------------------------------------------------------------------------------ heads


def test_pixel_shuffle_is_torch_order():
  rng = np.random.default_rng(0)
  b, h, w, c, r = 2, 3, 4, 5, 4
  x = rng.normal(size=(b, h, w, c * r * r)).astype(np.float32)
  got = np.asarray(probes.pixel_shuffle(jnp.asarray(x), r))
  want = np.zeros((b, h * r, w * r, c), np.float32)
  # torch.nn.PixelShuffle: out[n, ch, y * r + i, x * r + j] = in[n, ch * r^2 + i * r + j, y, x]
  for ch in range(c):
    for i in range(r):
      for j in range(r):
        want[:, i::r, j::r, ch] = x[..., ch * r * r + i * r + j]
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match='divisible'):
    probes.pixel_shuffle(jnp.zeros((1, 2, 2, 6)), 2)


def _param_shapes(module, patches, **kwargs):
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), patches, **kwargs))
  return jax.tree.map(lambda x: x.shape, variables['params'])


def test_head_architectures_follow_s3():
  d, grid = 24, (5, 7)
  patches = jnp.zeros((2, *grid, d))
  shapes = _param_shapes(probes.CenterNet3D(3), patches, train=False)
  assert shapes['adapter']['kernel'] == (3, 3, d, 256)             # 3x3 Conv(vit_dim, 256)
  assert shapes['upsample']['kernel'] == (4, 4, 256, 256)          # transposed conv, stride 2
  assert {k: v['kernel'] for k, v in shapes.items() if k not in ('adapter', 'upsample',
                                                                  'adapter_bn')} == {
      'heatmap': (1, 1, 256, 3), 'offset': (1, 1, 256, 2), 'size': (1, 1, 256, 3),
      'depth': (1, 1, 256, 1), 'yaw': (1, 1, 256, 2)}
  out = probes.CenterNet3D(3).apply(probes.CenterNet3D(3).init(jax.random.PRNGKey(0), patches,
                                                               train=False), patches, train=False)
  assert out['heatmap'].shape == (2, 10, 14, 3)                    # 2x upsampled grid
  np.testing.assert_allclose(jax.nn.sigmoid(out['heatmap']), 0.1, atol=1e-3)  # CenterNet prior

  shapes = _param_shapes(probes.SegProbe(6, (20, 28)), patches)
  assert shapes == {'proj': {'kernel': (1, 1, d, 6 * 16), 'bias': (6 * 16,)}}  # one 1x1 conv
  shapes = _param_shapes(probes.DepthProbe(), patches)
  assert shapes['proj']['kernel'] == (1, 1, d, 16 * 16)
  assert shapes['refine']['kernel'] == (3, 3, 16, 16)
  assert shapes['head']['kernel'] == (1, 1, 16, 1)
  shapes = _param_shapes(probes.OccupancyProbe(4, hidden=8), patches)
  assert shapes['proj']['kernel'] == shapes['skip']['kernel'] == (1, 1, d, 8 * 4)  # r = 2
  assert shapes['refine0']['kernel'] == shapes['refine1']['kernel'] == (3, 3, 8, 8)
  assert 'refine0_norm' in shapes and shapes['head']['kernel'] == (1, 1, 8, 4)

  heads = heads_lib.ProbeHeads(tuple(heads_lib.HEADS), 3, 2, 6, (20, 28), centernet_hidden=16,
                            occupancy_hidden=8)
  variables = heads.init(jax.random.PRNGKey(1), patches, train=False)
  out = heads.apply(variables, patches, train=False)
  assert out['seg'].shape == (2, 20, 28, 6)
  assert out['depth'].shape == (2, 20, 28) and bool(jnp.all(out['depth'] > 0))  # 4x grid
  assert out['occupancy'].shape == (2, 10, 14, 3)                  # 2x grid, C2 + 'any'
  assert out['centernet2d']['wh'].shape == (2, 10, 14, 2)
  with pytest.raises(ValueError, match="unknown probe head 'boxes'; choose from"):
    heads_lib.ProbeHeads(('seg', 'boxes'), 3, 2, 6, (4, 4)).init(jax.random.PRNGKey(0), patches,
                                                                 train=False)


def test_segmentation_probe_is_linear():
  """1x1 conv + PixelShuffle + bilinear resize: an affine map of the patch features."""
  seg = probes.SegProbe(4, (13, 17))
  rng = np.random.default_rng(1)
  x, y = (jnp.asarray(rng.normal(size=(1, 3, 5, 8)), jnp.float32) for _ in range(2))
  params = seg.init(jax.random.PRNGKey(0), x)
  f = lambda v: np.asarray(seg.apply(params, v), np.float64)
  zero = f(jnp.zeros_like(x))
  np.testing.assert_allclose(f(2.0 * x - 3.0 * y) - zero, 2 * (f(x) - zero) - 3 * (f(y) - zero),
                             atol=1e-4)


# ----------------------------------------------------------------------------------- losses


def _seg_loss(logits, labels):
  return heads_lib.HEADS['seg'].loss(logits, {'seg': labels})['']


def _depth_loss(pred, target):
  return heads_lib.HEADS['depth'].loss(pred, {'depth': target})['']


def _np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_segmentation_and_depth_losses_match_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 5, 6, 4)) * 2
  labels = rng.integers(0, 4, size=(2, 5, 6)).astype(np.uint8)
  labels[0, :2] = 255
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = labels != 255
  want = -np.take_along_axis(log_p, np.where(valid, labels, 0)[..., None].astype(int),
                             -1)[..., 0][valid].mean()
  np.testing.assert_allclose(_seg_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)),
                             want, rtol=1e-5)
  pred = rng.uniform(1, 50, size=(2, 8, 8))
  target = rng.uniform(1, 50, size=(2, 8, 8)) * (rng.uniform(size=(2, 8, 8)) > 0.7)
  want = np.abs(pred - target)[target > 0].mean()
  np.testing.assert_allclose(_depth_loss(jnp.asarray(pred, jnp.float32),
                                               jnp.asarray(target, jnp.float32)), want, rtol=1e-5)
  assert float(_depth_loss(jnp.ones((1, 2, 2)), jnp.zeros((1, 2, 2)))) == 0.0


def test_occupancy_losses_match_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 4, 5, 3)) * 3
  target = (rng.uniform(size=(2, 4, 5, 3)) > 0.6).astype(np.float64)
  got = {k: float(v) for k, v in heads_lib.occupancy_losses(jnp.asarray(logits, jnp.float32),
                                                         jnp.asarray(target, jnp.float32)).items()}
  p = _np_sigmoid(logits)
  bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
  p_t = np.where(target > 0, p, 1 - p)
  np.testing.assert_allclose(got['focal'], np.mean(bce * (1 - p_t)**2), rtol=1e-5)
  dice = [1 - (2 * (p[b, ..., c] * target[b, ..., c]).sum() + 1)
          / (p[b, ..., c].sum() + target[b, ..., c].sum() + 1) for b in range(2) for c in range(3)]
  np.testing.assert_allclose(got['dice'], np.mean(dice), rtol=1e-5)
  np.testing.assert_allclose(got['consistency'],
                             np.mean(np.abs(p[..., -1] - p[..., :-1].max(-1))), rtol=1e-5)
  # A confident correct prediction has near-zero focal and Dice loss.
  perfect = heads_lib.occupancy_losses(jnp.asarray((2 * target - 1) * 20, jnp.float32),
                                   jnp.asarray(target, jnp.float32))
  assert float(perfect['focal']) < 1e-8 and float(perfect['dice']) < 0.05


def test_patch_moments_on_device_match_feature_variance_on_host():
  rng = np.random.default_rng(1)
  patches = rng.normal(size=(5, 3, 4, 6)) + rng.normal(size=(5, 1, 1, 6)) * 2
  valid = np.array([1, 1, 0, 1, 1], np.float32)
  on_host = metrics.FeatureVariance()
  on_host.update(patches, valid)
  on_device = metrics.FeatureVariance()
  moments = jax.jit(probe.patch_moments)(jnp.asarray(patches, jnp.float32), jnp.asarray(valid))
  on_device.update_moments(**jax.device_get(moments))
  assert on_device.frames == 4
  for key, value in on_host.result().items():
    np.testing.assert_allclose(on_device.result()[key], value, rtol=1e-4, err_msg=key)


def test_probe_losses_sum_heads_and_are_per_example_under_vmap():
  rng = np.random.default_rng(4)
  heads = ('centernet3d', 'seg', 'depth', 'occupancy')
  module = heads_lib.ProbeHeads(heads, 3, 3, 5, (8, 8), centernet_hidden=8, occupancy_hidden=8)
  patches = jnp.asarray(rng.normal(size=(2, 2, 2, 8)), jnp.float32)
  outputs = module.apply(module.init(jax.random.PRNGKey(0), patches, train=False), patches,
                         train=False)
  batch = {
      'ct3d_heatmap': jnp.asarray(rng.uniform(size=(2, 4, 4, 3)) ** 4, jnp.float32),
      'ct3d_index': jnp.asarray([[3, 0], [5, 9]], jnp.int32),
      'ct3d_offset': jnp.asarray(rng.uniform(size=(2, 2, 2)), jnp.float32),
      'ct3d_size': jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32),
      'ct3d_depth': jnp.asarray(rng.normal(size=(2, 2, 1)), jnp.float32),
      'ct3d_yaw': jnp.asarray(rng.normal(size=(2, 2, 2)), jnp.float32),
      'ct3d_mask': jnp.asarray([[1, 0], [1, 1]], jnp.float32),
      'seg': jnp.asarray(rng.integers(0, 5, size=(2, 8, 8)), jnp.uint8),
      'depth': jnp.asarray(rng.uniform(0, 30, size=(2, 8, 8)), jnp.float32),
      'occupancy': jnp.asarray(rng.uniform(size=(2, 4, 4, 4)) > 0.5, jnp.float32),
  }
  batch['ct3d_heatmap'] = batch['ct3d_heatmap'].at[0, 0, 3, 1].set(1.0)
  losses = heads_lib.probe_losses(outputs, batch, heads)
  np.testing.assert_allclose(losses['loss'], sum(losses[h] for h in heads), rtol=1e-6)
  np.testing.assert_allclose(
      losses['centernet3d'], sum(losses[f'centernet3d/{t}'] for t in
                                 ('heatmap', 'offset', 'size', 'depth', 'yaw')), rtol=1e-6)
  one = lambda tree, i: jax.tree.map(lambda x: x[i:i + 1], tree)
  per_example = jax.vmap(lambda o, b: heads_lib.probe_losses(
      jax.tree.map(lambda x: x[None], o), jax.tree.map(lambda x: x[None], b), heads))(outputs, batch)
  for i in range(2):
    single = heads_lib.probe_losses(one(outputs, i), one(batch, i), heads)
    np.testing.assert_allclose(per_example['loss'][i], single['loss'], rtol=1e-5)


# ------------------------------------------------------------------------- views and targets


def test_cell_mean_and_occupancy_target():
  rng = np.random.default_rng(5)
  values = rng.uniform(1, 9, size=(12, 10)) * (rng.uniform(size=(12, 10)) > 0.5)
  got = targets.cell_mean(values, (4, 5))
  for r in range(4):
    for c in range(5):
      block = values[r * 3:(r + 1) * 3, c * 2:(c + 1) * 2]
      want = block[block > 0].mean() if (block > 0).any() else 0.0
      np.testing.assert_allclose(got[r, c], want, rtol=1e-6)
  occ = targets.occupancy_target(np.array([[10, 0, 30, 20], [41, 41, 42, 42]]), np.array([1, 0]),
                                  num_classes=2, image_hw=(40, 80), out_hw=(4, 8))
  # 10 px cells: centres at 5, 15, ...; box 1 covers columns 1-2, rows 0-1; box 2 is smaller
  # than a cell and marks the cell holding its centre (row 4 -> clipped to 3, column 4).
  want1 = np.zeros((4, 8))
  want1[0:2, 1:3] = 1
  np.testing.assert_array_equal(occ[..., 1], want1)
  want0 = np.zeros((4, 8))
  want0[3, 4] = 1
  np.testing.assert_array_equal(occ[..., 0], want0)
  np.testing.assert_array_equal(occ[..., 2], np.maximum(want0, want1))


def _record(height=60, width=80):
  k = np.array([[50.0, 0, 40.0], [0, 50.0, 30.0], [0, 0, 1]])
  box = np.array([[2.0, 0.5, 10.0, 4.0, 1.8, 1.5, 0.3]], np.float32)
  return {
      'rgb': np.full((height, width, 3), 128, np.uint8),
      'companion': np.zeros((height, width), np.float32),
      'depth_target': np.full((height, width), 7.0, np.float32),
      'seg': np.tile(np.arange(width, dtype=np.uint8) % 3, (height, 1)),
      'boxes3d': box, 'boxes3d_cls': np.array([1], np.int32),
      'boxes2d': np.array([[10.0, 6.0, 30.0, 26.0]], np.float32),
      'boxes2d_cls': np.array([0], np.int32),
      'intrinsics': k.astype(np.float32), 'meta': {},
  }


def test_probe_frame_rescales_geometry():
  """Probe view 120 x 240 of an 60 x 80 frame (sy = 2, sx = 3): the 3D box centre lands in
  the heatmap cell where the original pixel lands after scaling; 2D boxes scale with it."""
  record = _record()
  geo = pipeline.ProbeGeometry.create((120, 240), 8, (30, 60))
  assert geo.grid_hw == (15, 30) and geo.detection_hw == (30, 60) and geo.depth_hw == (60, 120)
  frame = pipeline.ProbeFrame(geo, tuple(heads_lib.HEADS), 3, 2, max_objects=4, max_gt_boxes=8)
  out = frame.map(record)
  assert out['rgb'].shape == (120, 240, 3) and out['companion'].shape == (120, 240)
  uv, _ = geometry.project_points(record['boxes3d'][:, :3], record['intrinsics'])
  u, v = uv[0, 0] * 3, uv[0, 1] * 2                     # centre in probe pixels
  col, row = int(u // 4), int(v // 4)                   # stride 240 / 60 = 4
  assert out['ct3d_mask'][0] == 1 and out['ct3d_index'][0] == row * 60 + col
  assert out['ct3d_heatmap'][row, col, 1] == 1.0
  np.testing.assert_allclose(out['ct3d_offset'][0], [u / 4 - col, v / 4 - row], atol=1e-5)
  np.testing.assert_allclose(out['ct3d_depth'][0, 0], np.log(10.0), atol=1e-6)
  np.testing.assert_allclose(out['gt3d_boxes'][0], record['boxes3d'][0])
  assert out['gt3d_mask'].tolist() == [1] + [0] * 7
  np.testing.assert_allclose(out['gt2d_boxes'][0], [30, 12, 90, 52])
  np.testing.assert_allclose(out['intrinsics'], [[150, 0, 120], [0, 100, 60], [0, 0, 1]])
  assert out['seg'].shape == (30, 60) and out['depth'].shape == (60, 120)
  np.testing.assert_allclose(out['depth'], 7.0)
  assert out['occupancy'].shape == (30, 60, 3)
  with pytest.raises(ValueError, match='not divisible by the encoder patch size'):
    pipeline.ProbeGeometry.create((100, 240), 8, (30, 60))
  too_many = dict(record, boxes3d=np.repeat(record['boxes3d'], 9, 0),
                  boxes3d_cls=np.ones(9, np.int32))
  with pytest.raises(ValueError, match='max_gt_boxes=8'):
    frame.map(too_many)


def test_eval_loader_pads_the_last_batch():
  config = tiny_config()
  config.data.num_val = 11
  geo = pipeline.ProbeGeometry.create((48, 64), 8, (24, 32))
  frame = pipeline.ProbeFrame(geo, ('depth',), 3, 3, 4, 16)
  batches = list(pipeline.probe_eval_loader(config.data, frame, 4))
  assert len(batches) == pipeline.num_eval_batches(11, 4) == 3
  assert all(b['depth'].shape == (4, 24, 32) for b in batches)
  assert [b['valid'].tolist() for b in batches] == [[1] * 4, [1] * 4, [1, 1, 1, 0]]
  source = synthetic.SyntheticScenes(11, 48, 64, 'depth', config.data.seed, 'val')
  np.testing.assert_allclose(batches[2]['depth'][2], frame.map(source[10])['depth'])


# ------------------------------------------------------------------------------- end to end


def test_report_table_layouts():
  rows = [report.ReportRow('lemumo', 'RGB+Depth', {'mAP_XY': 0.236, 'depth_MAE': 2.86,
                                                   'mAP_XZ': 0.072, 'seg_mIoU': 0.275}),
          report.ReportRow('lejepa_rgb', 'RGB', {'mAP_XY': 0.193, 'depth_MAE': 4.704,
                                                 'mAP_XZ': 0.049, 'seg_mIoU': 0.261})]
  table = report.markdown_table(rows, mark_best=True).splitlines()
  assert table[0] == ('| Method | Training Data | mAP XY ↑ | Depth MAE ↓ | mAP XZ ↑ | '
                      'Seg. mIoU ↑ |')
  assert table[2] == '| lemumo | RGB+Depth | **23.6** | **2.860** | **7.2** | **0.275** |'
  assert table[3] == '| lejepa_rgb | RGB | <u>19.3</u> | <u>4.704</u> | <u>4.9</u> | <u>0.261</u> |'
  flir = report.markdown_table([report.ReportRow('lemumo', 'RGB+Thermal',
                                                 {'mAP50': 0.0156, 'AP50/car': 0.1022})])
  assert flir.splitlines()[-1] == '| lemumo | RGB+Thermal | 1.56 | 10.22 |'


def test_probe_stage_end_to_end(tmp_path):
  """Pretrain a tiny encoder, probe it: report + figure, best kept, a rerun resumes without
  retraining, and the random-encoder control goes to its own directory."""
  config = tiny_config()
  pretrain.train(config, str(tmp_path))
  result = probe.run(config, str(tmp_path))
  probe_dir = tmp_path / 'probe'
  assert result['probe_dir'] == str(probe_dir)
  for name in ('report.md', 'report.json', 'probe_outputs.png', 'best'):
    assert (probe_dir / name).exists(), name
  assert [s for s, _ in result['val_history']] == [2, 4]
  best = loop.KeepBest(str(probe_dir)).best
  assert best['metrics']['loss'] == pytest.approx(min(l for _, l in result['val_history']),
                                                  rel=1e-6)
  assert best['step'] == result['best_step']
  # The reported metrics are those of the kept (best) params, re-evaluated.
  assert result['metrics']['loss'] == pytest.approx(best['metrics']['loss'], rel=1e-5)
  payload = json.loads((probe_dir / 'report.json').read_text())
  assert payload['method'] == 'lemumo' and payload['training_data'] == 'RGB+Depth'
  assert set(payload['table']) == {'mAP XY ↑', 'Depth MAE ↓', 'mAP XZ ↑', 'Seg. mIoU ↑',
                                   'ADE XY (m) ↓', 'Occ. IoU ↑'}
  assert payload['table']['Depth MAE ↓'] == pytest.approx(result['metrics']['depth_MAE'], abs=1e-5)
  for key in ('mAP_XY', 'mAP_XZ', 'seg_mIoU', 'depth_MAE', 'occupancy_IoU', 'loss/seg'):
    assert key in result['metrics'], key
  assert 0 < result['metrics']['depth_MAE'] < 80
  markdown = (probe_dir / 'report.md').read_text()
  assert '| lemumo | RGB+Depth |' in markdown
  _check_robustness(payload, result, markdown, 'lemumo')
  scalars = _tensorboard_scalars(probe_dir, 'robust/')
  assert scalars['robust/drop_90/depth_MAE'] == (
      result['best_step'], pytest.approx(result['robustness']['drop_90']['depth_MAE'], rel=1e-6))

  again = probe.run(config, str(tmp_path))
  assert again['history'] == [] and again['best_step'] == result['best_step']
  assert again['metrics']['loss'] == pytest.approx(result['metrics']['loss'], rel=1e-6)
  np.testing.assert_equal(again['robustness'], result['robustness'])  # the same perturbed frames

  config.probe.encoder = 'random'
  control = probe.run(config, str(tmp_path))
  assert control['probe_dir'] == str(tmp_path / 'probe_random')
  assert json.loads((tmp_path / 'probe_random' / 'report.json').read_text())['method'] == (
      'lemumo encoder frozen')


def _check_robustness(payload, result, markdown: str, method: str) -> None:
  """A probe of an encoder that reads the companion: every condition has the main metrics'
  keys, finite, in report.json and as a report.md row; a missing companion changes them."""
  assert payload['robustness'].keys() == set(robustness.CONDITIONS)
  for name, values in result['robustness'].items():
    assert values.keys() == result['metrics'].keys(), name
    for key in ('loss', 'depth_MAE', 'patch_variance/local'):
      assert np.isfinite(values[key]), (name, key)
      assert payload['robustness'][name][key] == pytest.approx(values[key], rel=1e-6)
    assert f'| {method} [{robustness.label(name)}] |' in markdown, name
  missing = result['robustness']['companion_missing']
  assert missing['loss'] != result['metrics']['loss']
  assert missing['depth_MAE'] != result['metrics']['depth_MAE']


def _tensorboard_scalars(directory, prefix: str) -> dict[str, tuple[int, float]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (clu already imported it)
  out = {}
  for path in (directory / 'tensorboard').glob('events.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag.startswith(prefix):
          out[value.tag] = (event.step, float(tf.make_ndarray(value.tensor)))
  return out


def test_input_patches_cut_the_view_into_the_patch_grid():
  """probe.encoder='raw': cell (i, j) holds its p x p block of [rgb, companion, has-a-return]."""
  from lemumo_jax.models import encoders  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rgb = rng.normal(size=(2, 16, 24, 3)).astype(np.float32)
  companion = (rng.random((2, 16, 24, 1)) * (rng.random((2, 16, 24, 1)) < 0.3)).astype(np.float32)
  features = encoders.InputPatches(8).apply({}, rgb, companion, train=False)
  pixels = np.concatenate([rgb, companion, (companion != 0).astype(np.float32)], -1)
  assert features.patches.shape == (2, 2, 3, 8 * 8 * 5)
  for i, j in ((0, 0), (1, 2)):
    np.testing.assert_array_equal(features.patches[:, i, j],
                                  pixels[:, 8 * i:8 * i + 8, 8 * j:8 * j + 8].reshape(2, -1))
  np.testing.assert_allclose(features.cls, np.asarray(features.patches).mean((1, 2)), atol=1e-6)
  with pytest.raises(ValueError, match='multiple of the patch size 8'):
    encoders.InputPatches(8).apply({}, rgb[:, :12], companion[:, :12], train=False)


def test_probe_needs_an_encoder_and_valid_heads(tmp_path):
  config = tiny_config()
  with pytest.raises(FileNotFoundError, match='pretrain first'):
    probe.run(config, str(tmp_path))
  config.probe.encoder = 'random'
  config.probe.heads = ('centernet3d', 'lanes')
  with pytest.raises(ValueError, match='lanes'):
    probe.run(config, str(tmp_path))
  config.probe.encoder = 'imagenet'
  with pytest.raises(ValueError, match="'pretrained', 'random' or 'raw'"):
    probe.run(config, str(tmp_path))


def test_raw_input_patches_reference(tmp_path):
  """probe.encoder='raw' needs no encoder: its own directory and report row."""
  config = tiny_config()
  config.probe.update(encoder='raw', heads=('centernet3d', 'depth'), num_steps=2, val_every=2,
                      robustness=('companion_missing',))
  result = probe.run(config, str(tmp_path))
  assert result['probe_dir'] == str(tmp_path / 'probe_raw')
  payload = json.loads((tmp_path / 'probe_raw' / 'report.json').read_text())
  assert payload['method'] == 'lemumo raw input patches' and payload['training_data'] == 'none'
  assert 0 < result['metrics']['depth_MAE'] < 80 and 'mAP_XY' in result['metrics']
  # The raw patches hold the companion: zeroing it changes what the heads read.
  assert list(payload['robustness']) == ['companion_missing']
  assert result['robustness']['companion_missing']['loss'] != result['metrics']['loss']


def test_flir_style_heads(tmp_path):
  """2D CenterNet + occupancy (the FLIR probe set) on a random encoder: mAP50 and Car mAP50.
  The RGB-only encoder never reads the companion: every robustness condition is n/a."""
  config = tiny_config('lejepa_rgb')
  config.probe.update(encoder='random', heads=('centernet2d', 'occupancy'))
  result = probe.run(config, str(tmp_path))
  assert {'mAP50', 'AP50/car', 'occupancy_IoU'} <= set(result['metrics'])
  payload = json.loads((tmp_path / 'probe_random' / 'report.json').read_text())
  assert list(payload['table'])[:2] == ['mAP50 ↑', 'Car mAP50 ↑']
  assert payload['robustness'] == {name: None for name in robustness.CONDITIONS}
  markdown = (tmp_path / 'probe_random' / 'report.md').read_text()
  assert ('| lejepa_rgb encoder frozen [companion shifted 4 px] | RGB | n/a | n/a | n/a |'
          in markdown)


def test_training_positions_are_the_loader_order():
  """pipeline.training_positions names, batch for batch, the records the rendering loader
  reads (across an epoch boundary and from a resumed start step)."""
  config = tiny_config()
  frames = np.concatenate([b['rgb'] for b in pipeline.probe_eval_loader(
      config.data, pipeline._PretrainFrame(48, 64), 8, split='train')])
  assert len(frames) == config.data.num_train
  loaded = pipeline.pretrain_loader(config.data, 8, seed=5, start_step=3, num_steps=9)
  positions = pipeline.training_positions(len(frames), 8, seed=5, start_step=3, num_steps=9)
  pairs = list(zip(loaded, positions, strict=True))
  assert len(pairs) == 6
  for batch, index in pairs:
    np.testing.assert_array_equal(batch['rgb'], frames[index])


def test_cached_features_give_the_uncached_run(tmp_path):
  """probe.cache_features: same frames per step, same losses and metrics as rendering every
  batch and running the encoder on it; over its memory limit, an error and no probe files."""
  runs = {}
  for cached in (False, True):
    config = tiny_config()
    config.probe.update(encoder='random', cache_features=cached)
    runs[cached] = probe.run(config, str(tmp_path / str(cached)))
  for key in ('history', 'val_history'):
    np.testing.assert_allclose(np.array(runs[True][key]), np.array(runs[False][key]), rtol=1e-5)
  for key, value in runs[False]['metrics'].items():
    np.testing.assert_allclose(runs[True]['metrics'][key], value, rtol=1e-5, atol=1e-6,
                               err_msg=key)
  # Robustness passes re-run the encoder on perturbed frames, never the cached clean grids.
  for name, values in runs[False]['robustness'].items():
    for key, value in values.items():
      np.testing.assert_allclose(runs[True]['robustness'][name][key], value, rtol=1e-5,
                                 atol=1e-6, err_msg=f'{name} {key}')
  assert runs[True]['robustness']['companion_missing']['loss'] != runs[True]['metrics']['loss']
  details = json.loads((tmp_path / 'True' / 'probe_random' / 'report.json').read_text())
  assert details['details']['cached_features'] is True

  config.probe.update(cache_max_gib=1e-4)
  with pytest.raises(ValueError, match=r'32 train \+ 16 val.*cache_max_gib=0.0001'):
    probe.run(config, str(tmp_path / 'small'))
  assert not (tmp_path / 'small').exists()


def _probe_subprocess(python_env, workdir, devices):
  env = dict(python_env, XLA_FLAGS=xla_flags(devices))
  cmd = [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py',
         f'--workdir={workdir}', *TINY_FLAGS, *TINY_PROBE_FLAGS, '--config.mode=probe',
         '--config.probe.encoder=random', '--config.data.num_val=13']
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((workdir / 'probe_random' / 'report.json').read_text())['metrics']


def test_probe_on_four_devices_matches_one(python_env, tmp_path):
  """Batch sharded over 4 CPU devices, val split padded (13 frames, batch 8): same numbers."""
  one = _probe_subprocess(python_env, tmp_path / 'one', 1)
  four = _probe_subprocess(python_env, tmp_path / 'four', 4)
  assert one.keys() == four.keys()
  for key in one:
    if one[key] is None:
      assert four[key] is None, key
    else:
      np.testing.assert_allclose(four[key], one[key], rtol=2e-3, atol=1e-4, err_msg=key)


@pytest.mark.slow
def test_probe_killed_and_rerun_reports_what_an_unbroken_run_reports(python_env, tmp_path):
  """SIGKILL mid-probe (validations and checkpoints every 5 steps, so after a kept best), then
  the same command: it resumes and reports bitwise what an unbroken run reports."""
  resumed, _ = killed_and_unbroken(
      [*TINY_FLAGS, *TINY_PROBE_FLAGS, '--config.mode=probe', '--config.probe.encoder=random',
       '--config.probe.num_steps=40', '--config.probe.val_every=5',
       '--config.probe.checkpoint_every=5', '--config.probe.robustness=()'],
      python_env, tmp_path, 'probe_random/checkpoints/10')
  assert 'Resuming probes from step' in resumed.stdout, resumed.stdout[-3000:]
  reports = [json.loads((tmp_path / name / 'probe_random' / 'report.json').read_text())
             for name in ('killed', 'unbroken')]
  assert reports[0]['metrics'] == reports[1]['metrics']
  assert reports[0]['details']['best_step'] == reports[1]['details']['best_step']


def test_compare_tables_across_runs(tmp_path):
  from lemumo_jax.evaluation import compare  # pylint: disable=g-import-not-at-top
  for name, mae, xy in (('a', 4.7, 0.193), ('b', 6.7, 0.138)):
    report.write_report(str(tmp_path / name),
                        report.ReportRow(f'lejepa_rgb{"" if name == "a" else " encoder frozen"}',
                                         'RGB', {'mAP_XY': xy, 'depth_MAE': mae}), details={})
  rows = compare.load_rows([str(tmp_path / 'a'), str(tmp_path / 'b' / 'report.json')])
  table = compare.write_table(rows, str(tmp_path / 'table1.md'), 'Table 1')
  assert table.splitlines()[2] == '| lejepa_rgb | RGB | **19.3** | **4.700** |'
  assert table.splitlines()[3] == '| lejepa_rgb encoder frozen | RGB | <u>13.8</u> | <u>6.700</u> |'
  assert json.loads((tmp_path / 'table1.json').read_text())[1]['table']['Depth MAE ↓'] == 6.7
  with pytest.raises(FileNotFoundError, match='run the probe stage'):
    compare.load_rows([str(tmp_path / 'missing')])


@pytest.mark.slow
def test_probe_cache_benchmark(python_env, tmp_path):
  """benchmarks/probe_cache.py: both rows, a per-step cost from the two step counts."""
  out = tmp_path / 'rows.json'
  cmd = [sys.executable, '-m', 'benchmarks.probe_cache', '--config=configs/synthetic.py',
         *TINY_FLAGS, *TINY_PROBE_FLAGS, '--config.probe.encoder=random', '--steps=2,4',
         f'--json_out={out}']
  proc = subprocess.run(cmd, cwd=REPO, env=python_env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| cache_features | s / step |' in proc.stdout
  rows = json.loads(out.read_text())
  assert [row['cache_features'] for row in rows] == [False, True]
  assert rows[0]['step_ratio'] == 1.0
  for row in rows:
    assert set(row['wall_s']) == {'2', '4'}
