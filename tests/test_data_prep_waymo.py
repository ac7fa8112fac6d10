"""data_prep/waymo.py on real-format fixtures: TFRecord files of Frame protos."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import fixtures_real_formats as fx
from data_prep import depth
from data_prep import waymo
from lemumo_jax.data import geometry
from lemumo_jax.data import schema

H, W = 32, 48  # half the fixture camera's 64 x 96: one stored pixel = 2 x 2 source pixels


@pytest.fixture(scope='module')
def segments(tmp_path_factory):
  root = tmp_path_factory.mktemp('waymo_raw')
  return [fx.write_waymo_segment(str(root / f'segment-{i}.tfrecord'), 11,
                                 context_name=f'segment-{i}', with_segmentation=(i == 0))
          for i in range(3)]


def _convert(input_glob, output_dir, *extra):
  return waymo.main(['waymo', f'--input_glob={input_glob}', f'--output_dir={output_dir}',
                     f'--image_height={H}', f'--image_width={W}', '--rgb_format=png', *extra])


@pytest.fixture(scope='module')
def converted(segments, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('waymo_out'))
  metadata = _convert(segments[0], out)
  return metadata, fx.read_split(out, 'train')


def test_range_image_points_match_the_waymo_reference():
  from waymo_open_dataset.utils import frame_utils  # TF-based reference implementation
  frame = fx.waymo_frame(0, pixel_pose_jitter=0.01)  # TOP returns moved by per-pixel poses
  range_images, projections, _, top_pose = (
      frame_utils.parse_range_image_and_camera_projection(frame))
  points, cp_points = frame_utils.convert_range_image_to_point_cloud(
      frame, range_images, projections, top_pose)
  calibrations = {c.name: c for c in frame.context.laser_calibrations}
  ours = waymo.lidar_returns(frame, calibrations, 'fixture')
  np.testing.assert_allclose(ours.points, np.concatenate(points), atol=2e-4)
  np.testing.assert_array_equal(ours.projections, np.concatenate(cp_points))
  # The per-pixel poses matter: without them the points differ from the reference.
  assert np.abs(ours.points - waymo.lidar_returns(fx.waymo_frame(0), calibrations,
                                                  'fixture').points).max() > 0.05


def test_every_fifth_frame_is_kept_with_schema_fields(converted):
  metadata, records = converted
  assert [r['meta']['frame'] for r in records] == [0, 5, 10]
  assert metadata['splits'] == {'train': 3}
  assert metadata['dataset'] == 'waymo' and metadata['companion'] == 'depth'
  assert metadata['image_size'] == [H, W]
  assert metadata['classes_3d'] == list(schema.CLASSES_3D)
  assert metadata['seg_classes'][0] == 'ego_vehicle' and len(metadata['seg_classes']) == 28
  meta = records[1]['meta']
  assert meta['scene'] == 'segment-0' and meta['camera'] == 'FRONT'
  assert meta['timestamp'] == 1_550_000_000_000_000 + 500_000
  # Lossless PNG storage: the stored RGB is the JPEG-decoded source, resized by the grid rule.
  source = np.asarray(Image.open(io.BytesIO(fx.waymo_frame(0).images[0].image)).convert('RGB'))
  expected = np.asarray(Image.fromarray(source).resize((W, H), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(records[0]['rgb'], expected)


def _expected_depth(points_vehicle, height, width, projected_pixels=False):
  """{(row, col): depth} for points in the FRONT camera, computed independently."""
  expected = {}
  for point in points_vehicle:
    u, v, z = fx.waymo_pixel(point)
    if projected_pixels:  # Waymo's integer pixel index instead of the pinhole
      u, v = np.round(u), np.round(v)
    scale = height / fx.WAYMO_IMAGE_HW[0]
    col, row = int(np.floor((u + 0.5) * scale)), int(np.floor((v + 0.5) * scale))
    if z > 0 and 0 <= col < width and 0 <= row < height:
      assert (row, col) not in expected, 'fixture points must not share a pixel'
      expected[(row, col)] = z
  return expected


@pytest.mark.parametrize('projection,with_projections', [('auto', True), ('pinhole', True),
                                                      ('auto', False)])
def test_lidar_point_lands_at_expected_pixel_and_depth(segments, tmp_path, projection,
                                                       with_projections):
  segment = segments[0] if with_projections else fx.write_waymo_segment(
      str(tmp_path / 'raw' / 'no-projections.tfrecord'), 1, camera_projections=False)
  # A 0.75 scale, so that half-pixel convention errors move points to other pixels.
  height, width = 48, 72
  waymo.main(['waymo', f'--input_glob={segment}', f'--output_dir={tmp_path / "out"}',
              f'--image_height={height}', f'--image_width={width}', '--max_frames=1',
              f'--projection={projection}'])
  (record,) = fx.read_split(str(tmp_path / 'out'), 'train')
  top = [fx.waymo_expected_point(r, c, rng, fx.WAYMO_TOP_EXTRINSIC, fx.WAYMO_TOP_INCLINATIONS,
                                 fx.WAYMO_TOP_SHAPE[1]) for r, c, rng in fx.WAYMO_TOP_RETURNS]
  if with_projections and projection == 'auto':
    # The fixture's TOP projections are the rounded pinhole pixels; its FRONT laser carries
    # empty projections, i.e. none of its returns is visible in the camera.
    expected = _expected_depth(top, height, width, projected_pixels=True)
  else:
    low, high = fx.WAYMO_FRONT_INCLINATION_RANGE
    rows = fx.WAYMO_FRONT_SHAPE[0]
    uniform = low + (np.arange(rows) + 0.5) / rows * (high - low)
    front = [fx.waymo_expected_point(r, c, rng, fx.WAYMO_FRONT_EXTRINSIC, uniform,
                                     fx.WAYMO_FRONT_SHAPE[1]) for r, c, rng in
             fx.WAYMO_FRONT_RETURNS]
    expected = _expected_depth(top + front, height, width)
  assert len(expected) >= 3
  depth_m, companion = record['depth_target'], record['companion']
  assert set(zip(*np.nonzero(depth_m))) == set(expected)
  for (row, col), z in expected.items():
    assert depth_m[row, col] == pytest.approx(z, abs=1e-4)
    assert companion[row, col] == pytest.approx(z / schema.R_MAX, abs=1e-6)
  f_u, f_v, c_u, c_v = fx.WAYMO_INTRINSIC[:4]
  s = 0.75
  np.testing.assert_allclose(record['intrinsics'], [[f_u * s, 0, (c_u + 0.5) * s],
                                                    [0, f_v * s, (c_v + 0.5) * s], [0, 0, 1]])


def test_laser_boxes_in_camera_frame(converted):
  _, records = converted
  record = records[0]
  np.testing.assert_array_equal(record['boxes3d_cls'], [0, 1])  # car, pedestrian
  np.testing.assert_array_equal(record['boxes2d_cls'], [0, 1])
  cam_from_vehicle = np.linalg.inv(fx.WAYMO_CAMERA_EXTRINSIC)
  for box, (_, center, length, width, height, heading) in zip(record['boxes3d'],
                                                              fx.WAYMO_LABELS[:2]):
    signs = np.array([[a, b, c] for a in (-.5, .5) for b in (-.5, .5) for c in (-.5, .5)])
    corners_v = signs * [length, width, height] @ fx._rz(heading).T + center
    corners_w = corners_v @ cam_from_vehicle[:3, :3].T + cam_from_vehicle[:3, 3]
    corners = np.stack([-corners_w[:, 1], -corners_w[:, 2], corners_w[:, 0]], -1)  # ours
    ours = geometry.box3d_corners(box[None])[0]
    distances = np.linalg.norm(ours[:, None] - corners[None], axis=-1)  # corner order differs
    assert distances.min(0).max() < 1e-4 and distances.min(1).max() < 1e-4
  boxes2d, keep = geometry.boxes3d_to_2d(record['boxes3d'], record['intrinsics'], H, W)
  assert keep.all()
  np.testing.assert_allclose(record['boxes2d'], boxes2d, atol=1e-4)


def test_camera_segmentation_is_remapped_and_resized(converted):
  _, records = converted
  seg = records[0]['seg']
  # Nearest at 2x samples the source pixel under each stored pixel's centre: 2 i + 1.
  semantic = fx.waymo_panoptic_semantic()[1::2, 1::2]
  expected = np.where(semantic == 0, schema.IGNORE_LABEL, semantic - 1)
  np.testing.assert_array_equal(seg, expected)
  assert seg[10, 20] == waymo.SEG_CLASSES.index('sky')
  assert seg[24, 20] == waymo.SEG_CLASSES.index('car')
  assert (seg[:4, :4] == schema.IGNORE_LABEL).all()


def test_frames_without_segmentation_are_ignore(segments, tmp_path):
  _convert(segments[1], str(tmp_path), '--max_frames=1')
  (record,) = fx.read_split(str(tmp_path), 'train')
  assert (record['seg'] == schema.IGNORE_LABEL).all()


def test_resume_sharding_and_corrupt_files(segments, tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  for path in segments:
    shutil.copy(path, raw)
  data = open(segments[0], 'rb').read()
  (raw / 'segment-truncated.tfrecord').write_bytes(data[:len(data) // 2])
  (raw / 'segment-garbage.tfrecord').write_bytes(b'not a tfrecord at all' * 10)
  out = str(tmp_path / 'out')
  pattern = str(raw / '*.tfrecord')

  assert _convert(pattern, out, '--num_shards=2', '--shard_index=0') is None  # shard 1 pending
  assert not os.path.exists(os.path.join(out, 'metadata.json'))
  metadata = _convert(pattern, out, '--num_shards=2', '--shard_index=1')
  shard_units = []
  for i in range(2):
    with open(os.path.join(out, f'train-{i:05d}-of-00002.stats.json')) as f:
      shard_units.append(set(json.load(f)['units']))
  assert not shard_units[0] & shard_units[1]
  assert len(shard_units[0] | shard_units[1]) == 5
  assert metadata['num_skipped'] == {'train': 2}
  assert {os.path.basename(p) for p in metadata['skipped']['train']} == {
      'segment-truncated.tfrecord', 'segment-garbage.tfrecord'}
  assert metadata['splits'] == {'train': 9}  # 3 intact segments x frames 0, 5, 10
  assert len(fx.read_split(out, 'train')) == 9

  shard = os.path.join(out, 'train-00000-of-00002.array_record')
  before = os.stat(shard).st_mtime_ns
  again = _convert(pattern, out, '--num_shards=2')  # both shards finished: nothing redone
  assert os.stat(shard).st_mtime_ns == before
  assert again['splits'] == metadata['splits']
  os.remove(os.path.join(out, 'metadata.json'))
  assert waymo.main(['waymo', f'--output_dir={out}', '--finalize'])['splits'] == {'train': 9}
  with pytest.raises(ValueError, match='num_shards'):
    _convert(pattern, out, '--num_shards=3')


def test_depth_splat_matches_the_shared_renderer():
  rng = np.random.default_rng(0)
  points = rng.uniform([-5, -3, 0.5], [5, 3, 30], size=(400, 3))
  points[200:] = points[:200] * [1, 1, 1.5]  # same rays, farther: must lose the pixel
  k = np.array([[20.0, 0, 24], [0, 20, 16], [0, 0, 1]])
  companion, depth_m = geometry.render_depth(points, k, H, W)
  uv, z = geometry.project_points(points, k)
  ours = depth.render_depth_at_pixels(uv, z, H, W)
  np.testing.assert_array_equal(ours[1], depth_m)
  np.testing.assert_array_equal(ours[0], companion)
