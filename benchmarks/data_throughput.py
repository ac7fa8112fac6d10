"""Host-side data throughput: building a dataset (Beam) and the training loader, per core.

  python -m benchmarks.data_throughput                  # 6 segments x 12 frames, 2 workers
  python -m benchmarks.data_throughput --segments=16 --workers=8 --batches=50

Input: Waymo real-format fixture segments (tests/fixtures_real_formats.py) with a 1920 x 1280
textured JPEG camera image, Waymo's FRONT resolution, dense TOP (64 x 2650) and FRONT-laser
(200 x 600) range images with per-pixel poses (real frames have three more short-range lasers)
and frame_stride 1, so every frame is a record; stored at the paper's 320 x 480
(configs/waymo.py) as JPEG.

Measured, each as frames per wall second and per CPU second (user + system time of the process
and its finished children, i.e. Beam's worker processes; the per-core rate):
  convert       waymo.Converter in this process, no Beam: decode the Frame proto and JPEG,
                range images -> points -> depth map, boxes, resize, encode (one core)
  build 1       data_prep.build on Beam's in-memory DirectRunner (one process), start to finish
  build N       the same on the multi-process DirectRunner with --workers processes
  build fast    build 1 in the fast storage (--rgb_format=raw --companion_format=uint16
                --record_compression=none: the same frames, uncompressed pixels and shards)
  loader T      pipeline.pretrain_loader (tfds data source -> rgb + companion only -> batch of
                --batch_size) over the default storage (JPEG + zlib float32, zstd shards) with
                grain T read threads (1 and --workers)
  loader fast T the same over the fast storage (a read is copies; uint16 companion codes)
The loaders read the built shards tiled (hard links) to --loader_records records: grain's
index shuffle costs ~0.4 ms per frame over 64 records and ~5 us over 32k, so a fixture-sized
dataset would measure the shuffle, not the reader. The GPU demand it is compared with
(RESULTS.md): one H100 at 40% MFU on the paper config takes about 3,500 frames/s; cores
needed = 3,500 / (loader frames/s per core).
"""

from __future__ import annotations

import glob
import json
import os
import resource
import shutil
import tempfile
import time

from absl import app
from absl import flags

_SEGMENTS = flags.DEFINE_integer('segments', 6, 'Fixture segments (Beam work units).')
_FRAMES = flags.DEFINE_integer('frames', 12, 'Frames per segment (all kept: stride 1).')
_WORKERS = flags.DEFINE_integer('workers', 2, 'Beam worker processes; loader threads.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Loader batch size.')
_BATCHES = flags.DEFINE_integer('batches', 20, 'Loader batches timed (after 2 warm-up).')
_SIZE = flags.DEFINE_list('image_size', ['320', '480'], 'Stored frame size (height, width).')
_WARMUP = flags.DEFINE_integer('warmup', 10, 'Loader batches before the clock starts.')
_LOADER_RECORDS = flags.DEFINE_integer('loader_records', 8192,
                                       'Records the loaders read (the build tiled).')
_DENSE = flags.DEFINE_bool('dense_lidar', True, "Waymo-sized TOP (64 x 2650) and FRONT "
                           "(200 x 600) range images, returns almost everywhere.")


def _config(height: int, width: int, options: dict):
  from data_prep import waymo  # pylint: disable=g-import-not-at-top
  return waymo.LemumoWaymo.BUILDER_CONFIGS[0].derive(
      f'bench_{height}x{width}', options, image_height=height, image_width=width)


def _cpu_seconds() -> float:
  """User + system CPU time of this process and its finished children (Beam's workers)."""
  own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                        resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rates(frames: int, wall_start: float, cpu_start: float) -> tuple[float, float]:
  """(frames per wall second, frames per CPU second)."""
  return (frames / (time.perf_counter() - wall_start),
          frames / max(_cpu_seconds() - cpu_start, 1e-9))


def _convert_rate(paths, config) -> tuple[float, float]:
  from data_prep import waymo  # pylint: disable=g-import-not-at-top
  converter = waymo.Converter('', config)
  next(iter(converter.convert(paths[0], lambda *_: None)))  # TensorFlow's first-use set-up
  start, cpu, frames = time.perf_counter(), _cpu_seconds(), 0
  for path in paths:
    frames += sum(1 for _ in converter.convert(path, lambda *_: None))
  return _rates(frames, start, cpu)


def _build_rate(raw: str, out: str, config, pipeline_options: str):
  from data_prep import builder, waymo  # pylint: disable=g-import-not-at-top
  start, cpu = time.perf_counter(), _cpu_seconds()
  built = builder.build(waymo.LemumoWaymo, manual_dir=raw, data_dir=out, config=config,
                        pipeline_options=pipeline_options)
  return (*_rates(built.info.splits['train'].num_examples, start, cpu),
          os.fspath(built.data_path))


