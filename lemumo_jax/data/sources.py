"""Random-access record sources: datasets built by data_prep/ (TFDS), or the synthetic scenes.

Every source yields records in the layout of schema.py and has `__len__` / `__getitem__`, so
grain can shuffle, shard and batch it by index.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from typing import Any

import numpy as np

from lemumo_jax.data import schema


class TfdsSource:
  """Records of one split of a dataset built by data_prep/ (a TFDS `array_record` folder,
  `<data_dir>/<name>/<config>/<version>`), read with `tfds` `as_data_source`.

  Before anything is read, every shard the dataset info lists is opened and its record count
  compared with the info: a missing, empty or truncated shard stops here, named.

  keys: the schema FIELDS a stage reads (default all of them and meta). The others are neither
  parsed out of the stored Example nor decoded (no JPEG decode or zlib inflate of maps the
  stage drops) and are absent from the records. companion_codes: a companion stored as uint16 (builder
  companion_format 'uint16') is returned as those codes (the pretraining loader ships them to
  the device, which divides; schema.companion_from_uint16) instead of as float32.
  """

  def __init__(self, data_dir: str, split: str, keys: tuple[str, ...] | None = None,
               companion_codes: bool = False):
    self.data_dir, self.split = data_dir, split
    self.keys = None if keys is None else tuple(keys)
    self.companion_codes = companion_codes
    if self.keys is not None:
      unknown = [k for k in self.keys if k not in schema.FIELDS]
      if unknown:
        raise ValueError(f'TfdsSource keys {unknown} are not schema fields {list(schema.FIELDS)}')
    builder = tfds_builder(data_dir)
    if split not in builder.info.splits:
      raise ValueError(f'{data_dir} has splits {sorted(builder.info.splits)}, not {split!r}')
    info = builder.info.splits[split]
    self._paths = [os.fspath(p) for p in info.filepaths]
    self._starts = np.concatenate([[0], np.cumsum(info.shard_lengths)]).astype(int).tolist()
    _check_shards(self._paths, list(info.shard_lengths), info.num_examples)
    self._features = builder.info.features
    self._source = builder.as_data_source(split)
    self._read_keys = None
    if self.keys is not None:  # parse and decode only these features of the stored Example
      self._read_keys = _KeysReader(self._features, self.keys)

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} out of range [0, {len(self)})')
    shard = bisect.bisect_right(self._starts, index) - 1
    where = f'{self._paths[shard]}[{index - self._starts[shard]}]'
    try:
      example = (self._source[index] if self._read_keys is None else
                 self._read_keys(self._source.data_source[index]))
      record = from_example(example, self.keys, self.companion_codes)
    except Exception as e:  # pylint: disable=broad-except
      raise schema.SchemaError(f'{where}: cannot read record ({type(e).__name__}: {e})') from e
    schema.validate(record, where, self.keys)
    return record

  def __repr__(self) -> str:
    return f'TfdsSource({self.data_dir}, {self.split}: {len(self._paths)} shards, {len(self)})'

  def __getstate__(self):
    # Readers hold file handles; reopen them in grain worker processes.
    return {'data_dir': self.data_dir, 'split': self.split, 'keys': self.keys,
            'companion_codes': self.companion_codes}

  def __setstate__(self, state):
    self.__init__(**state)


class _KeysReader:
  """Serialized tf.Example -> the decoded features `keys` only (TFDS's numpy parser and
  decoders over a FeaturesDict of just those: the other features are neither converted nor
  decoded)."""

  def __init__(self, features, keys: tuple[str, ...]):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import example_parser  # pylint: disable=g-import-not-at-top
    self._features = tfds.features.FeaturesDict({k: features[k] for k in keys})
    self._parser = example_parser.ExampleParserNp(self._features.get_serialized_info())

  def __call__(self, serialized: bytes) -> dict[str, Any]:
    return self._features.decode_example_np(self._parser.parse_example(serialized))


def tfds_builder(data_dir: str):
  """The read-only TFDS builder of a built dataset folder; one clear error when it is not one."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not data_dir:
    raise ValueError('config.data.data_dir is empty: point it at a dataset built by data_prep/ '
                     '(--config.data.data_dir=<data_dir>/lemumo_waymo/front_320x480/1.0.0)')
  info_path = os.path.join(data_dir, 'dataset_info.json')
  if not os.path.exists(info_path):
    found = sorted(glob.glob(os.path.join(data_dir, '**', 'dataset_info.json'), recursive=True))
    hint = (f'; built datasets below it: {[os.path.dirname(p) for p in found[:5]]}' if found
            else '; build one with python -m data_prep.build')
    raise FileNotFoundError(f'{info_path} not found: config.data.data_dir must be the folder '
                            f'of one built dataset version{hint}')
  for name in ('dataset_info.json', 'features.json', 'metadata.json'):
    path = os.path.join(data_dir, name)
    try:
      with open(path) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f'{path} is missing or not readable JSON ({type(e).__name__}: {e}); '
                       'rebuild the dataset (python -m data_prep.build ... --overwrite)') from e
  return tfds.builder_from_directory(data_dir)


