"""Each dataset built from a real-format fixture feeds the pretraining loop; the reader stops,
naming the file, on a dataset folder that is not what its dataset info says."""

import json
import os
import pickle
import shutil
import subprocess
import sys

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
from lemumo_jax.training import probe
from tests.conftest import REPO, tiny_config


def _prepare(dataset, raw, out, with_val=False, pipeline_options=''):
  """(built dataset, the paper config of the dataset) from its real-format fixture."""
  kwargs = {'pipeline_options': pipeline_options}
  if dataset == 'waymo':
    if not (raw / 'training').exists():
      fx.write_waymo_segment(str(raw / 'training' / 'segment-0.tfrecord'), 11,
                             context_name='segment-0')
      fx.write_waymo_segment(str(raw / 'validation' / 'segment-1.tfrecord'), 6,
                             context_name='segment-1', with_segmentation=False)
    splits = [['train', 'training/*']] + ([['val', 'validation/*']] if with_val else [])
    return (fx.build(waymo.LemumoWaymo, raw, out, 48, 64, splits=splits, **kwargs),
            waymo_config.get_config())
  if dataset == 'nuscenes':
    root = raw if raw.exists() else fx.write_nuscenes(str(raw))
    splits = [['train', 'mini_train']] + ([['val', 'mini_val']] if with_val else [])
    return (fx.build(nuscenes.LemumoNuscenes, root, out, 48, 64, version=fx.NUSC_VERSION,
                     splits=splits, **kwargs), nuscenes_config.get_config())
  root = raw if raw.exists() else fx.write_flir(str(raw))
  return (fx.build(flir.LemumoFlir, root, out, 48, 64, val_percent=50 if with_val else 0,
                   **kwargs), flir_config.get_config())


@pytest.mark.parametrize('dataset', ['waymo', 'nuscenes', 'flir'])
def test_built_datasets_train_and_probe(dataset, tmp_path):
  """Pretraining on each; the probes on Waymo (3D boxes, seg, depth, occupancy) and FLIR (2D
  boxes, occupancy); nuScenes' probes are Waymo's heads."""
  built, paper_config = _prepare(dataset, tmp_path / 'raw', tmp_path / 'tfds', with_val=True)
  config = tiny_config(num_steps=3, batch_size=2, checkpoint_every=3)
  config.data.update(name='tfds', data_dir=os.fspath(built.data_path),
                     image_size=tuple(built.info.metadata['image_size']),
                     companion=paper_config.data.companion)
  config.views.companion_resize = paper_config.views.companion_resize
  config.probe.update(heads=paper_config.probe.heads, batch_size=2, num_steps=2, val_every=2,
                      checkpoint_every=2, num_figure_frames=1)
  assert sources.dataset_metadata(config.data)['splits']['train'] >= 2
  summary = pretrain.train(config, str(tmp_path / 'run'))
  assert summary['final_step'] == 3
  assert all(np.isfinite(loss) for _, loss in summary['history'])
  if dataset == 'nuscenes':
    return
  result = probe.run(config, str(tmp_path / 'run'))
  assert np.isfinite(result['metrics']['loss'])
  assert (tmp_path / 'run' / 'probe' / 'report.md').exists()


@pytest.mark.slow
@pytest.mark.parametrize('dataset', ['waymo', 'nuscenes', 'flir'])
def test_multi_process_beam_build_equals_the_in_memory_one(dataset, tmp_path):
  """The local multi-process DirectRunner (what a researcher runs on one big host) writes
  the same records in the same order as the in-memory runner, so training batch i stays a
  function of (seed, i) whichever runner built the data. (Waymo: TensorFlow and the protos
  in every worker; nuScenes: the devkit tables loaded in each worker's DoFn.setup; FLIR:
  pycocotools there.)"""
  single, _ = _prepare(dataset, tmp_path / 'raw', tmp_path / 'single', with_val=True)
  multi, _ = _prepare(dataset, tmp_path / 'raw', tmp_path / 'multi', with_val=True,
                      pipeline_options='direct_running_mode=multi_processing,'
                                       'direct_num_workers=2')
  assert dict(single.info.metadata) == {**dict(multi.info.metadata),
                                        'command_line': single.info.metadata['command_line']}
  for split in single.info.splits:
    ours = sources.TfdsSource(os.fspath(multi.data_path), split)
    theirs = sources.TfdsSource(os.fspath(single.data_path), split)
    assert len(ours) == len(theirs) > 0
    for index in range(len(ours)):
      a, b = ours[index], theirs[index]
      assert a['meta'] == b['meta']
      for key in schema.FIELDS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f'{split}[{index}] {key}')


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


def test_resume_on_a_dataset_rebuilt_in_place_is_refused(tmp_path):
  """A dataset rebuilt with other contents under the same data_dir is other data: the run
  recorded the dataset's identity, and a resume names it."""
  built, paper_config = _prepare('flir', tmp_path / 'raw', tmp_path / 'tfds')
  config = tiny_config(num_steps=2, batch_size=2, checkpoint_every=2)
  config.data.update(name='tfds', data_dir=os.fspath(built.data_path), image_size=(48, 64),
                     companion=paper_config.data.companion)
  config.views.companion_resize = paper_config.views.companion_resize
  pretrain.train(config, str(tmp_path / 'run'))
  thermal = sorted((tmp_path / 'raw' / 'video_thermal_test' / 'data').iterdir())[0]
  thermal.unlink()  # one pair loses both thermal frames: 5 records after the rebuild
  (tmp_path / 'raw' / 'video_thermal_test' / 'analyticsData' / f'{thermal.stem}.tiff').unlink()
  fx.build(flir.LemumoFlir, tmp_path / 'raw', tmp_path / 'tfds', 48, 64, val_percent=0,
           overwrite=True)
  config.train.num_steps = 4
  with pytest.raises(ValueError, match=r"dataset_identity.splits.train: 6 -> 5"):
    pretrain.train(config, str(tmp_path / 'run'))


@pytest.mark.slow
def test_tfds_build_command_builds_a_named_config(python_env, tmp_path):
  """The README's `tfds build` line: TFDS's own CLI imports the builder module and builds a
  named config (here FLIR's video_512x640) into array_record files the reader accepts."""
  root = fx.write_flir(str(tmp_path / 'raw'))
  result = subprocess.run(
      [os.path.join(os.path.dirname(sys.executable), 'tfds'), 'build', 'lemumo_flir',
       '--imports=data_prep.flir', f'--manual_dir={root}',
       f'--data_dir={tmp_path / "tfds"}', '--config=video_512x640',
       '--file_format=array_record'],
      cwd=REPO, env=python_env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  source = sources.TfdsSource(str(tmp_path / 'tfds' / 'lemumo_flir' / 'video_512x640' / '1.0.0'),
                              'train')
  assert len(source) > 0 and source[0]['rgb'].shape == (512, 640, 3)
