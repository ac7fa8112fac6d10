"""The command that builds a dataset: `python -m data_prep.build waymo|nuscenes|flir ...`.

A builder config of the dataset (--config, default its first), optionally changed by flags
(stored size, RGB format, converter options as JSON; the config is then named by the digest of
its settings), built by data_prep/builder.py with the Beam runner of --beam_pipeline_options.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from collections.abc import Sequence

from absl import logging

from data_prep import builder

DATASETS = {'waymo': 'data_prep.waymo:LemumoWaymo', 'nuscenes': 'data_prep.nuscenes:LemumoNuscenes',
            'flir': 'data_prep.flir:LemumoFlir'}


def builder_class(dataset: str) -> type[builder.RecordBuilder]:
  if dataset not in DATASETS:
    raise ValueError(f'dataset must be one of {sorted(DATASETS)}, got {dataset!r}')
  module, name = DATASETS[dataset].split(':')
  return getattr(importlib.import_module(module), name)


def config_from_flags(builder_cls: type[builder.RecordBuilder], name: str | None,
                      height: int | None, width: int | None, rgb_format: str | None,
                      skip_without_companion: bool | None, options: str,
                      companion_format: str | None = None,
                      record_compression: str | None = None) -> builder.Config:
  """A named config of the builder, with the flags' overrides (then named by their digest)."""
  configs = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
  name = name or builder_cls.BUILDER_CONFIGS[0].name
  if name not in configs:
    raise ValueError(f'--config={name!r}: {builder_cls.name} has configs {sorted(configs)}')
  base = configs[name]
  overrides = {k: v for k, v in dict(image_height=height, image_width=width,
                                     rgb_format=rgb_format, companion_format=companion_format,
                                     record_compression=record_compression,
                                     skip_without_companion=skip_without_companion).items()
               if v is not None}
  try:
    extra = json.loads(options) if options else {}
  except ValueError as e:
    raise ValueError(f'--options={options!r} is not a JSON object ({e})') from e
  if not isinstance(extra, dict):
    raise ValueError(f'--options={options!r} is not a JSON object')
  if not overrides and not extra:
    return base
  config = base.derive(base.name, extra, **overrides)
  digest = hashlib.sha256(json.dumps(config.settings(), sort_keys=True).encode()).hexdigest()
  return config.derive(f'{base.name}_custom_{digest[:8]}',
                       description=f'{base.name} with {overrides} {extra}')


def main(argv: Sequence[str]) -> builder.RecordBuilder:
  """python -m data_prep.build DATASET --manual_dir=.. --data_dir=.. [options]."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m data_prep.build', description=builder.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('dataset', choices=sorted(DATASETS))
  parser.add_argument('--manual_dir', required=True, help='The raw dataset (never downloaded).')
  parser.add_argument('--data_dir', required=True, help='TFDS data_dir of the output.')
  parser.add_argument('--config', default=None, help='A named builder config (default: first).')
  parser.add_argument('--image_height', type=int, default=None)
  parser.add_argument('--image_width', type=int, default=None)
  parser.add_argument('--rgb_format', choices=builder.RGB_FORMATS, default=None,
                      help='jpeg (default), png, or raw: uint8 pixels, read without decoding '
                           '(the fast loader; ~3x the disk of JPEG).')
  parser.add_argument('--companion_format', choices=builder.COMPANION_FORMATS, default=None,
                      help='float32 (default, zlib) or uint16: round(value * 65535), read '
                           'without inflating and shipped to the device as uint16.')
  parser.add_argument('--record_compression', choices=builder.RECORD_COMPRESSIONS,
                      default=None, help='zstd (default, TFDS\'s writer) or none: the shards '
                      'rewritten uncompressed after the build (reads are copies).')
  parser.add_argument('--skip_without_companion', action=argparse.BooleanOptionalAction,
                      default=None, help='Drop frames whose companion map is empty (no LiDAR).')
  parser.add_argument('--options', default='',
                      help='JSON merged into the config\'s converter options, e.g. '
                           '\'{"cameras": ["FRONT", "SIDE_LEFT"], "frame_stride": 5}\'.')
  parser.add_argument('--beam_pipeline_options', default='',
                      help='e.g. direct_running_mode=multi_processing,direct_num_workers=8; '
                           'or runner=DataflowRunner,project=..,region=..,temp_location=..')
  parser.add_argument('--overwrite', action='store_true',
                      help='Delete and rebuild an existing dataset of this config.')
  args = parser.parse_args(list(argv)[1:])
  builder_cls = builder_class(args.dataset)
  config = config_from_flags(builder_cls, args.config, args.image_height, args.image_width,
                             args.rgb_format, args.skip_without_companion, args.options,
                             args.companion_format, args.record_compression)
  built = builder.build(builder_cls, manual_dir=args.manual_dir, data_dir=args.data_dir,
                        config=config, pipeline_options=args.beam_pipeline_options,
                        overwrite=args.overwrite)
  print(builder.summary(built))
  return built


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  from lemumo_jax import locks  # pylint: disable=g-import-not-at-top
  try:
    main(sys.argv)
  except locks.FolderBusyError as e:
    raise SystemExit(f'error: {e}') from None
