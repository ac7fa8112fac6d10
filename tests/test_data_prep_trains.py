"""Each converter's output, written from a real-format fixture, feeds the pretraining loop."""

import numpy as np
import pytest

import fixtures_real_formats as fx
from configs import flir as flir_config
from configs import nuscenes as nuscenes_config
from configs import waymo as waymo_config
from data_prep import flir, nuscenes, waymo
from lemumo_jax.data import schema
from lemumo_jax.training import pretrain
from tests.conftest import tiny_config


def _prepare(dataset, raw, out):
  if dataset == 'waymo':
    segment = fx.write_waymo_segment(str(raw / 'segment-0.tfrecord'), 11,
                                     context_name='segment-0')
    waymo.main(['waymo', f'--input_glob={segment}', f'--output_dir={out}',
                '--image_height=48', '--image_width=64'])
    return waymo_config.get_config()
  if dataset == 'nuscenes':
    root = fx.write_nuscenes(str(raw))
    nuscenes.main(['nuscenes', f'--input_dir={root}', f'--version={fx.NUSC_VERSION}',
                   '--scene_split=mini_train', '--split=train', f'--output_dir={out}',
                   '--image_height=48', '--image_width=64'])
    return nuscenes_config.get_config()
  root = fx.write_flir(str(raw))
  flir.main(['flir', f'--input_dir={root}', f'--output_dir={out}', '--video_split=all',
             '--val_percent=0', '--image_height=48', '--image_width=64'])
  return flir_config.get_config()


@pytest.mark.parametrize('dataset', ['waymo', 'nuscenes', 'flir'])
def test_prepared_shards_train_a_few_steps(dataset, tmp_path):
  paper_config = _prepare(dataset, tmp_path / 'raw', tmp_path / 'shards')
  metadata = schema.read_metadata(str(tmp_path / 'shards'))
  assert metadata['splits']['train'] >= 2
  config = tiny_config(num_steps=3, batch_size=2, checkpoint_every=3)
  config.data.update(name='arrayrecord', data_dir=str(tmp_path / 'shards'),
                     image_size=tuple(metadata['image_size']),
                     companion=paper_config.data.companion)
  config.views.companion_resize = paper_config.views.companion_resize
  summary = pretrain.train(config, str(tmp_path / 'run'))
  assert summary['final_step'] == 3
  assert all(np.isfinite(loss) for _, loss in summary['history'])


def test_unfinished_split_is_refused(tmp_path):
  from lemumo_jax.data import sources  # pylint: disable=g-import-not-at-top
  _prepare('flir', tmp_path / 'raw', tmp_path / 'shards')
  with pytest.raises(FileNotFoundError, match="no finished split 'val'"):
    sources.ArrayRecordSource(str(tmp_path / 'shards'), 'val')
