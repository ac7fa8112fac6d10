"""data_prep/waymo.py on real-format fixtures: TFRecord files of Frame protos, built as a TFDS
dataset (data_prep/builder.py) and read back through the training reader."""

import io
import os
import shutil
import stat

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
def raw(tmp_path_factory):
  """manual_dir: three segments in training/ (only segment-0 has camera segmentation)."""
  root = tmp_path_factory.mktemp('waymo_raw')
  for i in range(3):
    fx.write_waymo_segment(str(root / 'training' / f'segment-{i}.tfrecord'), 11,
                           context_name=f'segment-{i}', with_segmentation=(i == 0))
  return root


def _build(manual_dir, data_dir, *, files=('segment-0.tfrecord',), height=H, width=W,
           **kwargs):
  splits = [['train', f'training/{name}'] for name in files]
  return fx.build(waymo.LemumoWaymo, manual_dir, data_dir, height, width, splits=splits,
                  **kwargs)


@pytest.fixture(scope='module')
def converted(raw, tmp_path_factory):
  built = _build(raw, tmp_path_factory.mktemp('waymo_out'))
  return built, fx.read_split(built, 'train')


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
  built, records = converted
  metadata = built.info.metadata
  assert [r['meta']['frame'] for r in records] == [0, 5, 10]
  assert built.info.splits['train'].num_examples == 3
  assert metadata['dataset'] == 'waymo' and metadata['companion'] == 'depth'
  assert metadata['image_size'] == [H, W]
  assert metadata['classes_3d'] == list(schema.CLASSES_3D)
  assert metadata['seg_classes'][0] == 'ego_vehicle' and len(metadata['seg_classes']) == 28
  assert metadata['box_counts_train'] == {'3d': {'car': 3, 'pedestrian': 3},
                                          '2d': {'car': 3, 'pedestrian': 3}}
  assert metadata['without_companion_train'] == 0 and metadata['skipped_train'] == {}
  meta = records[1]['meta']
  assert meta['scene'] == 'segment-0' and meta['camera'] == 'FRONT' and meta['has_companion']
  assert meta['timestamp'] == 1_550_000_000_000_000 + 500_000
  # Lossless PNG storage: the stored RGB is the JPEG-decoded source, resized by the grid rule.
  source = np.asarray(Image.open(io.BytesIO(fx.waymo_frame(0).images[0].image)).convert('RGB'))
  expected = np.asarray(Image.fromarray(source).resize((W, H), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(records[0]['rgb'], expected)


def _expected_depth(points_vehicle, height, width, projected_pixels=False):
  """{(row, col): depth} for points in the FRONT camera, computed independently (Waymo's
  pixel coordinates are continuous with the image edge at 0, as ours are)."""
  expected = {}
  for point in points_vehicle:
    u, v, z = fx.waymo_pixel(point)
    if projected_pixels:  # Waymo's integer pixel index, read as that pixel's centre
      u, v = np.floor(u) + 0.5, np.floor(v) + 0.5
    scale = height / fx.WAYMO_IMAGE_HW[0]
    col, row = int(np.floor(u * scale)), int(np.floor(v * scale))
    if z > 0 and 0 <= col < width and 0 <= row < height:
      assert (row, col) not in expected, 'fixture points must not share a pixel'
      expected[(row, col)] = z
  return expected


@pytest.mark.parametrize('projection,with_projections', [('auto', True), ('pinhole', True),
                                                      ('auto', False)])
def test_lidar_point_lands_at_expected_pixel_and_depth(raw, tmp_path, projection,
                                                       with_projections):
  manual = raw
  files = ('segment-0.tfrecord',)
  if not with_projections:
    manual = tmp_path / 'raw'
    fx.write_waymo_segment(str(manual / 'training' / 'no-projections.tfrecord'), 1,
                           camera_projections=False)
    files = ('no-projections.tfrecord',)
  # A 0.75 scale, so that half-pixel convention errors move points to other pixels.
  height, width = 48, 72
  built = _build(manual, tmp_path / 'out', files=files, height=height, width=width,
                 projection=projection)
  record = fx.read_split(built, 'train')[0]
  top = [fx.waymo_expected_point(r, c, rng, fx.WAYMO_TOP_EXTRINSIC, fx.WAYMO_TOP_INCLINATIONS,
                                 fx.WAYMO_TOP_SHAPE[1]) for r, c, rng in fx.WAYMO_TOP_RETURNS]
  if with_projections and projection == 'auto':
    # The fixture's TOP projections are the pinhole pixels; its FRONT laser carries empty
    # projections, i.e. none of its returns is visible in the camera.
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
  np.testing.assert_allclose(record['intrinsics'], [[f_u * s, 0, c_u * s],
                                                    [0, f_v * s, c_v * s], [0, 0, 1]])


def test_laser_boxes_in_camera_frame(converted):
  _, records = converted
  record = records[0]
  np.testing.assert_array_equal(record['boxes3d_cls'], [0, 1])  # car, pedestrian
  np.testing.assert_array_equal(record['boxes2d_cls'], [0, 1])
  cam_from_vehicle = np.linalg.inv(fx.WAYMO_CAMERA_EXTRINSIC)
  for box, (_, center, length, width, height, heading) in zip(record['boxes3d'],
                                                              fx.WAYMO_LABELS[:2]):
    corners_v = fx.waymo_box_corners(center, length, width, height, heading)
    corners_w = corners_v @ cam_from_vehicle[:3, :3].T + cam_from_vehicle[:3, 3]
    corners = np.stack([-corners_w[:, 1], -corners_w[:, 2], corners_w[:, 0]], -1)  # ours
    ours = geometry.box3d_corners(box[None])[0]
    distances = np.linalg.norm(ours[:, None] - corners[None], axis=-1)  # corner order differs
    assert distances.min(0).max() < 1e-4 and distances.min(1).max() < 1e-4
  # The fixture camera only yaws, so the schema box projects to the same 2D box.
  boxes2d, keep = geometry.boxes3d_to_2d(record['boxes3d'], record['intrinsics'], H, W)
  assert keep.all()
  np.testing.assert_allclose(record['boxes2d'], boxes2d, atol=1e-4)


def _pitched_extrinsic(roll: float, pitch: float) -> np.ndarray:
  """The fixture camera (camera -> vehicle), rolled and pitched about its own axes."""
  def rx(a):
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])

  def ry(a):
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])

  extrinsic = fx.WAYMO_CAMERA_EXTRINSIC.copy()
  extrinsic[:3, :3] = extrinsic[:3, :3] @ ry(pitch) @ rx(roll)
  return extrinsic