def _check_shards(paths: list[str], lengths: list[int], num_examples: int) -> None:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if sum(lengths) != num_examples:
    raise ValueError(f'dataset info: shard lengths {lengths} do not add up to {num_examples}')
  for path, want in zip(paths, lengths):
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} is missing (the dataset info lists {want} records in '
                              'it); rebuild the dataset')
    try:
      reader = array_record_module.ArrayRecordReader(path)
      have = reader.num_records()
      reader.close()
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{path} is not a readable ArrayRecord file ({type(e).__name__}: {e}); '
                       'rebuild the dataset') from e
    if have != want:
      raise ValueError(f'{path} holds {have} records, the dataset info says {want} '
                       '(truncated or replaced); rebuild the dataset')


def from_example(example: dict[str, Any], keys: tuple[str, ...] | None = None,
                 companion_codes: bool = False) -> dict[str, Any]:
  """A decoded example of data_prep/builder.py's features -> the schema record (only `keys`
  when given; a uint16 companion as float32 unless companion_codes)."""
  record = {}
  for key, (dtype, _) in schema.FIELDS.items():
    if keys is not None and key not in keys:
      continue
    value = np.asarray(example[key])
    if key == 'companion' and value.dtype == np.uint16:
      record[key] = value if companion_codes else schema.companion_from_uint16(value)
    else:
      record[key] = value.astype(np.dtype(dtype), copy=False)
  if keys is not None:
    return record
  meta = example['meta']
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  record['meta'] = {'dataset': text(meta['dataset']), 'scene': text(meta['scene']),
                    'camera': text(meta['camera']), 'frame': int(meta['frame']),
                    'timestamp': int(meta['timestamp']),
                    'has_companion': bool(example['has_companion'])}
  return record


def build_source(data_cfg, split: str, keys: tuple[str, ...] | None = None,
                 companion_codes: bool = False):
  """The record source of `data_cfg.name` ('synthetic' or 'tfds') for `split`; `keys` and
  `companion_codes` as TfdsSource's (the synthetic scenes render every field, as float32)."""
  if data_cfg.name == 'synthetic':
    from lemumo_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    num = {'train': data_cfg.num_train, 'val': data_cfg.num_val}.get(split)
    if num is None:
      raise ValueError(f"synthetic data has splits 'train' and 'val', not {split!r}")
    height, width = data_cfg.image_size
    return synthetic.SyntheticScenes(num, height=height, width=width,
                                     companion=data_cfg.companion, seed=data_cfg.seed,
                                     split=split, object_range=tuple(data_cfg.object_range))
  if data_cfg.name == 'tfds':
    return TfdsSource(data_cfg.data_dir, split, keys, companion_codes)
  raise ValueError(f"config.data.name must be 'synthetic' or 'tfds' (a dataset built by "
                   f"data_prep/), got {data_cfg.name!r}")


def dataset_identity(data_cfg) -> dict[str, Any]:
  """What makes a built dataset's records what they are, wherever its folder lies: its name,
  build settings, input digests and split sizes ({} for the synthetic scenes, which the config
  describes whole). The stages record it with their run and refuse to resume on other data."""
  if data_cfg.name != 'tfds':
    return {}
  info = tfds_builder(data_cfg.data_dir).info
  return {'name': info.full_name, 'settings': info.metadata.get('settings'),
          'inputs': (info.metadata.get('inputs') or {}).get('units_sha256'),
          'splits': {name: int(split.num_examples) for name, split in info.splits.items()}}


def dataset_metadata(data_cfg) -> dict[str, Any]:
  """Class lists, companion kind and stored image size of the configured dataset."""
  if data_cfg.name == 'synthetic':
    from lemumo_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    height, width = data_cfg.image_size
    return synthetic.metadata(num_train=data_cfg.num_train, num_val=data_cfg.num_val,
                              height=height, width=width, companion=data_cfg.companion)
  if data_cfg.name != 'tfds':
    raise ValueError(f"config.data.name must be 'synthetic' or 'tfds', got {data_cfg.name!r}")
  builder = tfds_builder(data_cfg.data_dir)
  metadata = dict(builder.info.metadata)
  metadata['splits'] = {name: int(split.num_examples) for name, split in
                        builder.info.splits.items()}
  return metadata
