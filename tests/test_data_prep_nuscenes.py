"""data_prep/nuscenes.py on a v1.0-mini-style table set loaded by nuscenes-devkit, built as a
TFDS dataset."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.geometry_utils import BoxVisibility
from nuscenes.utils.geometry_utils import view_points

import fixtures_real_formats as fx
from data_prep import nuscenes as nusc_prep
from lemumo_jax.data import schema
from lemumo_jax.data import sources

H, W = 45, 80  # half the fixture camera's 90 x 160


def _build(dataroot, data_dir, **kwargs):
  splits = kwargs.pop('splits', [['train', 'mini_train'], ['val', 'mini_val']])
  return fx.build(nusc_prep.LemumoNuscenes, dataroot, data_dir, H, W,
                  version=fx.NUSC_VERSION, splits=splits, **kwargs)


@pytest.fixture(scope='module')
def dataroot(tmp_path_factory):
  return fx.write_nuscenes(str(tmp_path_factory.mktemp('nuscenes_raw')))


@pytest.fixture(scope='module')
def converted(dataroot, tmp_path_factory):
  built = _build(dataroot, tmp_path_factory.mktemp('nuscenes_out'))
  return built, fx.read_split(built, 'train'), fx.read_split(built, 'val')


def test_splits_and_metadata(converted):
  built, train, val = converted
  metadata = built.info.metadata
  assert {k: v.num_examples for k, v in built.info.splits.items()} == {'train': 4, 'val': 2}
  assert [(r['meta']['scene'], r['meta']['frame']) for r in train] == [
      ('scene-0061', 0), ('scene-0061', 1), ('scene-0553', 0), ('scene-0553', 1)]
  assert {r['meta']['scene'] for r in val} == {'scene-0103'}
  assert metadata['dataset'] == 'nuscenes' and metadata['image_size'] == [H, W]
  assert metadata['seg_classes'] == list(nusc_prep.SEG_CLASSES)
  assert metadata['box_counts_train']['3d'] == {'car': 4, 'pedestrian': 8, 'cyclist': 4}
  assert metadata['inputs']['units'] == {'train': 2, 'val': 1}
  assert all(r['meta']['camera'] == 'CAM_FRONT' for r in train)


def _expected_pixel(u, v):
  return int(np.floor((v + 0.5) * H / fx.NUSC_IMAGE_HW[0])), int(np.floor((u + 0.5) * W /
                                                                           fx.NUSC_IMAGE_HW[1]))


def test_lidar_points_land_at_expected_pixels_with_depth_and_label(converted):
  _, train, _ = converted
  record = train[0]
  # Nearest point per pixel, in front of the camera and beyond the 1 m minimum depth.
  expected = {}
  for u, v, d, label in sorted(fx.NUSC_POINTS, key=lambda p: -p[2]):
    if d >= 1.0:
      expected[_expected_pixel(u, v)] = (d, label)
  assert len(expected) == 3
  assert set(zip(*np.nonzero(record['depth_target']))) == set(expected)
  coarse = {'vehicle.car': 'car', 'flat.driveable_surface': 'driveable_surface'}
  for (row, col), (d, label) in expected.items():
    assert record['depth_target'][row, col] == pytest.approx(d, abs=1e-3)
    assert record['companion'][row, col] == pytest.approx(d / schema.R_MAX, abs=1e-5)
    want = nusc_prep.SEG_CLASSES.index(coarse[label]) if label in coarse else 255
    assert record['seg'][row, col] == want
  assert np.count_nonzero(record['seg'] != schema.IGNORE_LABEL) == 2  # 'noise' is ignore
  k = np.asarray(fx.NUSC_INTRINSIC)
  np.testing.assert_allclose(record['intrinsics'], [[k[0, 0] / 2, 0, (k[0, 2] + 0.5) / 2],
                                                    [0, k[1, 1] / 2, (k[1, 2] + 0.5) / 2],
                                                    [0, 0, 1]])


def test_boxes_in_camera_frame_with_class_mapping(converted):
  _, train, _ = converted
  record = train[1]
  # car, pedestrian, cyclist and the pedestrian at the image edge; the riderless bicycle, the
  # barrier and the car behind the camera are dropped.
  np.testing.assert_array_equal(record['boxes3d_cls'], [0, 1, 2, 1])
  expected = np.array([[*center, length, width, height, yaw] for _, _, center, length, width,
                       height, yaw in [*fx.NUSC_BOXES[:3], fx.NUSC_BOXES[6]]])
  np.testing.assert_allclose(record['boxes3d'], expected, atol=1e-4)  # pitch/roll keep the yaw
  np.testing.assert_array_equal(record['boxes2d_cls'], [0, 1, 2, 1])


def _devkit_boxes2d(nusc, sample_token: str) -> tuple[np.ndarray, np.ndarray]:
  """The devkit's projection of each kept annotation's true corners (Box.corners() in the
  camera frame from NuScenes.get_sample_data, view_points with the calibrated intrinsics),
  moved to the stored grid and clipped and kept as the builder does: ([N, 4], [N] classes)."""
  camera_token = nusc.get('sample', sample_token)['data']['CAM_FRONT']
  _, boxes, k = nusc.get_sample_data(camera_token, box_vis_level=BoxVisibility.NONE)
  (src_h, src_w), out, classes = fx.NUSC_IMAGE_HW, [], []
  for box in boxes:
    annotation = nusc.get('sample_annotation', box.token)
    cls = nusc_prep.box_class(box.name, [nusc.get('attribute', t)['name']
                                         for t in annotation['attribute_tokens']])
    corners = box.corners()
    u, v = view_points(corners, k, normalize=True)[:2]
    u, v = (u + 0.5) * W / src_w, (v + 0.5) * H / src_h  # OpenCV pixels -> the stored grid
    x1, x2 = np.clip([u.min(), u.max()], 0, W)
    y1, y2 = np.clip([v.min(), v.max()], 0, H)
    if cls is not None and np.all(corners[2] > 0.1) and x2 - x1 > 1 and y2 - y1 > 1:
      out.append([x1, y1, x2, y2])
      classes.append(cls)
  return np.array(out).reshape(-1, 4), np.array(classes)


def test_2d_boxes_are_the_devkits_projection_of_the_true_corners(dataroot, converted):
  """The fixture's boxes are pitched and rolled relative to the camera (up to 6 degrees), so an
  upright box about the camera's y axis misses by ~0.4 px here and drops the edge pedestrian."""
  _, train, val = converted
  with contextlib.redirect_stdout(io.StringIO()):
    nusc = NuScenes(fx.NUSC_VERSION, dataroot, verbose=False)
  samples = {(s['name'], i): token for s in nusc.scene
             for i, token in enumerate(_sample_tokens(nusc, s))}
  for record in train + val:
    boxes, classes = _devkit_boxes2d(nusc, samples[record['meta']['scene'],
                                                   record['meta']['frame']])
    np.testing.assert_array_equal(record['boxes2d_cls'], classes)
    # float32 storage of pixel coordinates below 80: ~1e-5 px; the issue asked for 0.05 px
    np.testing.assert_allclose(record['boxes2d'], boxes, atol=1e-4, rtol=0)