def _boxes_from_projected_labels(frame, scale: float) -> np.ndarray:
  """Waymo's own projected_lidar_labels of a frame as [K, 4] x1, y1, x2, y2 at `scale`."""
  (projected,) = frame.projected_lidar_labels
  return np.array([[b.center_x - b.length / 2, b.center_y - b.width / 2,
                    b.center_x + b.length / 2, b.center_y + b.width / 2]
                   for b in (label.box for label in projected.labels)]) * scale


@pytest.mark.parametrize('roll,pitch', [(0.0, 0.0), (0.05, 0.12)])
def test_2d_boxes_match_waymo_projected_labels(tmp_path, roll, pitch):
  """Defects 1 and 2: the 8 vehicle-frame corners through the full (rolled, pitched) camera,
  and Waymo's principal point convention (left image edge at 0), checked against the
  projected_lidar_labels Waymo's camera model writes (here distortion-free)."""
  extrinsic = _pitched_extrinsic(roll, pitch)
  fx.write_waymo_segment(str(tmp_path / 'raw' / 'training' / 'pitched.tfrecord'), 1,
                         camera_extrinsic=extrinsic)
  for height, width, scale in ((64, 96, 1.0), (48, 72, 0.75)):
    built = _build(tmp_path / 'raw', tmp_path / f'out{height}', files=('pitched.tfrecord',),
                   height=height, width=width)
    (record,) = fx.read_split(built, 'train')
    np.testing.assert_array_equal(record['boxes2d_cls'], [0, 1])
    expected = _boxes_from_projected_labels(fx.waymo_frame(0, camera_extrinsic=extrinsic),
                                            scale)
    np.testing.assert_allclose(record['boxes2d'], expected, atol=2e-3)
  if pitch:  # the yaw-only schema box misses the tilt (by 1 source pixel here, 6 on Waymo)
    yaw_only, _ = geometry.boxes3d_to_2d(record['boxes3d'], record['intrinsics'], 48, 72)
    assert np.abs(yaw_only - record["boxes2d"]).max() > 0.5


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


