"""data_prep/nuscenes.py on a v1.0-mini-style table set loaded by nuscenes-devkit."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fixtures_real_formats as fx
from data_prep import nuscenes as nusc_prep
from lemumo_jax.data import geometry
from lemumo_jax.data import schema

H, W = 45, 80  # half the fixture camera's 90 x 160


def _convert(dataroot, output_dir, *extra):
  return nusc_prep.main(['nuscenes', f'--input_dir={dataroot}', f'--version={fx.NUSC_VERSION}',
                         f'--output_dir={output_dir}', f'--image_height={H}',
                         f'--image_width={W}', '--rgb_format=png', *extra])


@pytest.fixture(scope='module')
def dataroot(tmp_path_factory):
  return fx.write_nuscenes(str(tmp_path_factory.mktemp('nuscenes_raw')))


@pytest.fixture(scope='module')
def converted(dataroot, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('nuscenes_out'))
  _convert(dataroot, out, '--scene_split=mini_train', '--split=train')
  metadata = _convert(dataroot, out, '--scene_split=mini_val', '--split=val')
  return metadata, fx.read_split(out, 'train'), fx.read_split(out, 'val')


def test_splits_and_metadata(converted):
  metadata, train, val = converted
  assert metadata['splits'] == {'train': 4, 'val': 2}  # 2 + 1 scenes of 2 samples
  assert [(r['meta']['scene'], r['meta']['frame']) for r in train] == [
      ('scene-0061', 0), ('scene-0061', 1), ('scene-0553', 0), ('scene-0553', 1)]
  assert {r['meta']['scene'] for r in val} == {'scene-0103'}
  assert metadata['dataset'] == 'nuscenes' and metadata['image_size'] == [H, W]
  assert metadata['seg_classes'] == list(nusc_prep.SEG_CLASSES)
  assert metadata['box_counts_3d']['train'] == {'car': 4, 'pedestrian': 4, 'cyclist': 4}
  assert metadata['options']['val']['lidarseg'] is True
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
  np.testing.assert_array_equal(record['boxes3d_cls'], [0, 1, 2])  # car, pedestrian, cyclist
  expected = np.array([[*center, length, width, height, yaw] for _, _, center, length, width,
                       height, yaw in fx.NUSC_BOXES[:3]])
  np.testing.assert_allclose(record['boxes3d'], expected, atol=1e-4)
  boxes2d, keep = geometry.boxes3d_to_2d(expected, record['intrinsics'], H, W)
  assert keep.all()
  np.testing.assert_allclose(record['boxes2d'], boxes2d, atol=1e-3)
  np.testing.assert_array_equal(record['boxes2d_cls'], [0, 1, 2])


def test_without_lidarseg_the_seg_map_is_ignore(tmp_path):
  root = fx.write_nuscenes(str(tmp_path / 'raw'), with_lidarseg=False)
  metadata = _convert(root, str(tmp_path / 'out'), '--scene_split=mini_val', '--split=val')
  assert metadata['options']['val']['lidarseg'] is False
  (first, _) = fx.read_split(str(tmp_path / 'out'), 'val')
  assert (first['seg'] == schema.IGNORE_LABEL).all()
  assert np.count_nonzero(first['depth_target']) == 3


def test_corrupt_files_sharding_and_resume(dataroot, tmp_path):
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
  out = str(tmp_path / 'out')
  args = ['--scene_split=mini_train', '--split=train', '--num_shards=2']
  assert _convert(root, out, *args, '--shard_index=1') is None
  metadata = _convert(root, out, *args, '--shard_index=0')
  assert sorted(os.path.basename(p) for p in metadata['skipped']['train']) == sorted(
      os.path.basename(p) for p in (lidar[0], camera[3]))
  assert metadata['num_units'] == {'train': 2}
  units = []
  for i in range(2):
    with open(os.path.join(out, f'train-{i:05d}-of-00002.stats.json')) as f:
      units.append(json.load(f)['units'])
  assert sorted(units) == [['scene-0061'], ['scene-0553']]
  records = fx.read_split(out, 'train')  # the other sample of each scene survives
  assert [(r['meta']['scene'], r['meta']['frame']) for r in records] == [('scene-0061', 1),
                                                                         ('scene-0553', 0)]
  before = [os.stat(os.path.join(out, n)).st_mtime_ns for n in metadata['shard_files']['train']]
  _convert(root, out, *args)
  assert before == [os.stat(os.path.join(out, n)).st_mtime_ns
                    for n in metadata['shard_files']['train']]


def test_cli_runs_as_a_module(dataroot, tmp_path):
  out = str(tmp_path / 'out')
  result = subprocess.run(
      [sys.executable, '-m', 'data_prep.nuscenes', f'--input_dir={dataroot}',
       f'--version={fx.NUSC_VERSION}', '--scene_split=mini_val', '--split=val',
       f'--output_dir={out}', '--image_height=18', '--image_width=32', '--max_frames=1'],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
      text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'val: 1 records' in result.stdout
  metadata = schema.read_metadata(out)
  assert '--split=val' in metadata['prep_command_lines']['val'][0]
  assert fx.read_split(out, 'val')[0]['rgb'].shape == (18, 32, 3)
