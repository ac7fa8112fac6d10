"""Tests of the procedural driving scenes (lemumo_jax/data/synthetic.py)."""

import numpy as np
import pytest

from lemumo_jax.data import geometry
from lemumo_jax.data import schema
from lemumo_jax.data import synthetic

H, W = 96, 128  # the default size: LiDAR sparsity depends on pixels per degree
SEG = {name: i for i, name in enumerate(synthetic.SEG_CLASSES)}


@pytest.fixture(scope='module')
def depth_scenes():
  source = synthetic.SyntheticScenes(64, height=H, width=W, seed=3)
  return [source.render(i) for i in range(12)]


def _local_coords(boxes, points):
  """points [P, 3] in every box's frame -> [B, P, 3], via the corner edges (not rotation_y)."""
  corners = geometry.box3d_corners(boxes)  # [B, 8, 3], corner index = 4 sx + 2 sy + sz
  origin = corners[:, 0]
  axes = np.stack([corners[:, 4] - origin, corners[:, 2] - origin, corners[:, 1] - origin], 1)
  lengths = np.linalg.norm(axes, axis=-1)  # [B, 3] = l, h, w
  rel = points[None] - origin[:, None]  # [B, P, 3]
  return np.einsum('bpk,bak->bpa', rel, axes / lengths[..., None]), lengths


def test_records_match_schema():
  for companion in synthetic.COMPANIONS:
    source = synthetic.SyntheticScenes(5, height=H, width=W, companion=companion)
    assert len(source) == 5
    for i in range(len(source)):
      record = source[i]
      schema.validate(record)
      assert record['rgb'].shape == (H, W, 3) and record['companion'].shape == (H, W)
      assert record['boxes3d'].shape[0] == record['boxes2d'].shape[0] >= 1
      np.testing.assert_array_equal(record['boxes3d_cls'], record['boxes2d_cls'])
      assert record['seg'].max() < len(synthetic.SEG_CLASSES)
      assert 0.0 <= record['companion'].min() and record['companion'].max() <= 1.0
      assert record['meta'] == {'dataset': 'synthetic', 'scene': f'train-{i}', 'frame': i,
                                'camera': 'FRONT', 'timestamp': i}
      k = record['intrinsics']
      assert 0.9 * W <= k[0, 0] <= 1.3 * W and k[0, 0] == k[1, 1] and k[2, 2] == 1
  with pytest.raises(IndexError):
    source[5]
  with pytest.raises(ValueError, match='companion'):
    synthetic.SyntheticScenes(1, companion='radar')


def test_metadata():
  meta = synthetic.metadata(num_train=10, num_val=2, height=H, width=W, companion='thermal')
  assert meta == {'dataset': 'synthetic', 'splits': {'train': 10, 'val': 2},
                  'classes_3d': ['car', 'pedestrian', 'cyclist'],
                  'classes_2d': ['car', 'pedestrian', 'cyclist'],
                  'seg_classes': list(synthetic.SEG_CLASSES), 'companion': 'thermal',
                  'image_size': [H, W]}


def test_records_are_pure_functions_of_seed_split_index():
  first = synthetic.SyntheticScenes(4, height=H, width=W, seed=7)[2]
  again = synthetic.SyntheticScenes(9, height=H, width=W, seed=7)[2]
  for key in schema.FIELDS:
    np.testing.assert_array_equal(first[key], again[key], err_msg=key)
  others = [synthetic.SyntheticScenes(4, height=H, width=W, seed=7)[3],
            synthetic.SyntheticScenes(4, height=H, width=W, seed=7, split='val')[2],
            synthetic.SyntheticScenes(4, height=H, width=W, seed=8)[2]]
  for other in others:
    assert not np.array_equal(first['rgb'], other['rgb'])
    assert not np.array_equal(first['depth_target'], other['depth_target'])


def test_object_range_bounds_object_distance():
  for near, far in ((4.0, 12.0), (30.0, 60.0)):
    source = synthetic.SyntheticScenes(16, height=H, width=W, seed=5, object_range=(near, far))
    z = np.concatenate([source[i]['boxes3d'][:, 2] for i in range(len(source))])
    assert z.size >= 16
    # Objects are placed at a distance along the (curved) road and offset across it, which moves
    # the camera-frame z by at most a couple of metres.
    assert near - 2.5 <= z.min() and z.max() <= far + 2.5, (near, far, z.min(), z.max())
  with pytest.raises(ValueError, match='object_range'):
    synthetic.SyntheticScenes(1, object_range=(20.0, 10.0))


