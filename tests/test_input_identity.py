"""A dataset's identity follows its inputs' contents (issue 33, part 3): an edit that keeps every
file's name and size (Waymo), an edited annotation table (nuScenes) or box file (FLIR) is a
rebuild refused without --overwrite, and after it the dataset identity a resume compares
changes."""

import json
import os

import pytest

import fixtures_real_formats as fx
from data_prep import builder
from data_prep import flir
from data_prep import nuscenes as nusc_prep
from data_prep import waymo
from lemumo_jax.data import sources


def _identity(built):
  cfg = type('Data', (), {'name': 'tfds', 'data_dir': os.fspath(built.data_path)})
  return sources.dataset_identity(cfg)


def test_file_digests_are_sha256_of_the_contents(tmp_path):
  import hashlib  # pylint: disable=g-import-not-at-top
  paths = []
  for i in range(20):
    path = tmp_path / f'f{i}'
    path.write_bytes(os.urandom(1000 + 37 * i))
    paths.append(str(path))
  digests = builder.file_digests(paths + [str(tmp_path / 'absent')], threads=4)
  for path in paths:
    with open(path, 'rb') as f:
      assert digests[path] == hashlib.sha256(f.read()).hexdigest()
  assert digests[str(tmp_path / 'absent')] == 'missing'


def test_waymo_same_size_edit_is_seen(tmp_path):
  manual = tmp_path / 'raw'
  fx.write_waymo_segment(str(manual / 'training' / 'segment-0.tfrecord'), 2,
                         context_name='segment-0')
  build = lambda **kw: fx.build(waymo.LemumoWaymo, manual, tmp_path / 'out', 32, 48,
                                splits=[['train', 'training/*.tfrecord']], **kw)
  built = build()
  before = _identity(built)
  path = manual / 'training' / 'segment-0.tfrecord'
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01  # one bit, same size (and the same mtime below)
  stat = os.stat(path)
  path.write_bytes(bytes(data))
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  with pytest.raises(ValueError, match='inputs.units_sha256'):
    build()
  assert _identity(built) == before  # the refused rebuild changed nothing


def test_nuscenes_edited_annotations_are_seen(tmp_path):
  dataroot = fx.write_nuscenes(str(tmp_path / 'raw'))
  splits = (('train', 'mini_train'), ('val', 'mini_val'))
  build = lambda **kw: fx.build(nusc_prep.LemumoNuscenes, dataroot, tmp_path / 'out', 45, 80,
                                version=fx.NUSC_VERSION, splits=splits, **kw)
  built = build()
  before = _identity(built)
  table = os.path.join(dataroot, fx.NUSC_VERSION, 'sample_annotation.json')
  with open(table) as f:
    annotations = json.load(f)
  for annotation in annotations:
    annotation['translation'] = [v + 0.5 for v in annotation['translation']]
  with open(table, 'w') as f:
    json.dump(annotations, f)
  with pytest.raises(ValueError, match='inputs.units_sha256'):
    build()
  rebuilt = build(overwrite=True)
  assert _identity(rebuilt)['inputs'] != before['inputs']


def test_flir_edited_boxes_are_seen(tmp_path):
  root = fx.write_flir(str(tmp_path / 'raw'))
  build = lambda **kw: fx.build(flir.LemumoFlir, root, tmp_path / 'out', 32, 40,
                                val_percent=0, **kw)
  build()
  coco = os.path.join(root, 'video_thermal_test', 'coco.json')
  with open(coco) as f:
    payload = json.load(f)
  payload['annotations'][0]['bbox'][0] += 1.0
  with open(coco, 'w') as f:
    json.dump(payload, f)
  with pytest.raises(ValueError, match='inputs.units_sha256'):
    build()


def test_a_dataset_built_before_content_digests_is_named(tmp_path):
  manual = tmp_path / 'raw'
  fx.write_waymo_segment(str(manual / 'training' / 'segment-0.tfrecord'), 2,
                         context_name='segment-0')
  build = lambda: fx.build(waymo.LemumoWaymo, manual, tmp_path / 'out', 32, 48,
                           splits=[['train', 'training/*.tfrecord']])
  built = build()
  path = os.path.join(os.fspath(built.data_path), 'metadata.json')
  with open(path) as f:
    metadata = json.load(f)
  del metadata['inputs']['digest']  # as written before content digests
  metadata['inputs']['units_sha256'] = {'train': '0123456789abcdef'}
  with open(path, 'w') as f:
    json.dump(metadata, f)
  with pytest.raises(ValueError, match='built before the inputs were identified by their '
                                       'contents'):
    build()
