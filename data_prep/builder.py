"""The TFDS builder every dataset is prepared with (Waymo, nuScenes, FLIR ADAS), on Beam.

A dataset module (data_prep/waymo.py, nuscenes.py, flir.py) subclasses `RecordBuilder` with its
name, classes and builder configs, and supplies two functions:

  split_units(manual_dir, config) -> {split: [WorkUnit]}   input files / scenes / image pairs
  make_converter(manual_dir, config) -> object with .convert(payload, report) yielding Frames

`_split_generators` turns each split's units into a Beam pipeline (`beam.Create(units) |
ParDo(convert)`), so the same builder runs with the local DirectRunner (in memory, or
`direct_running_mode=multi_processing,direct_num_workers=N`) and on a cluster runner (Dataflow,
Flink, Spark). TFDS writes `array_record` files under
`<data_dir>/<name>/<config>/<version>/` (in an `incomplete.*` folder renamed when done) and
the dataset info beside them; `metadata.json` holds what this project reads: classes,
companion, stored image size, the converter options, the inputs each split was built from, the
inputs skipped as corrupt, the inputs read through a fallback, the annotations not stored
(a missing or non-finite value: `bad_labels_<split>`, file and annotation id -> reason) and
the count of frames whose companion map is empty (no LiDAR).

Storage (Config): RGB as the source JPEG (default), PNG or raw uint8 pixels; the companion as
zlib float32 (default) or uncompressed uint16 codes (schema.companion_to_uint16); the shards
zstd-compressed per record (TFDS's writer) or rewritten uncompressed after the build. Raw +
uint16 + uncompressed is what the pretraining loader reads fastest (~2x the disk of the
default; benchmarks/data_throughput.py).

A unit that cannot be decoded raises CorruptInputError(path, reason): it is dropped whole,
logged and listed in metadata.json; a converter may also skip single frames through
`report(path, reason)`, and name an input it could only read in a lesser form (FLIR: an 8-bit
file where the 16-bit raw frame was asked for) through `report.fallback(path, reason)`, which
is logged and listed in metadata.json (`fallbacks_<split>`) when the unit's frames are kept.
Any other exception is a bug and stops the build. A build in which a split ends up with no
record fails. A rebuild into an existing dataset folder compares the inputs and settings it
was built from and refuses on a difference (naming it) unless `--overwrite`: the inputs by
the SHA-256 of every input file's contents (read once per build, before converting), the
settings by value. `incomplete.*` folders left by a killed build are removed first.

  python -m data_prep.build waymo --manual_dir=/data/waymo/v1 --data_dir=/data/tfds \
      [--config=front_320x480] [--image_height=.. --image_width=.. --options='{json}'] \
      [--beam_pipeline_options=direct_running_mode=multi_processing,direct_num_workers=16]
  PYTHONPATH=. tfds build lemumo_waymo --imports=data_prep.waymo --manual_dir=.. --data_dir=.. \
      --config=front_320x480 --file_format=array_record --beam_pipeline_options=...
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from lemumo_jax import locks
from lemumo_jax.data import schema

# A converted frame: the record dict (schema.FIELDS + meta) and, when the stored RGB is the
# unmodified source image, its original JPEG bytes (stored as-is instead of re-encoding).
Frame = tuple[dict[str, Any], bytes | None]


class Report:
  """What a converter says about a unit's inputs besides its frames: `report(path, reason)`
  skips one (corrupt or missing), `report.fallback(path, reason)` names one it read in a lesser
  form than asked for, `report.bad_label(where, reason)` names an annotation it did not store
  because a value is missing or not finite (`where`: the file and the annotation's id). All are
  logged by name here and listed in metadata.json."""

  def __init__(self):
    self.skipped: list[tuple[str, str]] = []
    self.fallbacks: list[tuple[str, str]] = []
    self.bad_labels: list[tuple[str, str]] = []

  def __call__(self, path: str, reason: str) -> None:
    logging.warning('skipping %s: %s', path, reason)
    self.skipped.append((path, reason))

  def fallback(self, path: str, reason: str) -> None:
    logging.warning('fallback for %s: %s', path, reason)
    self.fallbacks.append((path, reason))

  def bad_label(self, where: str, reason: str) -> None:
    logging.warning('not storing the annotation %s: %s', where, reason)
    self.bad_labels.append((where, reason))


def finite_values(annotation: Mapping[str, Any], fields: Sequence[str], lengths: Sequence[int],
                  where: str, report: Report) -> list[list[float]] | None:
  """The annotation's `fields` as float lists of the given lengths, or None (reported as a bad
  label naming `where` and the field) when one is missing, of another length, or not finite."""
  values = []
  for field, length in zip(fields, lengths):
    value = annotation.get(field) if isinstance(annotation, Mapping) else None
    try:
      numbers = [float(v) for v in value]
    except (TypeError, ValueError):
      report.bad_label(where, f'no {field}' if value is None else f'{field} {value!r} is not a '
                       'list of numbers')
      return None
    if len(numbers) != length or not all(np.isfinite(numbers)):
      report.bad_label(where, f'{field} {value!r} is not {length} finite numbers')
      return None
    values.append(numbers)
  return values


Skip = Report  # converters that only skip call it as skip(path, reason)

VERSION = tfds.core.Version('1.0.0')


class CorruptInputError(Exception):
  """An input file that cannot be decoded; the unit is skipped, its path and reason recorded."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = path
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class WorkUnit:
  name: str  # stable and unique: the example keys' prefix and the name used in reports
  payload: Any
  # Every file the unit's frames are read from (tables shared by all units included): their
  # contents' SHA-256 identify the unit, for the rebuild check and the dataset identity.
  inputs: tuple[str, ...] = ()


