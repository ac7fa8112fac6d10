"""Exported encoders are verified against their fingerprint on every load (issue 33, part 2)."""

import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from lemumo_jax.training import state as state_lib


def _export(workdir):
  from lemumo_jax.training import pretrain  # pylint: disable=g-import-not-at-top
  config = tiny_config('lemumo')
  init_state, _, _ = pretrain.build(config, state_lib.make_mesh(), 4)
  params = jax.jit(init_state)(jax.random.PRNGKey(0)).params['encoder']
  return state_lib.export_encoder(str(workdir), params, config, step=4), params


def _data_files(directory):
  found = []
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 4096 and '/params_' in path:
        found.append(path)
  return sorted(found, key=os.path.getsize)


def test_export_loads_back_verified(tmp_path):
  directory, params = _export(tmp_path)
  _, loaded, _ = state_lib.load_encoder(directory)
  assert state_lib.params_fingerprint(loaded) == state_lib.params_fingerprint(params)


@pytest.mark.parametrize('fraction', [0.3, 0.5, 0.7, 0.9])
def test_a_flipped_byte_in_the_params_is_refused(tmp_path, fraction):
  directory, _ = _export(tmp_path)
  target = _data_files(directory)[-1]  # the largest file: the arrays' bytes
  with open(target, 'r+b') as f:
    data = bytearray(f.read())
    offset = int(len(data) * fraction)
    data[offset] ^= 0x01
    f.seek(0)
    f.write(data)
  with pytest.raises(ValueError, match='params_4_.*(do not match the fingerprint|cannot be read)'):
    state_lib.load_encoder(directory)


def test_an_export_without_fingerprint_is_refused(tmp_path):
  directory, _ = _export(tmp_path)
  from lemumo_jax import files  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, 'encoder_config.json')
  meta = state_lib.read_encoder_config(directory)
  del meta['fingerprint']
  files.write_json_atomic(path, meta)
  with pytest.raises(ValueError, match='names no params fingerprint'):
    state_lib.load_encoder(directory)


def test_analyze_names_a_truncated_encoder_config(tmp_path):
  from lemumo_jax.training import analyze  # pylint: disable=g-import-not-at-top
  directory, _ = _export(tmp_path)
  path = os.path.join(directory, 'encoder_config.json')
  with open(path) as f:
    text = f.read()
  with open(path, 'w') as f:
    f.write(text[:len(text) // 2])
  with pytest.raises(ValueError, match='encoder_config.json'):
    analyze._exported_meta(directory, 'analyze.reference')  # pylint: disable=protected-access


def test_an_encoder_of_another_row_is_refused(tmp_path):
  from lemumo_jax.training import pretrained  # pylint: disable=g-import-not-at-top
  directory, _ = _export(tmp_path)
  config = tiny_config('lemumo')
  pretrained.load_encoder(directory, config.model, 'probe.encoder_dir', 'lemumo')
  with pytest.raises(ValueError, match="pretrained as 'lemumo', not as this run's config.method "
                                       "'lemumo_vicreg'"):
    pretrained.load_encoder(directory, config.model, 'probe.encoder_dir', 'lemumo_vicreg')


@pytest.mark.parametrize('fraction', [0.3, 0.6, 0.9])
def test_a_flipped_byte_in_a_kept_best_is_refused(tmp_path, fraction):
  import optax  # pylint: disable=g-import-not-at-top
  from lemumo_jax.training import loop  # pylint: disable=g-import-not-at-top
  make = lambda w: state_lib.create_train_state(
      {'params': {'w': jax.numpy.asarray(w, jax.numpy.float32)}}, optax.sgd(0.1))
  weights = np.random.default_rng(0).normal(size=8192)
  loop.KeepBest(str(tmp_path)).save(3, make(weights), {'loss': 1.0})
  keep = loop.KeepBest(str(tmp_path))
  assert keep.best == {'step': 3, 'metrics': {'loss': 1.0}}  # the digest is not a metric
  np.testing.assert_array_equal(keep.restore(make(np.zeros(8192))).params['w'],
                                weights.astype(np.float32))
  target = max((os.path.join(root, name) for root, _, names in os.walk(tmp_path / 'best' / '3')
                for name in names), key=os.path.getsize)
  with open(target, 'r+b') as f:
    data = bytearray(f.read())
    data[int(len(data) * fraction)] ^= 0x01
    f.seek(0)
    f.write(data)
  with pytest.raises(ValueError, match='best holds a kept best that cannot be read .*'
                                       '(do not match the fingerprint|Error)'):
    loop.KeepBest(str(tmp_path)).restore(make(np.zeros(8192)))
