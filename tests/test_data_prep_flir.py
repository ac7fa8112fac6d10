"""data_prep/flir.py on a FLIR ADAS v2-style folder (paired video frames + coco.json)."""

import json
import os
import shutil
import zlib

import numpy as np
import pytest

import fixtures_real_formats as fx
from data_prep import flir
from lemumo_jax.data import schema

H, W = 32, 40  # the stored grid keeps the thermal camera's 5:4


def _build(root, data_dir, val_percent=0, **kwargs):
  return fx.build(flir.LemumoFlir, root, data_dir, H, W, val_percent=val_percent, **kwargs)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return fx.write_flir(str(tmp_path_factory.mktemp('flir_raw')))


@pytest.fixture(scope='module')
def converted(root, tmp_path_factory):
  built = _build(root, tmp_path_factory.mktemp('flir_out'))
  return built, fx.read_split(built, 'train')


def _shared_intrinsics():
  """K of the shared view, derived here from the fields of view alone."""
  rgb_tx = np.tan(np.radians(fx.FLIR_RGB_HFOV_DEG) / 2)
  rgb_ty = rgb_tx * fx.FLIR_RGB_HW[0] / fx.FLIR_RGB_HW[1]
  tx = min(rgb_tx, np.tan(np.radians(fx.FLIR_THERMAL_HFOV_DEG) / 2))
  ty = min(rgb_ty, np.tan(np.radians(fx.FLIR_THERMAL_VFOV_DEG) / 2))
  # The fixture's RGB sees less vertically; the thermal is wider than 5:4 allows there.
  assert ty == rgb_ty and tx / ty > W / H
  f = H / (2 * ty)
  return np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]])


def _centroid(image):
  weights = np.clip(image - np.median(image), 0, None)
  yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]] + 0.5
  return (weights * xx).sum() / weights.sum(), (weights * yy).sum() / weights.sum()


def test_pairs_metadata_and_fields(converted):
  built, records = converted
  metadata = built.info.metadata
  assert {k: v.num_examples for k, v in built.info.splits.items()} == {'train': 6}
  assert metadata['companion'] == 'thermal' and metadata['dataset'] == 'flir'
  assert metadata['classes_2d'] == list(flir.FLIR_CLASSES) and metadata['seg_classes'] == []
  assert metadata['image_size'] == [H, W]
  assert {r['meta']['scene'] for r in records} == {t for t, _ in fx.FLIR_VIDEOS}
  assert sorted({r['meta']['frame'] for r in records}) == list(fx.FLIR_FRAMES)
  for record in records:
    assert not record['depth_target'].any()
    assert (record['seg'] == schema.IGNORE_LABEL).all()
    assert record['boxes3d'].shape == (0, 7)
    assert 0.0 <= record['companion'].min() and record['companion'].max() <= 1.0


def test_both_cameras_see_the_marker_at_the_projected_pixel(converted):
  _, records = converted
  record = records[0]
  k = _shared_intrinsics()
  np.testing.assert_allclose(record['intrinsics'], k, rtol=1e-6)
  u, v, _ = k @ np.array([*fx.FLIR_MARKER_DIRECTION, 1.0])
  for image in (record['rgb'][..., 0].astype(np.float64), record['companion']):
    np.testing.assert_allclose(_centroid(image), (u, v), atol=0.3)
  # 8-bit thermal / 255: the background stays at the fixture's 30.
  assert record['companion'][-1, 0] == pytest.approx(30 / 255, abs=0.01)