def _tiled(data_dir: str, out: str, records: int) -> str:
  """The built train split repeated (hard links to its shards) to >= `records` records, as a
  dataset folder of its own: the reader's per-record work is the real one, the shuffle is
  over a realistic count."""
  with open(os.path.join(data_dir, 'dataset_info.json')) as f:
    info = json.load(f)
  (split,) = [s for s in info['splits'] if s['name'] == 'train']
  shards = sorted(glob.glob(os.path.join(data_dir, '*-train.array_record-*-of-*')))
  lengths = [int(n) for n in split['shardLengths']]
  copies = max(1, -(-records // sum(lengths)))
  total = copies * len(shards)
  os.makedirs(out)
  for name in ('features.json', 'metadata.json'):
    shutil.copy(os.path.join(data_dir, name), out)
  prefix = os.path.basename(shards[0]).split('.array_record-')[0]
  for index in range(total):
    os.link(shards[index % len(shards)],
            os.path.join(out, f'{prefix}.array_record-{index:05d}-of-{total:05d}'))
  split.update(shardLengths=[str(n) for n in lengths * copies],
               numBytes=str(int(split['numBytes']) * copies))
  info['splits'] = [split]
  with open(os.path.join(out, 'dataset_info.json'), 'w') as f:
    json.dump(info, f)
  return out


def _record_bytes(data_dir: str) -> float:
  """Mean bytes per record of the train shards on disk."""
  shards = glob.glob(os.path.join(data_dir, '*-train.array_record-*-of-*'))
  with open(os.path.join(data_dir, 'dataset_info.json')) as f:
    (split,) = [s for s in json.load(f)['splits'] if s['name'] == 'train']
  return sum(os.path.getsize(p) for p in shards) / sum(int(n) for n in split['shardLengths'])


def _loader_rate(data_dir: str, height: int, width: int, threads: int) -> tuple[float, float]:
  from configs import waymo as waymo_config  # pylint: disable=g-import-not-at-top
  from lemumo_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = waymo_config.get_config()
  config.data.update(data_dir=data_dir, image_size=(height, width), num_threads=threads)
  warmup = _WARMUP.value
  batches = iter(pipeline.pretrain_loader(config.data, _BATCH.value, seed=0, start_step=0,
                                          num_steps=_BATCHES.value + warmup, with_seg=False))
  for _ in range(warmup):  # readers open, buffers allocated
    next(batches)
  start, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(_BATCHES.value):
    next(batches)
  return _rates(_BATCH.value * _BATCHES.value, start, cpu)


def main(argv):
  del argv
  from tests import fixtures_real_formats as fx  # pylint: disable=g-import-not-at-top
  height, width = (int(v) for v in _SIZE.value)
  workers = _WORKERS.value
  results = {'cpu_count': os.cpu_count(), 'workers': workers, 'image_size': [height, width],
             'source_image': [1280, 1920], 'dense_lidar': _DENSE.value}
  with tempfile.TemporaryDirectory() as tmp:
    raw = os.path.join(tmp, 'raw')
    paths = [fx.write_waymo_segment(os.path.join(raw, 'training', f'segment-{i}.tfrecord'),
                                    _FRAMES.value, context_name=f'segment-{i}', image_scale=20,
                                    camera_projections=False, with_segmentation=False,
                                    dense_lidar=_DENSE.value)
             for i in range(_SEGMENTS.value)]
    config = _config(height, width, {'frame_stride': 1, 'splits': [['train', 'training/*']]})
    fast_config = config.derive(f'{config.name}_fast', rgb_format='raw',
                                companion_format='uint16', record_compression='none')
    results['frames'] = _SEGMENTS.value * _FRAMES.value
    rates = {'convert': _convert_rate(paths[:2], config)}
    wall, per_cpu, data_dir = _build_rate(raw, os.path.join(tmp, 'out1'), config, '')
    rates['build_1'] = (wall, per_cpu)
    wall, per_cpu, _ = _build_rate(
        raw, os.path.join(tmp, f'out{workers}'), config,
        f'direct_running_mode=multi_processing,direct_num_workers={workers}')
    rates[f'build_{workers}'] = (wall, per_cpu)
    wall, per_cpu, fast_dir = _build_rate(raw, os.path.join(tmp, 'out_fast'), fast_config, '')
    rates['build_fast'] = (wall, per_cpu)
    results['record_kb'] = {
        name: round(_record_bytes(path) / 1e3, 1)
        for name, path in (('default', data_dir), ('fast', fast_dir))}
    for name, built in (('loader', data_dir), ('loader_fast', fast_dir)):
      tiled = _tiled(built, os.path.join(tmp, f'tiled_{name}'), _LOADER_RECORDS.value)
      for threads in sorted({1, workers}):
        rates[f'{name}_{threads}'] = _loader_rate(tiled, height, width, threads)
  for name, (wall, per_cpu) in rates.items():
    results[f'{name}_frames_per_sec'] = wall
    results[f'{name}_frames_per_cpu_sec'] = per_cpu
  loader_per_cpu = max(per_cpu for name, (_, per_cpu) in rates.items()
                       if name.startswith('loader'))
  results['cores_for_3500_frames_per_sec'] = 3500 / loader_per_cpu
  print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()},
                   indent=1))


if __name__ == '__main__':
  app.run(main)