def test_lidar_agrees_with_depth_target(depth_scenes):
  noise = synthetic.LIDAR_NOISE_M
  for record, extras in depth_scenes:
    companion, depth, seg = record['companion'], record['depth_target'], record['seg']
    returns = companion > 0
    assert 0.02 < returns.mean() < 0.6
    # A return lands anywhere inside its pixel while depth_target is sampled at the pixel
    # centre, so allow the depth change to the neighbouring pixels on top of the noise;
    # at occlusion edges that change is large and the pixel is effectively excused.
    padded = np.pad(depth, 1, mode='edge')
    spread = np.max(np.abs(np.stack([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2],
                                     padded[1:-1, 2:]]) - depth), axis=0)
    error = np.abs(companion * schema.R_MAX - depth)
    agree = error <= 4 * noise + 0.5 * spread
    assert agree[returns].mean() > 0.95
    assert np.median(error[returns & (spread < 0.02)]) < min(2 * noise, 0.04)
    # Rays into the sky return nothing: every point lies on the ground or on a box surface.
    scene = extras['scene']
    points = extras['lidar_points']
    on_ground = np.abs(points[:, 1] - scene.cam_height) < 5 * noise
    local, extent = _local_coords(scene.boxes, points)
    inside = np.all((local > -5 * noise) & (local < extent[:, None] + 5 * noise), -1)
    assert np.all(on_ground | inside.any(0))
    # Sky pixels only see returns of structures thinner than a pixel (far poles, trunks).
    assert (returns & (seg == SEG['sky'])).sum() <= 0.01 * (seg == SEG['sky']).sum() + 2


def test_boxes_agree_with_pixels(depth_scenes):
  checked_centres = 0
  for record, extras in depth_scenes:
    boxes3d, boxes2d = record['boxes3d'].astype(np.float64), record['boxes2d']
    uv, _ = geometry.project_points(boxes3d[:, :3], record['intrinsics'])
    instance, depth, seg = extras['instance'], record['depth_target'], record['seg']
    for j, (box3d, box2d, cls) in enumerate(zip(boxes3d, boxes2d, record['boxes3d_cls'])):
      rows, cols = np.nonzero(instance == j)
      assert rows.size >= 4, 'a labelled object must be visible'
      x1, y1, x2, y2 = box2d
      # Every visible pixel centre of the object lies in its 2D box.
      assert np.all((cols + 0.5 >= x1 - 1e-3) & (cols + 0.5 <= x2 + 1e-3)
                    & (rows + 0.5 >= y1 - 1e-3) & (rows + 0.5 <= y2 + 1e-3))
      assert np.all(seg[rows, cols] == SEG[synthetic.CLASSES_3D[cls]])
      if cls == 0:
        assert np.any(seg[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] == SEG['car'])
      u, v = uv[j]
      if 0 <= u < W and 0 <= v < H:
        assert x1 <= u <= x2 and y1 <= v <= y2
        if instance[int(v), int(u)] == j:  # not hidden behind another object
          checked_centres += 1
          front = depth[int(v), int(u)]
          reach = 0.5 * np.hypot(box3d[3], box3d[4])
          assert box3d[2] - reach - 1e-3 <= front <= box3d[2] + 1e-3
      # Boxes rest on the ground plane.
      assert box3d[1] + box3d[5] / 2 == pytest.approx(extras['scene'].cam_height, abs=1e-4)
  assert checked_centres >= 10


def _contrasts(record, instance):
  """Per labelled object: |mean RGB of its pixels - mean RGB of the rest of its 2D box|."""
  rgb = record['rgb'].astype(np.float64) / 255
  out = []
  for j, (x1, y1, x2, y2) in enumerate(record['boxes2d']):
    window = (slice(max(int(y1) - 2, 0), int(np.ceil(y2)) + 2),
              slice(max(int(x1) - 2, 0), int(np.ceil(x2)) + 2))
    mask = instance[window] == j
    if mask.sum() < 4 or (~mask).sum() < 4:
      out.append(np.nan)
      continue
    out.append(np.abs(rgb[window][mask].mean(0) - rgb[window][~mask].mean(0)).mean())
  return np.array(out)