def test_thermal_boxes_move_with_the_grid(converted):
  _, records = converted
  record = records[0]
  k = _shared_intrinsics()
  assert [flir.FLIR_CLASSES[c] for c in record['boxes2d_cls']] == ['car', 'person']
  car, person = record['boxes2d']
  # Angles are preserved: a thermal pixel spans f_out / f_thermal stored pixels.
  f_thermal_x = (fx.FLIR_THERMAL_HW[1] / 2) / np.tan(np.radians(fx.FLIR_THERMAL_HFOV_DEG) / 2)
  f_thermal_y = (fx.FLIR_THERMAL_HW[0] / 2) / np.tan(np.radians(fx.FLIR_THERMAL_VFOV_DEG) / 2)
  u, v, _ = k @ np.array([*fx.FLIR_MARKER_DIRECTION, 1.0])
  np.testing.assert_allclose([(car[0] + car[2]) / 2, (car[1] + car[3]) / 2], [u, v], atol=1e-3)
  np.testing.assert_allclose([car[2] - car[0], car[3] - car[1]],
                             [8 * k[0, 0] / f_thermal_x, 6 * k[1, 1] / f_thermal_y], rtol=1e-4)
  assert person[0] == 0.0 and person[2] > 1.0  # clipped at the shared view's left edge


def test_sixteen_bit_thermal_is_stretched_to_unit_range(tmp_path):
  root = fx.write_flir(str(tmp_path / 'raw'), thermal_16bit=True)
  record = fx.read_split(_build(root, tmp_path / 'out'), 'train')[0]
  thermal = record['companion']
  assert thermal[-1, 0] == pytest.approx(0.0, abs=1e-6)  # background = 1st percentile
  assert thermal.max() > 0.8
  u, v, _ = _shared_intrinsics() @ np.array([*fx.FLIR_MARKER_DIRECTION, 1.0])
  np.testing.assert_allclose(_centroid(thermal), (u, v), atol=0.3)


def test_video_split_keeps_whole_videos(root, tmp_path):
  built = _build(root, tmp_path / 'out', val_percent=50)
  val_videos = {t for t, _ in fx.FLIR_VIDEOS if zlib.crc32(t.encode()) % 100 < 50}
  assert 0 < len(val_videos) < len(fx.FLIR_VIDEOS)
  assert {r['meta']['scene'] for r in fx.read_split(built, 'val')} == val_videos
  assert not {r['meta']['scene'] for r in fx.read_split(built, 'train')} & val_videos
  assert {k: v.num_examples for k, v in built.info.splits.items()} == {
      'train': 2 * (3 - len(val_videos)), 'val': 2 * len(val_videos)}


def test_corrupt_pairs_are_skipped_and_recorded(root, tmp_path):
  raw = str(tmp_path / 'raw')
  shutil.copytree(root, raw)
  with open(os.path.join(raw, 'rgb_to_thermal_vid_map.json')) as f:
    pairs = sorted(json.load(f).items())
  os.remove(os.path.join(raw, 'video_thermal_test', 'data', pairs[0][1]))
  with open(os.path.join(raw, 'video_rgb_test', 'data', pairs[1][0]), 'wb') as f:
    f.write(b'\xff\xd8 truncated jpeg')
  built = _build(raw, tmp_path / 'out')
  assert sorted(os.path.basename(p) for p in built.info.metadata['skipped_train']) == sorted(
      [pairs[0][1], pairs[1][0]])
  assert built.info.splits['train'].num_examples == 4


def test_normalize_thermal():
  eight = np.array([[0, 51, 255]], np.uint8)
  np.testing.assert_allclose(flir.normalize_thermal(eight), [[0.0, 0.2, 1.0]], atol=1e-7)
  np.testing.assert_allclose(flir.normalize_thermal(np.repeat(eight[..., None], 3, -1)),
                             [[0.0, 0.2, 1.0]], atol=1e-7)
  raw = np.arange(10000, dtype=np.uint16).reshape(100, 100) + 27000
  low, high = 27000 + 0.01 * 9999, 27000 + 0.99 * 9999  # 1st / 99th percentiles of a ramp
  expected = np.clip((raw.astype(np.float64) - low) / (high - low), 0, 1)
  np.testing.assert_allclose(flir.normalize_thermal(raw), expected, atol=1e-6)
