"""CenterNet targets: encode -> decode round trips, heatmap geometry, losses vs float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lemumo_jax.data import geometry
from lemumo_jax.tasks import centernet
from lemumo_jax.evaluation import metrics

IMAGE_HW = (224, 224)
OUTPUT_HW = (28, 28)  # 14x14 patches upsampled 2x: stride 8
INTRINSICS = np.array([[250.0, 0.0, 110.0], [0.0, 250.0, 95.0], [0.0, 0.0, 1.0]])
# x, y, z, l, w, h, yaw; class. The last two have no target: behind the camera, out of view.
BOXES = np.array([
    [2.0, 1.0, 15.0, 4.5, 1.8, 1.5, 0.3],
    [-3.1, 0.8, 8.0, 0.8, 0.7, 1.8, -1.2],
    [5.3, 1.1, 26.0, 1.8, 0.6, 1.7, -2.9],
    [-6.0, 1.2, 30.5, 4.2, 1.9, 1.6, 3.0],
    [1.0, 1.0, -6.0, 4.0, 1.8, 1.5, 0.0],
    [40.0, 1.0, 10.0, 4.0, 1.8, 1.5, 0.0],
])
CLASSES = np.array([0, 1, 2, 0, 0, 1])
NUM_VISIBLE = 4


def _perfect_maps(targets, keys_dims):
  """Prediction maps [h, w, D] holding each target at its object's cell, zeros elsewhere."""
  maps = {}
  for key, dim in keys_dims.items():
    flat = np.zeros((OUTPUT_HW[0] * OUTPUT_HW[1], dim), np.float32)
    slots = targets['mask'] > 0
    flat[targets['index'][slots]] = targets[key][slots]
    maps[key] = flat.reshape(*OUTPUT_HW, dim)
  return maps


def _wrap(angle):
  return (angle + np.pi) % (2 * np.pi) - np.pi


def test_gaussian_radius_hand_value():
  # 10 x 10 box, overlap 0.7: case 3 gives (-2 * 0.7 * 20 + sqrt(28^2 + 4 * 2.8 * 30)) / 2
  # = (-28 + sqrt(1120)) / 2; cases 1 and 2 give 19.08 and 36.73.
  assert centernet.gaussian_radius(10, 10) == pytest.approx((-28 + np.sqrt(1120)) / 2, rel=1e-12)
  assert centernet.gaussian_radius(10, 10) == pytest.approx(2.7332, abs=1e-4)


