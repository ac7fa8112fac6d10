"""grain loaders. The host decodes frames and ships fixed-size arrays; crops, resizes and
photometric augmentation run on the device inside the jitted step (augment.py).

Batch `i` of a loader is a pure function of (seed, i): the order is grain's index shuffle,
re-permuted every epoch, so a resumed run continues exactly where it stopped by starting at
its step index, with no iterator state to checkpoint. Each host reads a disjoint strided
slice of the records (multi-host runs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from lemumo_jax.data import sources


def _resize_frame(record: dict[str, Any], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """rgb [H, W, 3] uint8 (bilinear) and companion [H, W] float32 (nearest: depth values are
  never interpolated) at the configured size."""
  rgb, companion = record['rgb'], record['companion']
  if rgb.shape[:2] != (height, width):
    rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
  if companion.shape != (height, width):
    rows = np.minimum(((np.arange(height) + 0.5) * companion.shape[0] / height).astype(int),
                      companion.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * companion.shape[1] / width).astype(int),
                      companion.shape[1] - 1)
    companion = companion[rows[:, None], cols[None, :]]
  return rgb, companion.astype(np.float32)


class _PretrainFrame(grain.transforms.Map):
  """Record -> the two arrays pretraining needs."""

  def __init__(self, height: int, width: int):
    self._height, self._width = height, width

  def map(self, record):
    rgb, companion = _resize_frame(record, self._height, self._width)
    return {'rgb': rgb, 'companion': companion}


def steps_per_epoch(num_records: int, global_batch_size: int) -> int:
  return max(1, num_records // global_batch_size)


def pretrain_loader(data_cfg, global_batch_size: int, *, seed: int, start_step: int,
                    num_steps: int, split: str = 'train') -> Iterator[dict[str, np.ndarray]]:
  """Yields this host's part of batches start_step .. num_steps - 1.

  Each element: {'rgb': [b, H, W, 3] uint8, 'companion': [b, H, W] float32} with
  b = global_batch_size / process_count.
  """
  num_hosts = jax.process_count()
  if global_batch_size % num_hosts:
    raise ValueError(f'batch_size {global_batch_size} is not divisible by the '
                     f'{num_hosts} hosts')
  host_batch = global_batch_size // num_hosts
  source = sources.build_source(data_cfg, split)
  records = grain.MapDataset.source(source)[jax.process_index()::num_hosts]
  if len(records) < host_batch:
    raise ValueError(f'{source!r} has {len(records)} records per host, fewer than one '
                     f'batch of {host_batch}')
  epochs = math.ceil(num_steps * host_batch / len(records)) + 1
  height, width = data_cfg.image_size
  dataset = (records.shuffle(seed=seed).repeat(epochs)
             .map(_PretrainFrame(height, width))
             .batch(host_batch, drop_remainder=True))
  dataset = dataset[start_step:num_steps]
  iterator = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch))
  if data_cfg.num_workers > 0:
    iterator = iterator.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return iter(iterator)
