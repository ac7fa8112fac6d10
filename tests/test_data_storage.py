"""Storage formats of the built datasets (data_prep/builder.py: raw RGB, uint16 companion,
uncompressed shards) and the pretraining reader that decodes only what it ships."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures_real_formats as fx
from conftest import tiny_config
from data_prep import builder
from data_prep import waymo
from lemumo_jax.data import augment, pipeline, schema, sources

H, W = 32, 48
FAST = dict(rgb_format='raw', companion_format='uint16', record_compression='none')


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  root = tmp_path_factory.mktemp('storage_raw')
  for i in range(2):
    fx.write_waymo_segment(str(root / 'training' / f'segment-{i}.tfrecord'), 11,
                           context_name=f'segment-{i}')
  return root


def _build(raw, data_dir, **formats):
  return fx.build(waymo.LemumoWaymo, raw, data_dir, H, W, frame_stride=1,
                  splits=[['train', 'training/*']], **formats)


@pytest.fixture(scope='module')
def built(raw, tmp_path_factory):
  """The same frames as PNG + float32 (lossless reference) and in the fast formats."""
  return {'png': _build(raw, tmp_path_factory.mktemp('png')),
          'fast': _build(raw, tmp_path_factory.mktemp('fast'), **FAST)}


def _options(built_dataset) -> set[str]:
  """{'compressed'} / {'uncompressed'}: how the dataset's shards are written."""
  from array_record.python import array_record_module
  options = set()
  for path in sorted(glob.glob(os.path.join(os.fspath(built_dataset.data_path),
                                       '*.array_record-*-of-?????'))):
    reader = array_record_module.ArrayRecordReader(path)
    options.add('uncompressed' if 'uncompressed' in reader.writer_options_string().split(',')
                else 'compressed')
    reader.close()
  return options


def test_companion_codes_round_trip_and_refuse_out_of_range():
  values = np.array([0.0, 1.0, 0.5, 1 / 65535, 0.123456789], np.float32)
  codes = schema.companion_to_uint16(values)
  assert codes.dtype == np.uint16 and codes[0] == 0 and codes[1] == 65535
  np.testing.assert_array_equal(codes, np.round(values.astype(np.float64) * 65535))
  back = schema.companion_from_uint16(codes)
  assert back.dtype == np.float32
  assert np.max(np.abs(back.astype(np.float64) - values)) <= 0.5 / 65535 + 1e-9
  # On the device the same float32 division: bit for bit the host's.
  np.testing.assert_array_equal(np.asarray(schema.companion_from_uint16(jnp.asarray(codes))),
                                back)
  with pytest.raises(schema.SchemaError, match='companion values must lie in'):
    schema.companion_to_uint16(np.array([1.5], np.float32))


def test_default_settings_are_unchanged_by_the_new_options():
  """Datasets built before the storage options exist must still pass the rebuild check."""
  settings = waymo.LemumoWaymo.BUILDER_CONFIGS[0].settings()
  assert set(settings) == {'image_size', 'rgb_format', 'skip_without_companion', 'options'}
  fast = waymo.LemumoWaymo.BUILDER_CONFIGS[0].derive('x', **FAST).settings()
  assert fast['companion_format'] == 'uint16' and fast['record_compression'] == 'none'


def test_fast_formats_hold_the_same_frames(built):
  png, fast = (fx.read_split(built[k], 'train') for k in ('png', 'fast'))
  assert len(png) == len(fast) == 22
  assert _options(built['fast']) == {'uncompressed'}
  assert _options(built['png']) == {'compressed'}
  for a, b in zip(png, fast):
    assert a['meta'] == b['meta']
    np.testing.assert_array_equal(a['rgb'], b['rgb'])  # raw == lossless PNG
    assert b['companion'].dtype == np.float32  # the full reader converts the codes
    np.testing.assert_allclose(b['companion'], a['companion'], atol=0.5 / 65535 + 1e-9, rtol=0)
    np.testing.assert_array_equal(b['companion'] > 0, a['companion'] > 0)
    for key in ('depth_target', 'seg', 'boxes3d', 'boxes2d', 'intrinsics'):
      np.testing.assert_array_equal(a[key], b[key])


def test_keys_reader_decodes_only_what_it_returns(built):
  path = os.fspath(built['fast'].data_path)
  full = sources.TfdsSource(path, 'train')
  part = sources.TfdsSource(path, 'train', keys=('rgb', 'companion'), companion_codes=True)
  record = part[3]
  assert set(record) == {'rgb', 'companion'}
  assert record['companion'].dtype == np.uint16
  np.testing.assert_array_equal(record['rgb'], full[3]['rgb'])
  np.testing.assert_array_equal(schema.companion_from_uint16(record['companion']),
                                full[3]['companion'])
  assert repr(part) == repr(full)
  with pytest.raises(ValueError, match="keys \\['depth'\\] are not schema fields"):
    sources.TfdsSource(path, 'train', keys=('rgb', 'depth'))
  # A PNG / float32 dataset read by keys: float32 companion, as stored.
  png = sources.TfdsSource(os.fspath(built['png'].data_path), 'train',
                           keys=('companion',), companion_codes=True)
  assert png[0]['companion'].dtype == np.float32


def test_pretrain_loader_ships_codes_and_the_views_match_float(built):
  config = tiny_config()
  config.data.update(name='tfds', data_dir=os.fspath(built['fast'].data_path),
                     image_size=(H, W))
  batch = next(iter(pipeline.pretrain_loader(config.data, 8, seed=0, start_step=0,
                                             num_steps=1)))
  assert batch['companion'].dtype == np.uint16 and batch['rgb'].dtype == np.uint8
  assert batch['companion'].shape == (8, H, W)
  view_cfg = augment.ViewConfig.from_config(config.views)
  key = jax.random.PRNGKey(0)
  from_codes = augment.make_views(key, jnp.asarray(batch['rgb']),
                                  jnp.asarray(batch['companion']), view_cfg)
  from_float = augment.make_views(key, jnp.asarray(batch['rgb']),
                                  schema.companion_from_uint16(jnp.asarray(batch['companion'])),
                                  view_cfg)
  for name in from_float:
    np.testing.assert_array_equal(np.asarray(from_codes[name]), np.asarray(from_float[name]))


def test_rebuild_with_other_storage_is_refused(raw, built):
  data_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.fspath(built['png'].data_path))))
  with pytest.raises(ValueError, match='settings.companion_format'):
    _build(raw, data_dir, companion_format='uint16')


def test_killed_uncompressed_rewrite_is_finished_by_the_next_build(raw, tmp_path):
  first = _build(raw, tmp_path, **FAST)
  (shard,) = glob.glob(os.path.join(os.fspath(first.data_path), '*.array_record-*'))
  # As a rewrite killed halfway leaves it: the zstd shard TFDS wrote and a partial temporary.
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(shard)
  records = reader.read_all()
  reader.close()
  writer = array_record_module.ArrayRecordWriter(shard, 'group_size:1')
  for record in records:
    writer.write(record)
  writer.close()
  with open(shard + '.uncompressed-tmp', 'wb') as f:
    f.write(b'partial')
  assert _options(first) == {'compressed'}
  again = _build(raw, tmp_path, **FAST)
  assert _options(again) == {'uncompressed'}
  assert not os.path.exists(shard + '.uncompressed-tmp')
  assert len(fx.read_split(again, 'train')) == len(records)
  assert not builder.rewrite_uncompressed(shard)  # already uncompressed: nothing to do