def test_encode_3d_heatmap_peaks_at_projected_centre():
  targets = centernet.encode_targets_3d(BOXES, CLASSES, INTRINSICS, IMAGE_HW, OUTPUT_HW, 3,
                                        max_objects=8)
  heatmap = targets['heatmap']
  assert heatmap.shape == (28, 28, 3) and heatmap.dtype == np.float32
  assert targets['mask'].tolist() == [1.0] * NUM_VISIBLE + [0.0] * 4
  uv, _ = geometry.project_points(BOXES[:NUM_VISIBLE, :3], INTRINSICS)
  boxes2d, _ = geometry.boxes3d_to_2d(BOXES[:NUM_VISIBLE], INTRINSICS, *IMAGE_HW)
  for i, (u, v) in enumerate(uv):
    col, row = int(u // 8), int(v // 8)
    channel = heatmap[..., CLASSES[i]]
    assert channel[row, col] == 1.0
    assert targets['index'][i] == row * 28 + col
    np.testing.assert_allclose(targets['offset'][i], [u / 8 - col, v / 8 - row], atol=1e-6)
    # Next cell along x holds the Gaussian at distance 1 with CenterNet's radius.
    height, width = (boxes2d[i, 3] - boxes2d[i, 1]) / 8, (boxes2d[i, 2] - boxes2d[i, 0]) / 8
    radius = int(centernet.gaussian_radius(height, width))
    sigma = (2 * radius + 1) / 6
    expected = np.exp(-1 / (2 * sigma**2)) if radius else 0.0
    assert channel[row, col + 1] == pytest.approx(expected, rel=1e-6)
  assert np.sum(heatmap == 1.0) == NUM_VISIBLE
  np.testing.assert_allclose(targets['depth'][:NUM_VISIBLE, 0], np.log(BOXES[:NUM_VISIBLE, 2]),
                             rtol=1e-6)


def test_3d_round_trip_recovers_boxes():
  targets = centernet.encode_targets_3d(BOXES, CLASSES, INTRINSICS, IMAGE_HW, OUTPUT_HW, 3,
                                        max_objects=8)
  maps = _perfect_maps(targets, {'offset': 2, 'size': 3, 'depth': 1, 'yaw': 2})
  boxes, scores, classes = centernet.decode_3d(targets['heatmap'], maps['offset'], maps['size'],
                                               maps['depth'], maps['yaw'], INTRINSICS, IMAGE_HW,
                                               k=50, score_threshold=0.5)
  assert boxes.shape == (NUM_VISIBLE, 7) and np.all(scores == 1.0)
  order = np.argsort(boxes[:, 2])
  expected = BOXES[:NUM_VISIBLE][np.argsort(BOXES[:NUM_VISIBLE, 2])]
  boxes, classes = boxes[order], classes[order]
  np.testing.assert_array_equal(classes, CLASSES[:NUM_VISIBLE][np.argsort(BOXES[:NUM_VISIBLE,
                                                                                2])])
  np.testing.assert_allclose(boxes[:, :3], expected[:, :3], atol=1e-3)
  np.testing.assert_allclose(boxes[:, 3:6], expected[:, 3:6], rtol=1e-5)
  np.testing.assert_allclose(_wrap(boxes[:, 6] - expected[:, 6]), 0, atol=1e-5)
  # Through the metric: the round trip is a perfect detector.
  result = metrics.center_distance_ap([{'boxes': boxes, 'scores': scores, 'classes': classes}],
                                      [{'boxes': BOXES[:4], 'classes': CLASSES[:4]}])
  assert result['mAP'] == pytest.approx(1.0)


def test_yaw_target_is_observation_angle():
  # The same heading seen along different rays gives different alpha targets.
  boxes = np.array([[-4.0, 1.0, 10.0, 4.0, 1.8, 1.5, 0.5], [4.0, 1.0, 10.0, 4.0, 1.8, 1.5, 0.5]])
  targets = centernet.encode_targets_3d(boxes, [0, 0], INTRINSICS, IMAGE_HW, OUTPUT_HW, 1, 4)
  alpha = np.arctan2(targets['yaw'][:2, 0], targets['yaw'][:2, 1])
  np.testing.assert_allclose(alpha, 0.5 - np.arctan2(boxes[:, 0], boxes[:, 2]), atol=1e-6)


def test_max_objects_limits_slots_not_heatmap():
  targets = centernet.encode_targets_3d(BOXES, CLASSES, INTRINSICS, IMAGE_HW, OUTPUT_HW, 3,
                                        max_objects=2)
  assert targets['mask'].tolist() == [1.0, 1.0]
  assert np.sum(targets['heatmap'] == 1.0) == NUM_VISIBLE
  empty = centernet.encode_targets_3d(np.zeros((0, 7)), np.zeros(0, int), INTRINSICS, IMAGE_HW,
                                      OUTPUT_HW, 3, max_objects=2)
  assert not empty['heatmap'].any() and not empty['mask'].any()
  with pytest.raises(ValueError, match='classes'):
    centernet.encode_targets_3d(BOXES, CLASSES + 1, INTRINSICS, IMAGE_HW, OUTPUT_HW, 2)


def test_2d_round_trip_and_nms():
  boxes = np.array([[10.0, 20.0, 60.0, 90.0], [120.5, 40.25, 200.0, 70.0], [3.0, 150.0, 20.0,
                                                                           223.0]])
  classes = np.array([1, 0, 1])
  targets = centernet.encode_targets_2d(boxes, classes, IMAGE_HW, OUTPUT_HW, 2, max_objects=5)
  maps = _perfect_maps(targets, {'offset': 2, 'wh': 2})
  decoded, scores, decoded_cls = centernet.decode_2d(targets['heatmap'], maps['offset'],
                                                     maps['wh'], IMAGE_HW, score_threshold=0.5)
  order = np.argsort(decoded[:, 0])
  np.testing.assert_allclose(decoded[order], boxes[np.argsort(boxes[:, 0])], atol=1e-3)
  np.testing.assert_array_equal(decoded_cls[order], classes[np.argsort(boxes[:, 0])])
  assert np.all(scores == 1.0)
  # 3x3 NMS: a blob keeps only its peak; a separate weaker peak survives; top-k truncates.
  heat = np.zeros((8, 8, 1))
  heat[2:5, 2:5, 0] = 0.5
  heat[3, 3, 0] = 0.9
  heat[6, 6, 0] = 0.3
  scores, classes, rows, cols = centernet.heatmap_peaks(heat, k=5, score_threshold=0.1)
  np.testing.assert_allclose(scores, [0.9, 0.3])
  assert rows.tolist() == [3, 6] and cols.tolist() == [3, 6]
  assert centernet.heatmap_peaks(heat, k=1, score_threshold=0.1)[0].tolist() == [0.9]


def _focal_numpy(logits, target):
  p = np.clip(1 / (1 + np.exp(-logits.astype(np.float64))), 1e-4, 1 - 1e-4)
  pos = target == 1
  pos_loss = np.sum(np.log(p) * (1 - p)**2 * pos)
  neg_loss = np.sum(np.log(1 - p) * p**2 * (1 - target)**4 * ~pos)
  return -(pos_loss + neg_loss) / max(pos.sum(), 1)


def test_focal_loss_matches_numpy():
  rng = np.random.default_rng(0)
  target = np.stack([centernet.encode_targets_3d(BOXES[i:i + 2], CLASSES[i:i + 2], INTRINSICS,
                                                 IMAGE_HW, OUTPUT_HW, 3)['heatmap']
                     for i in (0, 2)])
  logits = rng.normal(-2, 3, target.shape).astype(np.float32)
  logits[0, 0, 0, 0] = 40.0  # beyond CenterNet's clamp
  logits[1, 5, 5, 1] = -40.0
  loss_fn = jax.jit(centernet.focal_heatmap_loss)
  assert float(loss_fn(logits, target)) == pytest.approx(_focal_numpy(logits, target), rel=1e-5)
  no_pos = np.minimum(target, 0.9)
  assert float(loss_fn(logits, no_pos)) == pytest.approx(_focal_numpy(logits, no_pos), rel=1e-5)
  grad = jax.grad(centernet.focal_heatmap_loss)(jnp.asarray(logits), jnp.asarray(target))
  assert np.all(np.isfinite(grad))
  with pytest.raises(ValueError, match='shape'):
    centernet.focal_heatmap_loss(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 3, 4, 4)))


def test_masked_l1_matches_numpy():
  rng = np.random.default_rng(1)
  pred = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  index = rng.integers(0, 30, (2, 4))
  target = rng.normal(size=(2, 4, 3)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
  gathered = pred.reshape(2, 30, 3)[np.arange(2)[:, None], index]
  expected = np.sum(np.abs(gathered - target) * mask[..., None]) / (mask.sum() * 3 + 1e-4)
  loss = centernet.masked_l1_loss(jnp.asarray(pred), jnp.asarray(index), jnp.asarray(target),
                                  jnp.asarray(mask))
  assert float(loss) == pytest.approx(expected, rel=1e-5)
