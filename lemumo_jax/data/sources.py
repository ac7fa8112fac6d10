"""Random-access record sources: prepared ArrayRecord shards, or the synthetic scenes.

Every source yields records in the layout of schema.py and has `__len__` / `__getitem__`, so
grain can shuffle, shard and batch it by index.
"""

from __future__ import annotations

import bisect
import glob
import os
from typing import Any

import numpy as np

from lemumo_jax.data import schema


class ArrayRecordSource:
  """Records of one split of a prepared dataset (`<data_dir>/<split>-*.array_record`)."""

  def __init__(self, data_dir: str, split: str):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    # metadata.json lists a split's shards only once every shard of it is finished, so a
    # conversion still running (or a crashed one) is never read half-done.
    shard_files = schema.read_metadata(data_dir).get('shard_files', {})
    if split not in shard_files:
      pattern = os.path.join(data_dir, f'{split}-*-of-*.array_record')
      raise FileNotFoundError(
          f'{os.path.join(data_dir, "metadata.json")} lists no finished split {split!r} '
          f'(finished: {sorted(shard_files)}; shards on disk: {len(glob.glob(pattern))}); '
          f'finish the data_prep run for it or run it with --finalize')
    self._paths = [os.path.join(data_dir, name) for name in shard_files[split]]
    self._readers = [array_record_module.ArrayRecordReader(p) for p in self._paths]
    counts = [reader.num_records() for reader in self._readers]
    self._starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    self.split = split

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} out of range [0, {len(self)})')
    shard = bisect.bisect_right(self._starts, index) - 1
    offset = index - self._starts[shard]
    blob = self._readers[shard].read([offset])[0]
    return schema.decode(blob, where=f'{self._paths[shard]}[{offset}]')

  def __repr__(self) -> str:
    return f'ArrayRecordSource({len(self._paths)} shards, {len(self)} records, {self.split})'

  def __getstate__(self):
    # Readers hold file handles; reopen them in grain worker processes.
    return {'paths': self._paths, 'split': self.split}

  def __setstate__(self, state):
    self.__init__(os.path.dirname(state['paths'][0]), state['split'])


def build_source(data_cfg, split: str):
  """The record source of `data_cfg.name` ('synthetic' or 'arrayrecord') for `split`."""
  if data_cfg.name == 'synthetic':
    from lemumo_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    num = {'train': data_cfg.num_train, 'val': data_cfg.num_val}.get(split)
    if num is None:
      raise ValueError(f"synthetic data has splits 'train' and 'val', not {split!r}")
    height, width = data_cfg.image_size
    return synthetic.SyntheticScenes(num, height=height, width=width,
                                     companion=data_cfg.companion, seed=data_cfg.seed,
                                     split=split, object_range=tuple(data_cfg.object_range))
  if data_cfg.name == 'arrayrecord':
    if not data_cfg.data_dir:
      raise ValueError('config.data.data_dir is empty: point it at a data_prep output folder '
                       '(--config.data.data_dir=/path/to/shards)')
    return ArrayRecordSource(data_cfg.data_dir, split)
  raise ValueError(f"config.data.name must be 'synthetic' or 'arrayrecord', got "
                   f'{data_cfg.name!r}')


def dataset_metadata(data_cfg) -> dict[str, Any]:
  """Class lists, companion kind and stored image size of the configured dataset."""
  if data_cfg.name == 'synthetic':
    from lemumo_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    height, width = data_cfg.image_size
    return synthetic.metadata(num_train=data_cfg.num_train, num_val=data_cfg.num_val,
                              height=height, width=width, companion=data_cfg.companion)
  return schema.read_metadata(data_cfg.data_dir)
