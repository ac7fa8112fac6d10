"""data_prep/flir.py on a folder in the FLIR ADAS v2 release layout (paired video frames:
8-bit data/ JPEGs, 16-bit analyticsData/ TIFFs, coco.json, index.json, the pair map)."""

import json
import os
import shutil
import zlib

import numpy as np
import pytest

import fixtures_real_formats as fx
from data_prep import builder
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
  """The default build (16-bit raw thermal from analyticsData/)."""
  built = _build(root, tmp_path_factory.mktemp('flir_out'))
  return built, fx.read_split(built, 'train')


@pytest.fixture(scope='module')
def converted_8bit(root, tmp_path_factory):
  built = _build(root, tmp_path_factory.mktemp('flir_out8'), thermal_bits=8)
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
  assert metadata['settings']['options']['thermal_bits'] == 16
  assert metadata['fallbacks_train'] == {} and metadata['skipped_train'] == {}
  assert {r['meta']['scene'] for r in records} == {t for t, _ in fx.FLIR_VIDEOS}
  assert sorted({r['meta']['frame'] for r in records}) == list(fx.FLIR_FRAMES)
  for record in records:
    assert not record['depth_target'].any()
    assert (record['seg'] == schema.IGNORE_LABEL).all()
    assert record['boxes3d'].shape == (0, 7)
    assert 0.0 <= record['companion'].min() and record['companion'].max() <= 1.0


@pytest.mark.parametrize('build', ['converted', 'converted_8bit'])
def test_both_cameras_see_the_marker_at_the_projected_pixel(build, request):
  built, records = request.getfixturevalue(build)
  record = records[0]
  k = _shared_intrinsics()
  np.testing.assert_allclose(record['intrinsics'], k, rtol=1e-6)
  u, v, _ = k @ np.array([*fx.FLIR_MARKER_DIRECTION, 1.0])
  for image in (record['rgb'][..., 0].astype(np.float64), record['companion']):
    np.testing.assert_allclose(_centroid(image), (u, v), atol=0.3)
  if built.info.metadata['settings']['options']['thermal_bits'] == 8:
    # the data/ JPEG / 255: the background stays at the fixture's 30
    assert record['companion'][-1, 0] == pytest.approx(fx.FLIR_JPEG_BACKGROUND / 255, abs=0.01)
  else:
    # the analyticsData/ TIFF stretched between its 1st and 99th percentiles
    assert record['companion'][-1, 0] == pytest.approx(0.0, abs=1e-6)
    assert record['companion'].max() > 0.8


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


def test_eight_bit_or_missing_raw_frames_are_named_counted_fallbacks(tmp_path):
  raw = fx.write_flir(str(tmp_path / 'raw'), eight_bit_tiffs=[1], missing_tiffs=[2])
  pairs = fx.flir_pair_names()
  tiff = lambda i: str(tmp_path / 'raw' / 'video_thermal_test' / 'analyticsData' /
                       pairs[i][1].replace('.jpg', '.tiff'))
  built = _build(raw, tmp_path / 'out')
  fallbacks = built.info.metadata['fallbacks_train']
  assert sorted(fallbacks) == sorted([tiff(1), tiff(2)])
  assert '8-bit data' in fallbacks[tiff(1)] and pairs[2][1] in fallbacks[tiff(2)]
  assert ', 2 inputs read through a fallback' in builder.summary(built)
  backgrounds = {(r['meta']['scene'], r['meta']['frame']): r['companion'][-1, 0]
                 for r in fx.read_split(built, 'train')}
  # pair 1: its 8-bit TIFF / 255; pair 2: its data/ JPEG / 255; the rest: the raw frames,
  # stretched so that the background (1st percentile) is 0
  expected = {flir.video_and_frame(name): {1: fx.FLIR_TIFF8_BACKGROUND / 255,
                                           2: fx.FLIR_JPEG_BACKGROUND / 255}.get(i, 0.0)
              for i, (_, name) in enumerate(pairs)}
  assert backgrounds.keys() == expected.keys()
  for key, value in expected.items():
    assert backgrounds[key] == pytest.approx(value, abs=0.01), key
  # 8-bit asked: the data/ JPEGs, nothing to fall back from
  eight = _build(raw, tmp_path / 'out8', thermal_bits=8)
  assert eight.info.metadata['fallbacks_train'] == {}


def test_another_thermal_source_is_a_rebuild_that_is_refused(root, tmp_path):
  _build(root, tmp_path / 'out', thermal_bits=8)
  with pytest.raises(ValueError, match=r"settings\.options: .*'thermal_bits': 8.*"
                                       r"'thermal_bits': 16"):
    _build(root, tmp_path / 'out')


def test_bad_thermal_options_are_named(root, tmp_path):
  with pytest.raises(ValueError, match='thermal_bits=12'):
    _build(root, tmp_path / 'out', thermal_bits=12)
  no_raw = str(tmp_path / 'no_raw')
  shutil.copytree(root, no_raw)
  shutil.rmtree(os.path.join(no_raw, 'video_thermal_test', 'analyticsData'))
  with pytest.raises(FileNotFoundError, match=r'video_thermal_test/analyticsData not found.*'
                                              r'thermal_bits'):
    _build(no_raw, tmp_path / 'out')
  assert _build(no_raw, tmp_path / 'out8', thermal_bits=8).info.splits['train'].num_examples == 6


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
  pairs = fx.flir_pair_names()
  thermal = os.path.join(raw, 'video_thermal_test')
  tiff = lambda i: os.path.join(thermal, 'analyticsData', pairs[i][1].replace('.jpg', '.tiff'))
  with open(tiff(0), 'wb') as f:
    f.write(b'II*\x00 truncated tiff')
  with open(os.path.join(raw, 'video_rgb_test', 'data', pairs[1][0]), 'wb') as f:
    f.write(b'\xff\xd8 truncated jpeg')
  os.remove(tiff(2))  # and its data/ JPEG: nothing left to fall back to
  os.remove(os.path.join(thermal, 'data', pairs[2][1]))
  built = _build(raw, tmp_path / 'out')
  assert sorted(built.info.metadata['skipped_train']) == sorted(
      [tiff(0), os.path.join(raw, 'video_rgb_test', 'data', pairs[1][0]),
       os.path.join(thermal, 'data', pairs[2][1])])
  assert built.info.metadata['fallbacks_train'] == {}  # pair 2 was not written
  assert built.info.splits['train'].num_examples == 3


def test_normalize_thermal():
  eight = np.array([[0, 51, 255]], np.uint8)
  np.testing.assert_allclose(flir.normalize_thermal(eight), [[0.0, 0.2, 1.0]], atol=1e-7)
  np.testing.assert_allclose(flir.normalize_thermal(np.repeat(eight[..., None], 3, -1)),
                             [[0.0, 0.2, 1.0]], atol=1e-7)
  raw = np.arange(10000, dtype=np.uint16).reshape(100, 100) + 27000
  low, high = 27000 + 0.01 * 9999, 27000 + 0.99 * 9999  # 1st / 99th percentiles of a ramp
  expected = np.clip((raw.astype(np.float64) - low) / (high - low), 0, 1)
  np.testing.assert_allclose(flir.normalize_thermal(raw), expected, atol=1e-6)