def _sample_tokens(nusc, scene) -> list[str]:
  tokens, token = [], scene['first_sample_token']
  while token:
    tokens.append(token)
    token = nusc.get('sample', token)['next']
  return tokens


def test_without_lidarseg_the_seg_map_is_ignore(tmp_path):
  root = fx.write_nuscenes(str(tmp_path / 'raw'), with_lidarseg=False)
  built = _build(root, tmp_path / 'out', splits=[['val', 'mini_val']])
  (first, _) = fx.read_split(built, 'val')
  assert (first['seg'] == schema.IGNORE_LABEL).all()
  assert np.count_nonzero(first['depth_target']) == 3


def test_corrupt_files_are_skipped_one_sample_at_a_time(dataroot, tmp_path):
  root = str(tmp_path / 'raw')
  shutil.copytree(dataroot, root)
  tables = os.path.join(root, fx.NUSC_VERSION)
  with open(os.path.join(tables, 'sample_data.json')) as f:
    sample_data = json.load(f)
  lidar = sorted(sd['filename'] for sd in sample_data if 'LIDAR_TOP' in sd['filename'])
  camera = sorted(sd['filename'] for sd in sample_data if 'CAM_FRONT' in sd['filename'])
  # Files in timestamp order: scene-0061 samples 0, 1, scene-0553 samples 0, 1, scene-0103...
  with open(os.path.join(root, lidar[0]), 'r+b') as f:
    f.truncate(30)  # not a whole number of 5-float points
  os.remove(os.path.join(root, camera[3]))
  built = _build(root, tmp_path / 'out', splits=[['train', 'mini_train']])
  assert sorted(os.path.basename(p) for p in built.info.metadata['skipped_train']) == sorted(
      os.path.basename(p) for p in (lidar[0], camera[3]))
  records = fx.read_split(built, 'train')  # the other sample of each scene survives
  assert [(r['meta']['scene'], r['meta']['frame']) for r in records] == [('scene-0061', 1),
                                                                         ('scene-0553', 0)]


def test_cli_runs_as_a_module(dataroot, tmp_path):
  out = str(tmp_path / 'out')
  options = json.dumps({'version': fx.NUSC_VERSION, 'splits': [['val', 'mini_val']]})
  result = subprocess.run(
      [sys.executable, '-m', 'data_prep.build', 'nuscenes', f'--manual_dir={dataroot}',
       f'--data_dir={out}', '--config=mini_front_288x512', '--image_height=18',
       '--image_width=32', f'--options={options}'],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
      text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'val: 2 records in 1 shards from 1 units, 0 inputs skipped' in result.stdout
  (path,) = [line.split(' -> ')[1] for line in result.stdout.splitlines() if ' -> ' in line]
  assert os.path.basename(os.path.dirname(path)).startswith('mini_front_288x512_custom_')
  assert '--image_height=18' in ' '.join(sources.tfds_builder(path).info.metadata[
      'command_line'])
  assert sources.TfdsSource(path, 'val')[0]['rgb'].shape == (18, 32, 3)