def test_frames_without_segmentation_are_ignore(raw, tmp_path):
  built = _build(raw, tmp_path, files=('segment-1.tfrecord',))
  assert all((r['seg'] == schema.IGNORE_LABEL).all() for r in fx.read_split(built, 'train'))


def test_frames_without_lidar_are_flagged_counted_and_optionally_skipped(raw, tmp_path):
  """Defect 3: a frame without LiDAR returns has an all-zero companion; it is flagged per
  record (meta has_companion) and counted in metadata.json, and can be left out."""
  manual = tmp_path / 'raw'
  shutil.copytree(raw / 'training', manual / 'training')
  fx.write_waymo_segment(str(manual / 'training' / 'no-lidar.tfrecord'), 6, with_lidar=False,
                         context_name='no-lidar')
  files = ('segment-0.tfrecord', 'no-lidar.tfrecord')
  built = _build(manual, tmp_path / 'out', files=files)
  records = fx.read_split(built, 'train')
  flags = {(r['meta']['scene'], r['meta']['frame']): r['meta']['has_companion'] for r in records}
  assert flags == {('no-lidar', 0): False, ('no-lidar', 5): False, ('segment-0', 0): True,
                   ('segment-0', 5): True, ('segment-0', 10): True}
  assert built.info.metadata['without_companion_train'] == 2
  assert all(not r['companion'].any() for r in records if not r['meta']['has_companion'])
  kept = _build(manual, tmp_path / 'skip', files=files, skip_without_companion=True)
  assert [r['meta']['scene'] for r in fx.read_split(kept, 'train')] == ['segment-0'] * 3
  assert kept.info.metadata['without_companion_train'] == 2


