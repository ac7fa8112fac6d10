"""The sharded, resumable driver every converter runs on, and the CLI flags they share.

Output layout (one directory per dataset; several splits may share it):

  <output_dir>/<split>-SSSSS-of-NNNNN.array_record    records (schema.encode), written atomically
  <output_dir>/<split>-SSSSS-of-NNNNN.stats.json      that shard's counts, skipped inputs, argv
  <output_dir>/metadata.json                          merged view of all finished splits

Sharding: a converter lists its work units (input files, scenes or image pairs), sorted by a
stable name; shard i of N converts units[i::N] into one ArrayRecord file. `--shard_index=i`
converts only shard i (one task of a cluster array job); the default -1 converts all shards in
this process. A shard is finished once both its .array_record and its .stats.json exist (the
stats are written after the records, both atomically), so a rerun skips finished shards and
redoes a shard whose process died.

metadata.json is a pure function of the finished shards on disk: after each shard, the process
checks every split in <output_dir>; splits whose N shards are all finished are merged into
metadata.json (rewritten atomically). Whichever array task finishes last therefore writes the
complete file; `--finalize` rewrites it without converting anything (run it once after an array
job if two tasks of different splits may have finished at the same instant).

Corrupt inputs: a converter raises CorruptInputError(path, reason) for an input it cannot
decode; the unit (or, where the converter reports it per frame, the frame) is skipped, and the
path and reason are logged and recorded in the stats and metadata. Any other exception is a
bug and stops the run.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import app
from absl import flags
from absl import logging
from PIL import Image

from lemumo_jax.data import schema

# A converted frame: the record dict (schema.FIELDS + meta) and, when the stored RGB is the
# unmodified source image, its original JPEG bytes (stored as-is instead of re-encoding).
Frame = tuple[dict[str, Any], bytes | None]


class CorruptInputError(Exception):
  """An input file that cannot be decoded; the driver skips it and records path and reason."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = path
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  name: str  # stable and unique: the sharding order and the name used in reports
  payload: Any


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What metadata.json says about the dataset (identical for every split)."""
  name: str
  companion: str  # 'depth' | 'thermal'
  classes_2d: tuple[str, ...]
  seg_classes: tuple[str, ...]
  sources: tuple[str, ...]  # input paths of this run
  options: Mapping[str, Any]  # converter settings worth recording (cameras, stride, ...)
  classes_3d: tuple[str, ...] = schema.CLASSES_3D


@dataclasses.dataclass(frozen=True)
class RunConfig:
  output_dir: str
  split: str
  num_shards: int = 1
  shard_index: int = -1  # -1: every shard in this process
  image_height: int = 320
  image_width: int = 480
  max_frames: int = 0  # per shard; 0 = no cap (smoke runs only)
  rgb_format: str = 'jpeg'  # 'jpeg' (quality 95) or 'png' (lossless)
  command_line: tuple[str, ...] = ()


class ShardStats:
  """Counts for one shard, written next to it as <shard>.stats.json."""

  def __init__(self, info: DatasetInfo, config: RunConfig, index: int, units: Sequence[str]):
    self.info, self.config, self.index, self.units = info, config, index, list(units)
    self.num_records = 0
    self.skipped: dict[str, str] = {}
    self.box_counts_3d: collections.Counter[str] = collections.Counter()
    self.box_counts_2d: collections.Counter[str] = collections.Counter()

  def skip(self, path: str, reason: str) -> None:
    logging.warning('skipping corrupt input %s: %s', path, reason)
    self.skipped[path] = reason

  def add(self, boxes3d_cls: np.ndarray, boxes2d_cls: np.ndarray) -> None:
    """Counts one written record with its box classes ([K] and [M] indices)."""
    self.num_records += 1
    for cls in np.asarray(boxes3d_cls).tolist():
      self.box_counts_3d[self.info.classes_3d[cls]] += 1
    for cls in np.asarray(boxes2d_cls).tolist():
      self.box_counts_2d[self.info.classes_2d[cls]] += 1

  def to_json(self) -> dict[str, Any]:
    return {
        'dataset': self.info.name,
        'companion': self.info.companion,
        'classes_3d': list(self.info.classes_3d),
        'classes_2d': list(self.info.classes_2d),
        'seg_classes': list(self.info.seg_classes),
        'image_size': [self.config.image_height, self.config.image_width],
        'split': self.config.split,
        'shard_index': self.index,
        'num_shards': self.config.num_shards,
        'num_records': self.num_records,
        'units': self.units,
        'skipped': dict(sorted(self.skipped.items())),
        'box_counts_3d': dict(self.box_counts_3d),
        'box_counts_2d': dict(self.box_counts_2d),
        'max_frames': self.config.max_frames,
        'sources': list(self.info.sources),
        'options': dict(self.info.options),
        'command_line': list(self.config.command_line),
    }


def shard_paths(output_dir: str, split: str, index: int, num_shards: int) -> tuple[str, str]:
  """(records path, stats path) of one shard."""
  name = schema.shard_name(split, index, num_shards)
  stem = name[:-len('.array_record')]
  return os.path.join(output_dir, name), os.path.join(output_dir, stem + '.stats.json')


def encode_rgb_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def _encode(record: Mapping[str, Any], source_jpeg: bytes | None, config: RunConfig) -> bytes:
  if source_jpeg is None and config.rgb_format == 'jpeg':
    source_jpeg = encode_rgb_jpeg(record['rgb'])
  elif config.rgb_format == 'png':
    source_jpeg = None
  return schema.encode(record, rgb_jpeg=source_jpeg)


_STATS_RE = re.compile(r'^(?P<split>.+)-(?P<index>\d{5})-of-(?P<num>\d{5})\.stats\.json$')


def _stats_files(output_dir: str) -> list[tuple[str, int, int, str]]:
  """(split, shard index, num_shards, path) of every shard stats file in output_dir."""
  found = []
  for path in sorted(glob.glob(os.path.join(output_dir, '*.stats.json'))):
    match = _STATS_RE.match(os.path.basename(path))
    if match:
      found.append((match['split'], int(match['index']), int(match['num']), path))
  return found


def _check_no_conflicting_shards(config: RunConfig) -> None:
  other = [path for split, _, num, path in _stats_files(config.output_dir)
           if split == config.split and num != config.num_shards]
  if other:
    raise ValueError(f'{config.output_dir} already holds split {config.split!r} with another '
                     f'--num_shards ({os.path.basename(other[0])}); use a fresh --output_dir '
                     f'or the same --num_shards={config.num_shards} to resume')


def run(units: Sequence[WorkUnit], convert_unit: Callable[[Any, ShardStats], Iterator[Frame]],
        info: DatasetInfo, config: RunConfig) -> dict[str, Any] | None:
  """Converts this process' shards, then refreshes metadata.json; returns the metadata (or
  None while some split is unfinished elsewhere).

  convert_unit(payload, stats) yields the unit's frames; it raises CorruptInputError to drop
  the whole unit, or calls stats.skip(...) itself for a frame it drops.
  """
  if config.num_shards < 1 or not -1 <= config.shard_index < config.num_shards:
    raise ValueError(f'--shard_index={config.shard_index} must be -1 or in [0, '
                     f'--num_shards={config.num_shards})')
  names = [u.name for u in units]
  if len(set(names)) != len(names):
    raise ValueError(f'work unit names are not unique: {sorted(names)[:5]}...')
  units = sorted(units, key=lambda u: u.name)
  os.makedirs(config.output_dir, exist_ok=True)
  _check_no_conflicting_shards(config)
  indices = range(config.num_shards) if config.shard_index < 0 else [config.shard_index]
  for index in indices:
    _convert_shard(units[index::config.num_shards], convert_unit, info, config, index)
  return finalize(config.output_dir, config.command_line)


def _convert_shard(units: Sequence[WorkUnit], convert_unit, info: DatasetInfo, config: RunConfig,
                   index: int) -> None:
  path, stats_path = shard_paths(config.output_dir, config.split, index, config.num_shards)
  tag = f'[{info.name}/{config.split} shard {index + 1}/{config.num_shards}]'
  if os.path.exists(path) and os.path.exists(stats_path):
    logging.info('%s finished earlier, skipping: %s', tag, path)
    return
  stats = ShardStats(info, config, index, [u.name for u in units])
  start = time.time()

  def records() -> Iterator[bytes]:
    last_log = start
    for done, unit in enumerate(units):
      if config.max_frames and stats.num_records >= config.max_frames:
        break
      # A unit is buffered (encoded) whole so that a file found corrupt halfway adds nothing.
      pending: list[tuple[bytes, np.ndarray, np.ndarray]] = []
      try:
        for record, source_jpeg in convert_unit(unit.payload, stats):
          if config.max_frames and stats.num_records + len(pending) >= config.max_frames:
            break
          pending.append((_encode(record, source_jpeg, config), record['boxes3d_cls'],
                          record['boxes2d_cls']))
      except CorruptInputError as e:
        stats.skip(e.path, e.reason)
        continue
      for blob, classes_3d, classes_2d in pending:
        stats.add(classes_3d, classes_2d)
        yield blob
      now = time.time()
      if now - last_log > 10 or done + 1 == len(units):
        last_log = now
        logging.info('%s units %d/%d  records %d  %.1f records/s  skipped %d', tag, done + 1,
                     len(units), stats.num_records, stats.num_records / max(now - start, 1e-9),
                     len(stats.skipped))

  count = schema.write_shard(path, records())
  assert count == stats.num_records, (count, stats.num_records)
  schema.write_json_atomic(stats_path, stats.to_json())
  logging.info('%s wrote %d records from %d units in %.1f s (%d inputs skipped) -> %s', tag,
               count, len(units), time.time() - start, len(stats.skipped), path)


_SAME_EVERY_SPLIT = ('dataset', 'companion', 'classes_3d', 'classes_2d', 'seg_classes',
                     'image_size')


def finalize(output_dir: str, command_line: Sequence[str] = ()) -> dict[str, Any] | None:
  """(Re)writes metadata.json from the finished splits in output_dir; returns it, or None
  when no split is finished yet."""
  by_split: dict[str, dict[int, dict[str, Any]]] = collections.defaultdict(dict)
  num_shards: dict[str, set[int]] = collections.defaultdict(set)
  for split, index, num, stats_path in _stats_files(output_dir):
    num_shards[split].add(num)
    if os.path.exists(shard_paths(output_dir, split, index, num)[0]):
      with open(stats_path) as f:
        by_split[split][index] = json.load(f)
  finished = {}
  for split, nums in sorted(num_shards.items()):
    if len(nums) > 1:
      raise ValueError(f'{output_dir}: split {split!r} has shards of several --num_shards '
                       f'{sorted(nums)}; remove the stale ones')
    (num,) = nums
    if sorted(by_split[split]) == list(range(num)):
      finished[split] = [by_split[split][i] for i in range(num)]
    else:
      logging.info('split %s: %d/%d shards finished, not in metadata.json yet', split,
                   len(by_split[split]), num)
  if not finished:
    return None
  first = next(iter(finished.values()))[0]
  for split, shards in finished.items():
    for stats in shards:
      for key in _SAME_EVERY_SPLIT:
        if stats[key] != first[key]:
          raise ValueError(f'{output_dir}: {key} of split {split!r} shard {stats["shard_index"]} '
                           f'is {stats[key]!r}, but {first["split"]!r} has {first[key]!r}')

  def per_split(fn):
    return {split: fn(shards) for split, shards in finished.items()}

  def merged_counts(key):
    return per_split(lambda shards: dict(sum((collections.Counter(s[key]) for s in shards),
                                             collections.Counter())))

  metadata = {key: first[key] for key in _SAME_EVERY_SPLIT}
  metadata.update(
      schema_version=schema.SCHEMA_VERSION,
      r_max=schema.R_MAX,
      ignore_label=schema.IGNORE_LABEL,
      splits=per_split(lambda shards: sum(s['num_records'] for s in shards)),
      num_shards=per_split(len),
      shard_files=per_split(lambda shards: [
          schema.shard_name(s['split'], s['shard_index'], s['num_shards']) for s in shards]),
      num_units=per_split(lambda shards: sum(len(s['units']) for s in shards)),
      skipped=per_split(lambda shards: {k: v for s in shards for k, v in s['skipped'].items()}),
      num_skipped=per_split(lambda shards: sum(len(s['skipped']) for s in shards)),
      box_counts_3d=merged_counts('box_counts_3d'),
      box_counts_2d=merged_counts('box_counts_2d'),
      max_frames=per_split(lambda shards: shards[0]['max_frames']),
      sources=per_split(lambda shards: shards[0]['sources']),
      options=per_split(lambda shards: shards[0]['options']),
      prep_command_lines=per_split(
          lambda shards: sorted({' '.join(s['command_line']) for s in shards})),
      command_line=list(command_line),
  )
  schema.write_json_atomic(os.path.join(output_dir, 'metadata.json'), metadata)
  logging.info('metadata.json: splits %s', metadata['splits'])
  return metadata


def define_common_flags(fv: flags.FlagValues, image_height: int, image_width: int) -> None:
  """The flags every converter CLI takes."""
  flags.DEFINE_string('output_dir', None, 'Directory for the shards and metadata.json.',
                      flag_values=fv)
  flags.DEFINE_string('split', 'train', 'Split name written into shard file names.',
                      flag_values=fv)
  flags.DEFINE_integer('num_shards', 1, 'Number of output shards of this split.', flag_values=fv)
  flags.DEFINE_integer('shard_index', -1, 'Convert only this shard (array-job task id); -1: all.',
                       flag_values=fv)
  flags.DEFINE_integer('image_height', image_height, 'Stored image height.', flag_values=fv)
  flags.DEFINE_integer('image_width', image_width, 'Stored image width.', flag_values=fv)
  flags.DEFINE_integer('max_frames', 0, 'Stop a shard after this many records (smoke runs).',
                       flag_values=fv)
  flags.DEFINE_enum('rgb_format', 'jpeg', ['jpeg', 'png'], 'How the stored RGB is encoded.',
                    flag_values=fv)
  flags.DEFINE_bool('finalize', False, 'Only rewrite metadata.json from finished shards.',
                    flag_values=fv)
  flags.mark_flag_as_required('output_dir', flag_values=fv)


def config_from_flags(fv: flags.FlagValues, argv: Sequence[str]) -> RunConfig:
  """argv: the full command line, recorded in the stats and metadata."""
  return RunConfig(output_dir=fv.output_dir, split=fv.split, num_shards=fv.num_shards,
                   shard_index=fv.shard_index, image_height=fv.image_height,
                   image_width=fv.image_width, max_frames=fv.max_frames,
                   rgb_format=fv.rgb_format, command_line=tuple(argv))


def parse_flags(define: Callable[[flags.FlagValues], None],
                argv: Sequence[str]) -> flags.FlagValues:
  """Parses argv ([program, --flag=...]) into a fresh FlagValues, so the converters can be
  driven in-process (tests) without clashing on the global absl FLAGS."""
  fv = flags.FlagValues()
  define(fv)
  fv(list(argv))
  return fv


def absl_main(run_from_flags: Callable[[flags.FlagValues, Sequence[str]], Any]
              ) -> Callable[[Sequence[str]], None]:
  """The function for absl.app.run: runs on the global FLAGS, records the full sys.argv."""

  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected positional arguments {argv[1:]}')
    run_from_flags(flags.FLAGS, sys.argv)

  return main


def summarize(metadata: Mapping[str, Any] | None, config: RunConfig) -> str:
  if metadata is None or config.split not in metadata['splits']:
    return (f'{config.split}: shard(s) done; metadata.json waits for the other shards '
            f'of {config.output_dir}')
  split = config.split
  return (f'{split}: {metadata["splits"][split]} records in {metadata["num_shards"][split]} '
          f'shards from {metadata["num_units"][split]} units, {metadata["num_skipped"][split]} '
          f'inputs skipped, 3D boxes {metadata["box_counts_3d"][split]}, 2D boxes '
          f'{metadata["box_counts_2d"][split]} -> {config.output_dir}')
