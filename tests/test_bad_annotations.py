"""Inputs that used to be silently accepted or failed without a name (issue 33, parts 3-4): a
JPEG the decoder reports corrupt is a named skip; a missing or non-finite annotation value is a
named, counted bad label and never a stored box; a truncated JSON table names its file."""

import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import fixtures_real_formats as fx
from data_prep import builder
from data_prep import flir
from data_prep import nuscenes as nusc_prep
from data_prep import waymo


def _jpeg(array, **kwargs) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='JPEG', **kwargs)
  return buffer.getvalue()


def _damaged(data: bytes) -> bytes:
  """The JPEG with garbage between its entropy data and the end marker: PIL decodes it without
  a word, libjpeg reports 'extraneous bytes before marker 0xd9'."""
  assert data.endswith(b'\xff\xd9')
  return data[:-2] + bytes(range(1, 120)) + b'\xff\xd9'


def _bad_labels(built) -> dict[str, str]:
  metadata = built.info.metadata
  return {k: v for split in built.info.splits for k, v in
          (metadata.get(f'bad_labels_{split}') or {}).items()}


def test_decode_image_equals_pil_and_names_corrupt_data(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (40, 56), dtype=np.uint8)
  for array, mode in ((rgb, 'RGB'), (rgb, None), (grey, None), (grey, 'RGB')):
    for subsampling in (0, 2):
      data = _jpeg(array, quality=90, subsampling=subsampling)
      with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(image.convert(mode) if mode else image)
      np.testing.assert_array_equal(builder.decode_image(data, 'x.jpg', mode), expected)
  assert Image.open(io.BytesIO(_damaged(_jpeg(rgb)))).convert('RGB')  # PIL: no complaint
  with pytest.raises(builder.CorruptInputError, match='x.jpg: .*(Corrupt|extraneous)'):
    builder.decode_image(_damaged(_jpeg(rgb)), 'x.jpg', 'RGB')
  path = tmp_path / 'frame.png'
  Image.fromarray(rgb).save(path)
  np.testing.assert_array_equal(builder.read_image(str(path), 'RGB'), rgb)
  with pytest.raises(builder.CorruptInputError, match='absent.jpg'):
    builder.read_image(str(tmp_path / 'absent.jpg'))


def test_waymo_non_finite_box_is_a_named_bad_label(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'raw' / 'training' / 'segment-0.tfrecord'
  path.parent.mkdir(parents=True)
  frame = fx.waymo_frame(0, context_name='segment-0')
  frame.laser_labels[0].box.heading = math.nan
  frame.laser_labels[1].box.length = math.inf
  with tf.io.TFRecordWriter(str(path)) as writer:
    writer.write(frame.SerializeToString())
  built = fx.build(waymo.LemumoWaymo, tmp_path / 'raw', tmp_path / 'out', 32, 48,
                   splits=[['train', 'training/*.tfrecord']])
  bad = _bad_labels(built)
  first, second = frame.laser_labels[0].id, frame.laser_labels[1].id
  assert bad == {f'{path} record 0 laser label {first!r}': 'box heading nan not finite',
                 f'{path} record 0 laser label {second!r}': 'box length inf not finite'}
  counts = built.info.metadata['box_counts_train']['3d']
  assert sum(counts.values()) == 0  # the pedestrian was the other box in front of the camera
  assert '0 annotations not stored' not in builder.summary(built)


def test_nuscenes_bad_annotations_and_a_damaged_jpeg_are_named(tmp_path):
  dataroot = fx.write_nuscenes(str(tmp_path / 'raw'))
  table = os.path.join(dataroot, fx.NUSC_VERSION, 'sample_annotation.json')
  with open(table) as f:
    annotations = json.load(f)
  annotations[0]['size'][0] = math.inf  # the first sample's car
  annotations[1]['translation'][2] = math.nan  # its adult pedestrian
  del annotations[2]['size']  # its cyclist
  with open(table, 'w') as f:
    json.dump(annotations, f)  # Infinity / NaN, as Python's json (the devkit's reader) reads
  with open(os.path.join(dataroot, fx.NUSC_VERSION, 'sample_data.json')) as f:
    cameras = [r['filename'] for r in json.load(f) if 'CAM_FRONT' in r['filename']]
  damaged = os.path.join(dataroot, cameras[1])
  with open(damaged, 'rb') as f:
    data = f.read()
  with open(damaged, 'wb') as f:
    f.write(_damaged(data))
  built = fx.build(nusc_prep.LemumoNuscenes, dataroot, tmp_path / 'out', 45, 80,
                   version=fx.NUSC_VERSION, splits=(('train', 'mini_train'),
                                                    ('val', 'mini_val')))
  tokens = [a['token'] for a in annotations[:3]]
  assert _bad_labels(built) == {
      f'{table} token {tokens[0]}': f'size {annotations[0]["size"]!r} is not 3 finite numbers',
      f'{table} token {tokens[1]}': f'translation {annotations[1]["translation"]!r} is not 3 '
                                    'finite numbers',
      f'{table} token {tokens[2]}': 'no size'}
  skipped = {k: v for split in built.info.splits
             for k, v in built.info.metadata[f'skipped_{split}'].items()}
  assert list(skipped) == [damaged] and 'extraneous' in skipped[damaged]


def test_flir_bad_boxes_are_named_and_never_stored(tmp_path):
  root = fx.write_flir(str(tmp_path / 'raw'))
  coco_path = os.path.join(root, 'video_thermal_test', 'coco.json')
  with open(coco_path) as f:
    coco = json.load(f)
  first, second = coco['annotations'][0], coco['annotations'][1]
  first['bbox'][2] = math.inf
  del second['bbox']
  with open(coco_path, 'w') as f:
    json.dump(coco, f)
  built = fx.build(flir.LemumoFlir, root, tmp_path / 'out', 32, 40, val_percent=0)
  assert _bad_labels(built) == {
      f'{coco_path} annotation id {first["id"]!r}': f'bbox {first["bbox"]!r} is not 4 finite '
                                                    'numbers',
      f'{coco_path} annotation id {second["id"]!r}': 'no bbox'}
  for record in fx.read_split(built, 'train'):
    assert np.isfinite(record['boxes2d']).all()
    assert (record['boxes2d'][:, 2] < 40 - 1e-3).all() or len(record['boxes2d']) == 0


@pytest.mark.parametrize('dataset', ['nuscenes_table', 'flir_coco', 'flir_pair_map'])
def test_a_truncated_json_input_names_its_file(tmp_path, dataset):
  if dataset == 'nuscenes_table':
    root = fx.write_nuscenes(str(tmp_path / 'raw'))
    path = os.path.join(root, fx.NUSC_VERSION, 'sample_annotation.json')
    build = lambda: fx.build(nusc_prep.LemumoNuscenes, root, tmp_path / 'out', 45, 80,
                             version=fx.NUSC_VERSION, splits=(('train', 'mini_train'),))
  else:
    root = fx.write_flir(str(tmp_path / 'raw'))
    path = os.path.join(root, *(('video_thermal_test', 'coco.json') if dataset == 'flir_coco'
                                else ('rgb_to_thermal_vid_map.json',)))
    build = lambda: fx.build(flir.LemumoFlir, root, tmp_path / 'out', 32, 40, val_percent=0)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(Exception, match=f'{path} is not readable JSON'):
    build()