def test_bad_inputs_are_named_skipped_and_an_empty_build_fails(raw, tmp_path, caplog):
  """Defect 4: what the input is and what is missing, for each kind of bad file."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  manual = tmp_path / 'raw'
  (manual / 'training').mkdir(parents=True)
  shutil.copy(raw / 'training' / 'segment-0.tfrecord', manual / 'training')
  data = (raw / 'training' / 'segment-1.tfrecord').read_bytes()
  (manual / 'training' / 'truncated.tfrecord').write_bytes(data[:len(data) // 2])
  (manual / 'training' / 'garbage.tfrecord').write_bytes(b'not a tfrecord at all' * 10)
  with tf.io.TFRecordWriter(str(manual / 'training' / 'empty.tfrecord')):
    pass
  with tf.io.TFRecordWriter(str(manual / 'training' / 'not-frames.tfrecord')) as writer:
    writer.write(b'\x08\x01\x10\x02')  # a valid protobuf, but not a Frame
  built = _build(manual, tmp_path / 'out', files=('*.tfrecord',))
  skipped = {os.path.basename(p): reason for p, reason in
             built.info.metadata['skipped_train'].items()}
  assert sorted(skipped) == ['empty.tfrecord', 'garbage.tfrecord', 'not-frames.tfrecord',
                             'truncated.tfrecord']
  assert 'empty TFRecord' in skipped['empty.tfrecord']
  assert 'is not a Waymo Frame' in skipped['not-frames.tfrecord']
  assert 'frame pose' not in skipped['not-frames.tfrecord']
  assert 'DataLossError' in skipped['truncated.tfrecord']
  assert built.info.splits['train'].num_examples == 3

  caplog.clear()
  with pytest.raises(RuntimeError, match=r"\['train'\] hold no record: every input"):
    _build(manual, tmp_path / 'side', files=('segment-0.tfrecord',),
           cameras=['FRONT', 'SIDE_LEFT'])
  (line,) = [l for l in caplog.text.splitlines() if 'SIDE_LEFT image' in l]
  assert "frame 0 has no SIDE_LEFT image (its images: ['FRONT'])" in line
  assert 'corrupt' not in line
  with pytest.raises(RuntimeError, match=r"split\(s\) \['train'\] hold no record"):
    _build(manual, tmp_path / 'none', files=('garbage.tfrecord', 'empty.tfrecord'))
  assert not os.path.exists(tmp_path / 'none' / 'lemumo_waymo' / 'test_32x48' / '1.0.0')
  with pytest.raises(FileNotFoundError, match='no file matches'):
    _build(manual, tmp_path / 'nothing', files=('absent-*.tfrecord',))


def test_outputs_are_readable_by_others_under_the_umask(raw, tmp_path):
  """Defect 5: outputs follow the umask (0644 under 022), not mkstemp's 0600."""
  old = os.umask(0o022)
  try:
    built = _build(raw, tmp_path / 'out')
  finally:
    os.umask(old)
  files = [os.path.join(d, f) for d, _, names in os.walk(built.data_path) for f in names]
  assert any(f.endswith('-00000-of-00001') for f in files)
  for path in files:
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


def test_rebuild_with_other_inputs_or_settings_is_refused(raw, tmp_path):
  """Defect 6: a rerun into an existing dataset with other inputs or settings is refused,
  naming them, unless overwrite; a killed build's incomplete folder is cleaned up."""
  manual = tmp_path / 'raw'
  shutil.copytree(raw / 'training', manual / 'training')
  out = tmp_path / 'out'
  built = _build(manual, out, files=('segment-*.tfrecord',))
  assert built.info.splits['train'].num_examples == 9
  before = os.stat(built.data_path / 'dataset_info.json').st_mtime_ns
  assert _build(manual, out, files=('segment-*.tfrecord',)).info.splits[
      'train'].num_examples == 9  # same inputs and settings: reused as it is
  assert os.stat(built.data_path / 'dataset_info.json').st_mtime_ns == before
  fx.write_waymo_segment(str(manual / 'training' / 'segment-3.tfrecord'), 6)
  with pytest.raises(ValueError, match=r"inputs.units: \{'train': 3\} -> \{'train': 4\}"):
    _build(manual, out, files=('segment-*.tfrecord',))
  os.remove(manual / 'training' / 'segment-3.tfrecord')
  data = (manual / 'training' / 'segment-2.tfrecord').read_bytes()
  (manual / 'training' / 'segment-2.tfrecord').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='inputs.units_sha256'):  # same names, other contents
    _build(manual, out, files=('segment-*.tfrecord',))
  (manual / 'training' / 'segment-2.tfrecord').write_bytes(data)
  fx.write_waymo_segment(str(manual / 'training' / 'segment-3.tfrecord'), 6)
  with pytest.raises(ValueError, match='settings.options'):
    _build(manual, out, files=('segment-[012].tfrecord',), frame_stride=2)
  stale = built.data_path.parent / 'incomplete.ABC123_1.0.0'
  stale.mkdir()
  (stale / 'half-written').write_bytes(b'x')
  rebuilt = _build(manual, out, files=('segment-*.tfrecord',), overwrite=True)
  assert rebuilt.info.splits['train'].num_examples == 11
  assert not stale.exists()


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