@dataclasses.dataclass(eq=False)
class Config(tfds.core.BuilderConfig):
  """What the paper varies per dataset: stored frame size, cameras and converter options."""
  image_height: int = 320
  image_width: int = 480
  # 'jpeg' (the source JPEG, or quality 95), 'png' (lossless) or 'raw' (the uint8 pixels
  # themselves: 3x the bytes of a JPEG on disk, no decoding when read; see RGB_FORMATS).
  rgb_format: str = 'jpeg'
  # 'float32' (zlib-compressed) or 'uint16' (round(value * 65535), uncompressed: half the
  # bytes to the device, no inflating when read; see COMPANION_FORMATS).
  companion_format: str = 'float32'
  # The array_record files: 'zstd' (TFDS's writer, zstd level 3 per record) or 'none' (the
  # same records rewritten uncompressed after the build: a read is a copy; with raw RGB and
  # uint16 companions zstd saves ~1/3 of the disk and costs ~0.5 ms of CPU per frame read).
  record_compression: str = 'zstd'
  skip_without_companion: bool = False  # drop frames whose companion map is empty
  options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the module's Options

  def derive(self, name: str, options: Mapping[str, Any] | None = None,
             **fields: Any) -> Config:
    """This config renamed, with `fields` replaced and `options` merged into its options."""
    return dataclasses.replace(self, name=name, options={**self.options, **(options or {})},
                               **fields)

  def settings(self) -> dict[str, Any]:
    """Everything that determines the records, as JSON (recorded in metadata.json)."""
    settings = {'image_size': [self.image_height, self.image_width],
                'rgb_format': self.rgb_format,
                'skip_without_companion': self.skip_without_companion, 'options': self.options}
    # Absent = the default, so that datasets built before these options still match.
    if self.companion_format != 'float32':
      settings['companion_format'] = self.companion_format
    if self.record_compression != 'zstd':
      settings['record_compression'] = self.record_compression
    return json.loads(json.dumps(settings))


RGB_FORMATS = ('jpeg', 'png', 'raw')
COMPANION_FORMATS = ('float32', 'uint16')
RECORD_COMPRESSIONS = ('zstd', 'none')
_UNCOMPRESSED = 'group_size:1,uncompressed'  # TFDS's group_size, no compressor
_REWRITE_SUFFIX = '.uncompressed-tmp'


def _check_formats(rgb_format: str, companion_format: str) -> None:
  if rgb_format not in RGB_FORMATS:
    raise ValueError(f'rgb_format must be one of {RGB_FORMATS}, got {rgb_format!r}')
  if companion_format not in COMPANION_FORMATS:
    raise ValueError(f'companion_format must be one of {COMPANION_FORMATS}, got '
                     f'{companion_format!r}')


