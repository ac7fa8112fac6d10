"""grain loaders. The host decodes frames and ships fixed-size arrays; crops, resizes and
photometric augmentation run on the device inside the jitted step (augment.py).

Batch `i` of a loader is a pure function of (seed, i): the order is grain's index shuffle,
re-permuted every epoch, so a resumed run continues exactly where it stopped by starting at
its step index, with no iterator state to checkpoint. Each host reads a disjoint strided
slice of the records (multi-host runs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from lemumo_jax.data import geometry as geometry_lib
from lemumo_jax.data import sources
from lemumo_jax.tasks import heads as heads_lib
from lemumo_jax.tasks import targets


def _resize_frame(record: dict[str, Any], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """rgb [H, W, 3] uint8 (bilinear) and companion [H, W] float32 (nearest: depth values are
  never interpolated) at the configured size; uint16 companion codes stay codes."""
  rgb, companion = record['rgb'], record['companion']
  if rgb.shape[:2] != (height, width):
    rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
  if companion.shape != (height, width):
    rows = np.minimum(((np.arange(height) + 0.5) * companion.shape[0] / height).astype(int),
                      companion.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * companion.shape[1] / width).astype(int),
                      companion.shape[1] - 1)
    companion = companion[rows[:, None], cols[None, :]]
  if companion.dtype != np.uint16:
    companion = companion.astype(np.float32, copy=False)
  return rgb, companion


class _PretrainFrame(grain.transforms.Map):
  """Record -> the two arrays pretraining needs (+ 'seg' [H, W] uint8, nearest, if with_seg)."""

  def __init__(self, height: int, width: int, with_seg: bool = False):
    self._height, self._width, self._with_seg = height, width, with_seg
    self.keys = ('rgb', 'companion', 'seg') if with_seg else ('rgb', 'companion')

  def map(self, record):
    rgb, companion = _resize_frame(record, self._height, self._width)
    if not self._with_seg:
      return {'rgb': rgb, 'companion': companion}
    return {'rgb': rgb, 'companion': companion,
            'seg': targets.nearest(record['seg'], (self._height, self._width))}


def steps_per_epoch(num_records: int, global_batch_size: int) -> int:
  return max(1, num_records // global_batch_size)


def _host_batch(global_batch_size: int) -> int:
  num_hosts = jax.process_count()
  if global_batch_size % num_hosts:
    raise ValueError(f'batch_size {global_batch_size} is not divisible by the '
                     f'{num_hosts} hosts')
  return global_batch_size // num_hosts


def _host_records(data_cfg, split: str, keys: tuple[str, ...] | None = None,
                  companion_codes: bool = False):
  source = sources.build_source(data_cfg, split, keys, companion_codes)
  return source, grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]


def host_record_count(num_records: int) -> int:
  """How many of a split's num_records this host reads (_host_records strides them)."""
  return len(range(jax.process_index(), num_records, jax.process_count()))


def eval_record_indices(batch_index: int, host_batch: int) -> np.ndarray:
  """[host_batch] split indices of the rows of batch `batch_index` of this host's
  probe_eval_loader pass (_host_records strides them; padding rows continue the count)."""
  positions = batch_index * host_batch + np.arange(host_batch)
  return jax.process_index() + positions * jax.process_count()


def _require_one_batch(what: str, num_host_records: int, host_batch: int) -> None:
  if num_host_records < host_batch:
    raise ValueError(f'{what} has {num_host_records} records per host, fewer than one batch '
                     f'of {host_batch}')


def _iterate(dataset, data_cfg):
  iterator = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch))
  if data_cfg.num_workers > 0:
    iterator = iterator.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return iter(iterator)


def _training_batches(data_cfg, split: str,
                      frame: grain.transforms.Map | grain.transforms.RandomMap,
                      global_batch_size: int, seed: int, start_step: int, num_steps: int):
  """Shuffled, repeated, batched; batch i is a pure function of (seed, i). A RandomMap frame
  draws from a generator seeded by (seed, position in the repeated order)."""
  host_batch = _host_batch(global_batch_size)
  if isinstance(frame, _PretrainFrame):  # reads two fields; uint16 companions stay codes
    source, records = _host_records(data_cfg, split, frame.keys, companion_codes=True)
  else:
    source, records = _host_records(data_cfg, split)
  _require_one_batch(repr(source), len(records), host_batch)
  dataset = _epoch_order(records, seed, num_steps, host_batch)
  if isinstance(frame, grain.transforms.RandomMap):
    dataset = dataset.random_map(frame, seed=seed)
  else:
    dataset = dataset.map(frame)
  dataset = dataset.batch(host_batch, drop_remainder=True)
  return _iterate(dataset[start_step:num_steps], data_cfg)