def test_fog_hides_far_objects_from_rgb_but_not_from_lidar():
  # Objects out to 60 m: the fog must hide the far ones (the default range stops at 30 m).
  kwargs = dict(height=H, width=W, seed=11, night_probability=0.0, object_range=(4.0, 60.0))
  foggy = synthetic.SyntheticScenes(64, fog_probability=1.0, **kwargs)
  clear = synthetic.SyntheticScenes(64, fog_probability=0.0, **kwargs)
  near, far, far_clear = [], [], []
  for i in range(12):
    record, extras = foggy.render(i)
    record_clear, extras_clear = clear.render(i)
    assert extras['fog_beta'] > 0 and extras_clear['fog_beta'] == 0
    # Fog is an RGB-only effect: same scene, same LiDAR.
    np.testing.assert_array_equal(record['companion'], record_clear['companion'])
    np.testing.assert_array_equal(record['boxes3d'], record_clear['boxes3d'])
    contrast = _contrasts(record, extras['instance'])
    contrast_clear = _contrasts(record_clear, extras['instance'])
    for j, box in enumerate(record['boxes3d']):
      if np.isnan(contrast[j]):
        continue
      if box[2] < 15:
        near.append(contrast[j])
      elif box[2] > 40:
        far.append(contrast[j])
        far_clear.append(contrast_clear[j])
        pixels = extras['instance'] == j
        assert np.any(record['companion'][pixels] > 0), 'LiDAR must still see far objects'
  assert len(near) >= 3 and len(far) >= 3
  assert np.mean(far) < 0.25 * np.mean(near)
  assert np.mean(far) < 0.25 * np.mean(far_clear)


def test_thermal_companion():
  source = synthetic.SyntheticScenes(64, height=H, width=W, companion='thermal', seed=5)
  people, road, sky = [], [], []
  for i in range(8):
    record = source[i]
    thermal, seg = record['companion'], record['seg']
    assert thermal.dtype == np.float32 and 0 <= thermal.min() and thermal.max() <= 1
    people.extend(thermal[seg == SEG['pedestrian']])
    road.extend(thermal[seg == SEG['road']])
    sky.extend(thermal[seg == SEG['sky']])
  assert len(people) > 20
  assert np.mean(people) > np.mean(road) + 0.15 > np.mean(sky) + 0.3


def test_intersect_boxes_against_brute_force_marching():
  rng = np.random.default_rng(0)
  boxes = np.array([[1.0, 0.5, 8.0, 4.0, 2.0, 1.5, 0.7],    # yawed car-like box
                    [-3.0, -1.0, 1.0, 3.0, 6.0, 4.0, -0.3],  # straddles the origin's z plane
                    [0.5, 0.0, 20.0, 10.0, 3.0, 6.0, 2.5]])  # behind the first from some rays
  origin = np.array([0.2, -0.3, 0.0])
  targets = np.concatenate([
      boxes[rng.integers(0, 3, 150), :3] + rng.uniform(-2.5, 2.5, (150, 3)),
      rng.uniform([-15, -8, 1], [15, 8, 25], (50, 3))])
  dirs = targets - origin
  dirs = dirs[dirs[:, 2] > 0.05]
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  t, index = geometry.intersect_boxes(origin, dirs, boxes)
  assert np.sum(index >= 0) > 100 and np.sum(index < 0) > 5

  step = 0.002
  ts = np.arange(step / 2, 40.0, step)
  first_inside = np.full(dirs.shape[0], np.inf)
  for p in range(dirs.shape[0]):
    local, extent = _local_coords(boxes, origin + ts[:, None] * dirs[p])
    inside = np.all((local >= 0) & (local <= extent[:, None]), -1).any(0)
    if inside.any():
      first_inside[p] = ts[np.argmax(inside)]
  hits = index >= 0
  # Nothing of any box lies before the reported entry, and marching enters within one step.
  assert np.all(first_inside[hits] >= t[hits] - 1e-9)
  marched = hits & np.isfinite(first_inside)
  assert np.all(first_inside[marched] - t[marched] <= step)
  assert marched.sum() >= hits.sum() - 2  # only chords shorter than a step can be missed
  assert np.all(np.isinf(first_inside[~hits]))
  # The entry point lies on the surface of the reported box.
  local, extent = _local_coords(boxes, origin + t[hits, None] * dirs[hits])
  local = local[index[hits], np.arange(hits.sum())]
  extent = extent[index[hits]]
  assert np.all((local > -1e-9) & (local < extent + 1e-9))
  assert np.all(np.min(np.minimum(np.abs(local), np.abs(extent - local)), 1) < 1e-9)


def test_configs_import_nothing_from_the_package():
  """configs/ stays plain config (readable without the package): the synthetic default range
  is written there, and must equal the generator's OBJECT_RANGE."""
  import ast  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for path in glob.glob(os.path.join(repo, 'configs', '*.py')):
    for node in ast.walk(ast.parse(open(path).read())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n.startswith('lemumo_jax') for n in names), (path, names)
  assert tuple(common.base_config().data.object_range) == synthetic.OBJECT_RANGE