def features(height: int, width: int, rgb_format: str,
             companion_format: str = 'float32') -> tfds.features.FeaturesDict:
  """The TFDS features of schema.py's record (+ has_companion); static image shapes. RGB
  'raw' and companion 'uint16' are stored as the array's bytes (Encoding.BYTES: a read is a
  copy, no JPEG decode or zlib inflate)."""
  _check_formats(rgb_format, companion_format)
  zlib_map = functools.partial(tfds.features.Tensor, shape=(height, width),
                               encoding=tfds.features.Encoding.ZLIB)
  if rgb_format == 'raw':
    rgb = tfds.features.Tensor(shape=(height, width, 3), dtype=np.uint8,
                               encoding=tfds.features.Encoding.BYTES)
  else:
    rgb = tfds.features.Image(shape=(height, width, 3), encoding_format=rgb_format)
  if companion_format == 'uint16':
    companion = tfds.features.Tensor(shape=(height, width), dtype=np.uint16,
                                     encoding=tfds.features.Encoding.BYTES)
  else:
    companion = zlib_map(dtype=np.float32)
  return tfds.features.FeaturesDict({
      'rgb': rgb,
      'companion': companion,
      'depth_target': zlib_map(dtype=np.float32),
      'seg': zlib_map(dtype=np.uint8),
      'boxes3d': tfds.features.Tensor(shape=(None, 7), dtype=np.float32),
      'boxes3d_cls': tfds.features.Tensor(shape=(None,), dtype=np.int32),
      'boxes2d': tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
      'boxes2d_cls': tfds.features.Tensor(shape=(None,), dtype=np.int32),
      'intrinsics': tfds.features.Tensor(shape=(3, 3), dtype=np.float32),
      'has_companion': tfds.features.Tensor(shape=(), dtype=np.bool_),
      'meta': tfds.features.FeaturesDict({
          'dataset': tfds.features.Text(), 'scene': tfds.features.Text(),
          'camera': tfds.features.Text(),
          'frame': tfds.features.Tensor(shape=(), dtype=np.int64),
          'timestamp': tfds.features.Tensor(shape=(), dtype=np.int64)}),
  })


def decode_image(data: bytes, path: str, mode: str | None = None) -> np.ndarray:
  """The pixels of an image file's bytes: [h, w, 3] for mode 'RGB', else as stored ([h, w] for
  greyscale). A JPEG is decoded by libjpeg-turbo in strict mode (simplejpeg): data the decoder
  reports corrupt (a damaged entropy segment, extraneous bytes, a premature end), which PIL
  decodes to wrong pixels without a word, is a CorruptInputError naming `path` and the
  decoder's message. The pixels equal PIL's (the same libjpeg-turbo decoding; tested). Other
  formats (PNG, TIFF) through PIL. Flipped bits the decoder cannot see (they decode as other
  valid codes) need a checksum, which only Waymo's TFRecords carry."""
  import simplejpeg  # pylint: disable=g-import-not-at-top
  try:
    if data[:2] == b'\xff\xd8':  # SOI: a JPEG
      _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
      if mode == 'RGB' or colorspace in ('YCbCr', 'RGB'):
        return simplejpeg.decode_jpeg(data, colorspace='RGB', strict=True)
      if colorspace == 'Gray' and mode is None:
        return simplejpeg.decode_jpeg(data, colorspace='GRAY', strict=True)[..., 0]
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert(mode) if mode else image)
  except Exception as e:  # PIL raises several unrelated types for broken images
    raise CorruptInputError(path, f'{type(e).__name__}: {e}') from e