def _epoch_order(records: grain.MapDataset, seed: int, num_steps: int,
                 host_batch: int) -> grain.MapDataset:
  """The records shuffled (re-permuted every epoch) and repeated past num_steps batches."""
  epochs = math.ceil(num_steps * host_batch / len(records)) + 1
  return records.shuffle(seed=seed).repeat(epochs)


def training_positions(num_host_records: int, global_batch_size: int, *, seed: int,
                       start_step: int, num_steps: int) -> Iterator[np.ndarray]:
  """What _training_batches reads, as positions: batch i (start_step <= i < num_steps) is the
  int array of this host's record positions (0 .. num_host_records - 1) that the loader with
  the same seed puts in batch i. A loader reading from a cache (probe.cache_features) yields
  exactly the frames of the rendering loader, step for step."""
  host_batch = _host_batch(global_batch_size)
  _require_one_batch('the cached split', num_host_records, host_batch)
  positions = _epoch_order(grain.MapDataset.range(num_host_records), seed, num_steps, host_batch)
  batches = positions.batch(host_batch, drop_remainder=True)[start_step:num_steps]
  for batch in batches:
    yield np.asarray(batch, dtype=np.int64)


def pretrain_loader(data_cfg, global_batch_size: int, *, seed: int, start_step: int,
                    num_steps: int, split: str = 'train',
                    with_seg: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Yields this host's part of batches start_step .. num_steps - 1.

  Each element: {'rgb': [b, H, W, 3] uint8, 'companion': [b, H, W] float32} with
  b = global_batch_size / process_count; with_seg (views.with_seg) adds 'seg' [b, H, W] uint8.
  Only those fields are decoded. A dataset built with companion_format 'uint16' yields the
  companion as its uint16 codes (half the bytes to the device; the step divides them,
  augment.make_views).
  """
  height, width = data_cfg.image_size
  return _training_batches(data_cfg, split, _PretrainFrame(height, width, with_seg),
                           global_batch_size, seed, start_step, num_steps)


# ----------------------------------------------------------------------------- probe views


@dataclasses.dataclass(frozen=True)
class ProbeGeometry:
  """Resolutions of one probe setup: the clean view, the encoder's patch grid and every head's
  output grid (S3: CenterNet 2x the grid, depth 4x, occupancy 2x, segmentation a fixed size)."""
  image_hw: tuple[int, int]
  grid_hw: tuple[int, int]
  seg_hw: tuple[int, int]

  @classmethod
  def create(cls, image_hw, patch_size: int, seg_hw) -> ProbeGeometry:
    image_hw, seg_hw = tuple(int(v) for v in image_hw), tuple(int(v) for v in seg_hw)
    if image_hw[0] % patch_size or image_hw[1] % patch_size:
      raise ValueError(f'probe.image_size {image_hw} is not divisible by the encoder patch size '
                       f'{patch_size}')
    return cls(image_hw, (image_hw[0] // patch_size, image_hw[1] // patch_size), seg_hw)

  def scaled(self, factor: int) -> tuple[int, int]:
    return self.grid_hw[0] * factor, self.grid_hw[1] * factor

  @property
  def detection_hw(self) -> tuple[int, int]:
    return self.scaled(2)

  @property
  def depth_hw(self) -> tuple[int, int]:
    return self.scaled(4)

  @property
  def occupancy_hw(self) -> tuple[int, int]:
    return self.scaled(2)


class ProbeFrame(grain.transforms.Map):
  """Record -> a deterministic clean probe view and the targets of every enabled head.

  The frame is resized (RGB bilinear, companion nearest) to geometry.image_hw; intrinsics and
  2D boxes are scaled with it, 3D boxes stay in metres. Keys (per frame):
    rgb [H, W, 3] uint8, companion [H, W] float32, intrinsics [3, 3], valid () 1.0
    gt3d_boxes [G, 7], gt3d_classes [G] int32, gt3d_mask [G]    visible 3D boxes (evaluation)
    ct3d_<heatmap|index|offset|size|depth|yaw|mask>             CenterNet3D targets (M slots)
    gt2d_boxes [G, 4], gt2d_classes [G] int32, gt2d_mask [G]    2D boxes in probe pixels
    ct2d_<heatmap|index|offset|wh|mask>                         CenterNet2D targets
    seg [seg_h, seg_w] uint8 (nearest; IGNORE = 255)
    depth [4 gh, 4 gw] float32 metres (cell mean of valid pixels; 0 = none)
    occupancy [2 gh, 2 gw, C2 + 1]
  M = probe.max_objects regression slots (CenterNet's cap; extra objects still get heatmap
  peaks), G = probe.max_gt_boxes evaluation boxes (a frame with more is an error, never a
  silent truncation of the ground truth).
  """

  def __init__(self, geometry: ProbeGeometry, heads: tuple[str, ...], num_classes_3d: int,
               num_classes_2d: int, max_objects: int, max_gt_boxes: int):
    self._heads = tuple(heads_lib.get(name) for name in heads)
    self._spec = heads_lib.Spec(geometry, num_classes_3d, num_classes_2d, max_objects,
                                max_gt_boxes)

  def map(self, record):
    height, width = self._spec.geometry.image_hw
    src_h, src_w = record['rgb'].shape[:2]
    sx, sy = width / src_w, height / src_h
    rgb, companion = _resize_frame(record, height, width)
    intrinsics = geometry_lib.scale_intrinsics(record['intrinsics'], sx, sy)
    out = {'rgb': rgb, 'companion': companion, 'intrinsics': intrinsics.astype(np.float32),
           'valid': np.float32(1.0)}
    frame = heads_lib.Frame(record, (height, width), intrinsics,
                            record['boxes2d'].astype(np.float64) * np.array([sx, sy, sx, sy]))
    for head in self._heads:
      out.update(head.targets(frame, self._spec))
    return out


def probe_train_loader(data_cfg, frame: ProbeFrame | grain.transforms.RandomMap,
                       global_batch_size: int, *, seed: int, start_step: int,
                       num_steps: int) -> Iterator[dict[str, np.ndarray]]:
  """Probe-training batches start_step .. num_steps - 1 of the train split (shuffled per
  epoch, deterministic per step like pretrain_loader); `frame` may be a random transform
  (finetune_views.CroppedProbeFrame)."""
  return _training_batches(data_cfg, 'train', frame, global_batch_size, seed, start_step,
                           num_steps)


def num_eval_batches(num_records: int, global_batch_size: int) -> int:
  """Batches of one full pass over a split: the same on every host (records are strided over
  hosts; hosts with fewer records pad)."""
  host_batch = _host_batch(global_batch_size)
  per_host = math.ceil(num_records / jax.process_count())
  return max(1, math.ceil(per_host / host_batch))


def probe_eval_loader(data_cfg, frame: ProbeFrame, global_batch_size: int,
                      split: str = 'val') -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over `split`. The last batch is padded with copies of its last frame
  whose 'valid' is 0, so every batch has the full size (the mesh needs it) and every host
  yields num_eval_batches batches."""
  host_batch = _host_batch(global_batch_size)
  source, records = _host_records(data_cfg, split)
  total = num_eval_batches(len(source), global_batch_size)
  if len(records) == 0:
    raise ValueError(f'{source!r} has no {split!r} records for host {jax.process_index()}')
  dataset = records.map(frame).batch(host_batch, drop_remainder=False)
  count = 0
  for batch in _iterate(dataset, data_cfg):
    yield _pad_batch(batch, host_batch)
    count += 1
  last = None
  while count < total:  # this host ran out of records: all-padding batches keep hosts in step
    if last is None:
      last = _pad_batch({k: v[:1] for k, v in batch.items()}, host_batch)
      last['valid'] = np.zeros_like(last['valid'])
    yield last
    count += 1


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  have = next(iter(batch.values())).shape[0]
  if have == size:
    return batch
  out = {k: np.concatenate([v, np.repeat(v[-1:], size - have, axis=0)]) for k, v in batch.items()}
  out['valid'][have:] = 0.0
  return out
