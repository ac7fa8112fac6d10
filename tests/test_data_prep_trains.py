"""Each dataset built from a real-format fixture feeds the pretraining loop; the reader stops,
naming the file, on a dataset folder that is not what its dataset info says."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest

import fixtures_real_formats as fx
from configs import flir as flir_config
from configs import nuscenes as nuscenes_config
from configs import waymo as waymo_config
from data_prep import flir, nuscenes, waymo
from lemumo_jax.data import schema
from lemumo_jax.data import sources
from lemumo_jax.training import pretrain
from tests.conftest import tiny_config


def _prepare(dataset, raw, out):
  if dataset == 'waymo':
    fx.write_waymo_segment(str(raw / 'training' / 'segment-0.tfrecord'), 11,
                           context_name='segment-0')
    return fx.build(waymo.LemumoWaymo, raw, out, 48, 64), waymo_config.get_config()
  if dataset == 'nuscenes':
    root = fx.write_nuscenes(str(raw))
    return fx.build(nuscenes.LemumoNuscenes, root, out, 48, 64, version=fx.NUSC_VERSION,
                    splits=[['train', 'mini_train']]), nuscenes_config.get_config()
  root = fx.write_flir(str(raw))
  return fx.build(flir.LemumoFlir, root, out, 48, 64, val_percent=0), flir_config.get_config()


@pytest.mark.parametrize('dataset', ['waymo', 'nuscenes', 'flir'])
def test_built_datasets_train_a_few_steps(dataset, tmp_path):
  built, paper_config = _prepare(dataset, tmp_path / 'raw', tmp_path / 'tfds')
  config = tiny_config(num_steps=3, batch_size=2, checkpoint_every=3)
  config.data.update(name='tfds', data_dir=os.fspath(built.data_path),
                     image_size=tuple(built.info.metadata['image_size']),
                     companion=paper_config.data.companion)
  config.views.companion_resize = paper_config.views.companion_resize
  assert sources.dataset_metadata(config.data)['splits']['train'] >= 2
  summary = pretrain.train(config, str(tmp_path / 'run'))
  assert summary['final_step'] == 3
  assert all(np.isfinite(loss) for _, loss in summary['history'])


@pytest.fixture(scope='module')
def flir_built(tmp_path_factory):
  root = tmp_path_factory.mktemp('flir')
  built, _ = _prepare('flir', root / 'raw', root / 'tfds')
  return built


def _copy(built, tmp_path):
  """A copy of the built dataset folder, and the path of its (single) train shard."""
  copy = tmp_path / 'dataset'
  shutil.copytree(built.data_path, copy)
  (shard,) = [copy / name for name in os.listdir(copy) if '-train.array_record-' in name]
  return str(copy), shard


def test_reader_matches_the_dataset_info(flir_built, tmp_path):
  data_dir, _ = _copy(flir_built, tmp_path)
  source = sources.TfdsSource(data_dir, 'train')
  assert len(source) == 6
  record = source[0]
  schema.validate(record)
  assert record['meta']['dataset'] == 'flir' and record['meta']['has_companion']
  again = pickle.loads(pickle.dumps(source))  # grain worker processes reopen the shards
  np.testing.assert_array_equal(again[3]['rgb'], source[3]['rgb'])
  with pytest.raises(ValueError, match=r"has splits \['train'\], not 'val'"):
    sources.TfdsSource(data_dir, 'val')


@pytest.mark.parametrize('damage,message', [
    ('truncate', 'not a readable ArrayRecord file|holds .* records, the dataset info says 6'),
    ('empty', 'not a readable ArrayRecord file'),
    ('missing', 'is missing'),
])
def test_damaged_shards_are_named_before_training(flir_built, tmp_path, damage, message):
  """Defect 7: a truncated, zero-byte or missing shard stops with the file named."""
  data_dir, shard = _copy(flir_built, tmp_path)
  if damage == 'truncate':
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
  elif damage == 'empty':
    shard.write_bytes(b'')
  else:
    shard.unlink()
  with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
    sources.TfdsSource(data_dir, 'train')
  assert str(shard) in str(info.value)


def test_split_count_disagreeing_with_the_shards_is_refused(flir_built, tmp_path):
  """Defect 7: the dataset info claims more records than the shards hold."""
  data_dir, shard = _copy(flir_built, tmp_path)
  info_path = os.path.join(data_dir, 'dataset_info.json')
  with open(info_path) as f:
    info = json.load(f)
  (split,) = info['splits']
  split['shardLengths'] = ['400']
  split['numBytes'] = split.get('numBytes', '0')
  with open(info_path, 'w') as f:
    json.dump(info, f)
  with pytest.raises(ValueError, match=f'{shard} holds 6 records, the dataset info says 400'):
    sources.TfdsSource(data_dir, 'train')


def test_corrupt_record_names_the_shard(flir_built, tmp_path):
  """Defect 7: a corrupt chunk inside a shard of the right length names the shard."""
  data_dir, shard = _copy(flir_built, tmp_path)
  data = bytearray(shard.read_bytes())
  for fraction in (0.05, 0.1):  # inside the first records (the file ends in block padding)
    start = int(len(data) * fraction)
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
  shard.write_bytes(bytes(data))
  try:
    source = sources.TfdsSource(data_dir, 'train')
  except ValueError as e:  # the damage hit the footer: named when opened
    assert str(shard) in str(e)
    return
  with pytest.raises(schema.SchemaError, match=str(shard)):
    for index in range(len(source)):
      source[index]


def test_bad_data_dirs_are_named(flir_built, tmp_path):
  with pytest.raises(ValueError, match='config.data.data_dir is empty'):
    sources.TfdsSource('', 'train')
  with pytest.raises(FileNotFoundError, match='built datasets below it'):
    sources.TfdsSource(str(flir_built.data_path.parent.parent.parent), 'train')
  data_dir, _ = _copy(flir_built, tmp_path)
  info_path = os.path.join(data_dir, 'dataset_info.json')
  with open(info_path, 'r+') as f:
    f.truncate(40)
  with pytest.raises(ValueError, match=f'{info_path} is missing or not readable JSON'):
    sources.TfdsSource(data_dir, 'train')