def read_image(path: str, mode: str | None = None) -> np.ndarray:
  """decode_image of a file; an unreadable file is a CorruptInputError naming it."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise CorruptInputError(path, f'{type(e).__name__}: {e}') from e
  return decode_image(data, path, mode)


def encode_image(rgb: np.ndarray, rgb_format: str) -> bytes:
  buffer = io.BytesIO()
  if rgb_format == 'jpeg':
    Image.fromarray(rgb).save(buffer, format='JPEG', quality=95)
  else:
    Image.fromarray(rgb).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


def to_example(record: Mapping[str, Any], source_jpeg: bytes | None, rgb_format: str,
               companion_format: str = 'float32') -> dict[str, Any]:
  """A validated schema record -> the features dict TFDS encodes (features())."""
  schema.validate(record)
  _check_formats(rgb_format, companion_format)
  if rgb_format == 'raw':
    rgb = np.ascontiguousarray(record['rgb'], np.uint8)
  elif source_jpeg is None or rgb_format != 'jpeg':
    rgb = encode_image(np.asarray(record['rgb']), rgb_format)
  else:
    rgb = source_jpeg
  example = {key: np.asarray(record[key], np.dtype(dtype))
             for key, (dtype, _) in schema.FIELDS.items() if key != 'rgb'}
  has_companion = bool(np.any(example['companion'] > 0))
  if companion_format == 'uint16':
    example['companion'] = schema.companion_to_uint16(example['companion'])
  meta = record['meta']
  example.update(
      rgb=rgb, has_companion=has_companion,
      meta={'dataset': str(meta['dataset']), 'scene': str(meta['scene']),
            'camera': str(meta['camera']), 'frame': int(meta['frame']),
            'timestamp': int(meta['timestamp'])})
  return example


class _Convert(beam.DoFn):
  """One work unit -> its examples; skipped inputs and empty-companion keys as side outputs."""

  def __init__(self, make_converter: Callable[[], Any], config: Config,
               classes_2d: Sequence[str]):
    self._make_converter = make_converter
    self._classes_3d, self._classes_2d = tuple(schema.CLASSES_3D), tuple(classes_2d)
    self._rgb_format, self._companion_format = config.rgb_format, config.companion_format
    self._skip_empty = config.skip_without_companion
    self._converter = None

  def setup(self):
    self._converter = self._make_converter()

  def process(self, unit: WorkUnit):
    report = Report()
    try:  # a unit is converted whole first, so a file found corrupt halfway adds nothing
      frames = [to_example(record, jpeg, self._rgb_format, self._companion_format)
                for record, jpeg in self._converter.convert(unit.payload, report)]
    except CorruptInputError as e:
      report(e.path, e.reason)
      frames, report.fallbacks, report.bad_labels = [], [], []  # nothing of the unit is written
    for kind in ('skipped', 'fallbacks', 'bad_labels'):
      for item in getattr(report, kind):
        yield beam.pvalue.TaggedOutput(kind, item)
    for example in frames:
      meta = example['meta']
      key = f'{unit.name}/{meta["frame"]:06d}/{meta["camera"]}'
      if not example['has_companion']:
        yield beam.pvalue.TaggedOutput('without_companion', key)
        if self._skip_empty:
          continue
      for kind, names in (('3d', self._classes_3d), ('2d', self._classes_2d)):
        for cls in example[f'boxes{kind}_cls'].tolist():
          yield beam.pvalue.TaggedOutput('boxes', (kind, names[cls]))
      yield key, example


def _nested_counts(pairs) -> dict[str, dict[str, int]]:
  counts: dict[str, dict[str, int]] = {'3d': {}, '2d': {}}
  for (kind, name), count in sorted(pairs):
    counts[kind][name] = count
  return counts


# What units_sha256 digests: the units' names and their input files' contents. Datasets built
# before it was recorded digested names and file sizes only.
INPUTS_DIGEST = 'sha256 of unit names and input file contents'


def file_digests(paths: Sequence[str], threads: int = 8) -> dict[str, str]:
  """{path: SHA-256 hex of its contents, or 'missing'}, read once each on `threads` threads
  (hashlib releases the GIL), with a progress line every ~10 s. This is a full read of the
  inputs, once per build: about what converting them reads again (Waymo v1's ~1 TB at the
  filesystem's read rate on the machine running the build)."""
  paths = sorted(set(paths))
  sizes = {p: os.path.getsize(p) for p in paths if os.path.isfile(p)}
  total = sum(sizes.values())

  def digest(path: str) -> str:
    try:
      with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()
    except FileNotFoundError:
      return 'missing'

  digests, done, start, shown = {}, 0, time.time(), time.time()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for path, value in zip(paths, pool.map(digest, paths)):
      digests[path] = value
      done += sizes.get(path, 0)
      if time.time() - shown > 10:
        shown = time.time()
        rate = done / max(shown - start, 1e-9)
        logging.info('hashing inputs: %d/%d files, %.1f/%.1f GB, %.0f MB/s, ETA %.0f s',
                     len(digests), len(paths), done / 1e9, total / 1e9, rate / 1e6,
                     (total - done) / max(rate, 1.0))
  return digests


def _units_digest(units: Sequence[WorkUnit], digests: Mapping[str, str]) -> str:
  lines = sorted(f'{u.name} ' + ' '.join(digests[p] for p in u.inputs) for u in units)
  return hashlib.sha256('\n'.join(lines).encode()).hexdigest()[:16]


class RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the dataset builders; subclasses set the class attributes and functions below."""

  VERSION = VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = ('Nothing is downloaded: point --manual_dir at the raw '
                                  'dataset as released (see the dataset module docstring).')
  RELEASE_NOTES = {'1.0.0': 'Schema version 1 of lemumo_jax/data/schema.py.'}
  DATASET = ''
  COMPANION = 'depth'
  CLASSES_2D: tuple[str, ...] = schema.CLASSES_3D
  SEG_CLASSES: tuple[str, ...] = ()
  split_units: Callable[[str, Config], dict[str, list[WorkUnit]]]
  make_converter: Callable[[str, Config], Any]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    metadata = tfds.core.BeamMetadataDict(
        dataset=self.DATASET, companion=self.COMPANION, classes_3d=list(schema.CLASSES_3D),
        classes_2d=list(cfg.options.get('classes') or self.CLASSES_2D),
        seg_classes=list(self.SEG_CLASSES),
        image_size=[cfg.image_height, cfg.image_width], schema_version=schema.SCHEMA_VERSION,
        r_max=schema.R_MAX, ignore_label=schema.IGNORE_LABEL, settings=cfg.settings())
    return self.dataset_info_from_configs(
        description=f'{self.DATASET} frames in the lemumo_jax record schema '
                    '(lemumo_jax/data/schema.py).',
        features=features(cfg.image_height, cfg.image_width, cfg.rgb_format,
                          cfg.companion_format),
        metadata=metadata)

  def _split_generators(self, dl_manager, pipeline):
    manual_dir = os.fspath(dl_manager.manual_dir)
    cfg = self.builder_config
    units = self._split_units(manual_dir)
    metadata = self.info.metadata
    metadata['inputs'] = self._inputs_record(manual_dir, units)
    metadata['command_line'] = list(sys.argv)
    make = functools.partial(type(self).make_converter, manual_dir, cfg)
    return {split: self._generate_examples(pipeline, split, split_units, make)
            for split, split_units in units.items()}

  def _generate_examples(self, pipeline, split: str, units: Sequence[WorkUnit],
                         make_converter: Callable[[], Any]):
    """The split's examples as a PCollection; its skipped inputs, the inputs read through a
    fallback, the annotations not stored (bad_labels) and the count of frames with an empty
    companion map go to metadata.json (BeamMetadataDict), with the box counts."""
    results = (pipeline
               | f'{split}_units' >> beam.Create(sorted(units, key=lambda u: u.name))
               | f'{split}_reshuffle' >> beam.Reshuffle()
               | f'{split}_convert' >> beam.ParDo(
                   _Convert(make_converter, self.builder_config,
                            self.info.metadata['classes_2d'])).with_outputs(
                       'skipped', 'fallbacks', 'bad_labels', 'without_companion', 'boxes',
                       main='examples'))
    for kind in ('skipped', 'fallbacks', 'bad_labels'):  # {path: reason}
      self.info.metadata[f'{kind}_{split}'] = (
          results[kind] | f'{split}_{kind}_list' >> beam.combiners.ToList()
          | f'{split}_{kind}_dict' >> beam.Map(lambda pairs: dict(sorted(pairs))))
    self.info.metadata[f'without_companion_{split}'] = (
        results.without_companion
        | f'{split}_without_companion_count' >> beam.combiners.Count.Globally())
    self.info.metadata[f'box_counts_{split}'] = (
        results.boxes | f'{split}_box_counts' >> beam.combiners.Count.PerElement()
        | f'{split}_box_counts_list' >> beam.combiners.ToList()
        | f'{split}_box_counts_dict' >> beam.Map(_nested_counts))
    return results.examples

  def _split_units(self, manual_dir: str) -> dict[str, list[WorkUnit]]:
    if not os.path.isdir(manual_dir):
      raise FileNotFoundError(f'manual_dir {manual_dir} is not a folder: point --manual_dir at '
                              f'the raw {self.DATASET} data ({type(self).__doc__.strip()})')
    units = type(self).split_units(manual_dir, self.builder_config)
    for split, split_units in units.items():
      names = [u.name for u in split_units]
      if len(set(names)) != len(names):
        raise ValueError(f'{self.DATASET} {split}: work unit names are not unique')
    return units

  def _inputs_record(self, manual_dir: str, units: Mapping[str, Sequence[WorkUnit]]):
    digests = file_digests([p for split_units in units.values() for u in split_units
                            for p in u.inputs])
    return {'manual_dir': os.path.abspath(manual_dir),
            'units': {split: len(u) for split, u in units.items()},
            'units_sha256': {split: _units_digest(u, digests) for split, u in units.items()},
            'digest': INPUTS_DIGEST}

  def download_and_prepare(self, *, download_dir=None, download_config=None, file_format=None):
    """TFDS's build, after refusing a rebuild that differs from the existing dataset and
    clearing a killed build's `incomplete.*` folders; a split that comes out empty fails the
    build (TFDS's own check, then nothing is renamed into place), named here."""
    download_config = download_config or tfds.download.DownloadConfig()
    overwrite = download_config.download_mode.overwrite_dataset
    if download_config.manual_dir is None:
      raise ValueError(f'{self.name}: pass --manual_dir, the folder of the raw dataset '
                       f'({type(self).__doc__.strip()}); nothing is downloaded')
    # One build per dataset config folder at a time (lemumo_jax/locks.py): a second is
    # refused naming the first, and the incomplete.* folders removed below are never a live
    # build's.
    with self.build_lock():
      self._locked_download_and_prepare(download_dir, download_config, file_format, overwrite)

  def build_lock(self):
    """The exclusive lock of this dataset config's folder (lemumo_jax/locks.py)."""
    return locks.folder_lock(os.path.dirname(os.fspath(self.data_path)), 'build',
                             f'a build of {self.name}/{self.builder_config.name}')

  def _locked_download_and_prepare(self, download_dir, download_config, file_format,
                                   overwrite: bool) -> None:
    if self.data_path.exists() and not overwrite:
      self._check_same_build(os.fspath(download_config.manual_dir))
    _remove_incomplete(self.data_path)
    if self.builder_config.record_compression not in RECORD_COMPRESSIONS:
      raise ValueError(f'record_compression must be one of {RECORD_COMPRESSIONS}, got '
                       f'{self.builder_config.record_compression!r}')
    try:
      super().download_and_prepare(download_dir=download_dir, download_config=download_config,
                                   file_format=file_format or 'array_record')
    except ValueError as e:  # TFDS refuses to write a split without examples
      match = re.search(r'examples is 0 for split (\S+?)\.', str(e))
      if match is None:
        raise
      raise RuntimeError(
          f'{self.data_path}: split(s) [{match[1]!r}] hold no record: every input of it was '
          'skipped (each is logged above as "skipping <path>: <reason>") or converted to '
          'nothing; nothing was written') from e
    if self.builder_config.record_compression == 'none':
      # Also on a reused dataset: a rewrite killed halfway is finished here.
      for split in self.info.splits.values():
        for path in split.filepaths:
          rewrite_uncompressed(os.fspath(path))

  def _check_same_build(self, manual_dir: str) -> None:
    path = os.path.join(os.fspath(self.data_path), 'metadata.json')
    try:
      with open(path) as f:
        built = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f'{path} is missing or unreadable ({e}): the dataset folder '
                       f'{self.data_path} is damaged; rebuild it with --overwrite') from e
    wanted = {'inputs': self._inputs_record(manual_dir, self._split_units(manual_dir)),
              'settings': self.builder_config.settings()}
    differ = [f'{group}.{key}: {built.get(group, {}).get(key)!r} -> {value!r}'
              for group, values in wanted.items() for key, value in values.items()
              if built.get(group, {}).get(key) != value]
    if differ:
      older = ('; it was built before the inputs were identified by their contents (names '
               'and sizes only), so the digests cannot be compared'
               if 'digest' not in built.get('inputs', {}) else '')
      raise ValueError(f'{self.data_path} was built from other inputs or settings ('
                       + '; '.join(differ) + f'){older}; rebuild with --overwrite (tfds build '
                       '--overwrite), or pass another --data_dir or --config')


def rewrite_uncompressed(path: str) -> bool:
  """Rewrites one array_record shard with the same records, uncompressed, atomically (a
  temporary file beside it, its record count checked, then renamed over it); False when it
  already is. A killed rewrite leaves the original shard and a temporary file the next call
  replaces."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(path)
  try:
    if 'uncompressed' in reader.writer_options_string().split(','):
      return False
    count = reader.num_records()
    temporary = path + _REWRITE_SUFFIX
    writer = array_record_module.ArrayRecordWriter(temporary, _UNCOMPRESSED)
    for start in range(0, count, 64):
      for record in reader.read(list(range(start, min(start + 64, count)))):
        writer.write(record)
    writer.close()
  finally:
    reader.close()
  check = array_record_module.ArrayRecordReader(temporary)
  written = check.num_records()
  check.close()
  if written != count:
    os.remove(temporary)
    raise RuntimeError(f'{path}: the uncompressed rewrite holds {written} of {count} records; '
                       'the original shard is unchanged')
  os.replace(temporary, path)
  logging.info('rewrote %s uncompressed (%d records)', path, count)
  return True


def _remove_incomplete(data_path) -> None:
  """Removes `incomplete.*` folders of this config left by a killed build."""
  parent = os.path.dirname(os.fspath(data_path))
  if not os.path.isdir(parent):
    return
  for name in os.listdir(parent):
    if name.startswith('incomplete.'):
      logging.warning('removing %s, left by a build that did not finish',
                      os.path.join(parent, name))
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def beam_options(spec: str):
  """'direct_running_mode=multi_processing,direct_num_workers=4' -> Beam PipelineOptions."""
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  flags = [f'--{item.strip()}' for item in spec.split(',') if item.strip()]
  return pipeline_options.PipelineOptions(flags)


def build(builder_cls: type[RecordBuilder], *, manual_dir: str, data_dir: str,
          config: Config | str | None = None, pipeline_options: str = '',
          overwrite: bool = False) -> RecordBuilder:
  """Builds one dataset config (the CLI's and the tests' entry); returns the builder."""
  builder = builder_cls(config=config, data_dir=data_dir)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  with builder.build_lock():  # --overwrite deletes nothing another build is writing
    if overwrite and builder.data_path.exists():
      shutil.rmtree(os.fspath(builder.data_path))
      builder = builder_cls(config=config, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, download_mode=mode,
        beam_options=beam_options(pipeline_options)))
  return builder


def summary(builder: RecordBuilder) -> str:
  metadata = builder.info.metadata
  lines = [f'{builder.info.full_name} -> {builder.data_path}']
  for split, info in sorted(builder.info.splits.items()):
    skipped = metadata.get(f'skipped_{split}') or {}
    fallbacks = metadata.get(f'fallbacks_{split}') or {}
    bad_labels = metadata.get(f'bad_labels_{split}') or {}
    lines.append(f'  {split}: {info.num_examples} records in {info.num_shards} shards from '
                 f'{metadata["inputs"]["units"].get(split)} units, {len(skipped)} inputs '
                 f'skipped, {metadata.get(f"without_companion_{split}")} frames with an empty '
                 f'companion map, {len(fallbacks)} inputs read through a fallback, '
                 f'{len(bad_labels)} annotations not stored (missing or non-finite values)')
  return '\n'.join(lines)

