"""The one record layout every dataset is prepared into (DESIGN.md section 4).

A record is one camera frame:

  rgb           [H, W, 3] uint8    stored PNG (or the source JPEG bytes)
  companion     [H, W]    float32  LiDAR depth / R_MAX clipped to [0, 1] (0 = no return),
                                   or thermal normalised to [0, 1]
  depth_target  [H, W]    float32  metres, 0 = invalid
  seg           [H, W]    uint8    class index, IGNORE_LABEL = no label
  boxes3d       [K, 7]    float32  x, y, z, l, w, h, yaw in the camera frame
  boxes3d_cls   [K]       int32    index into CLASSES_3D
  boxes2d       [M, 4]    float32  x1, y1, x2, y2 in pixels
  boxes2d_cls   [M]       int32    index into the dataset's `classes_2d` (metadata.json)
  intrinsics    [3, 3]    float32  pinhole K of the stored image
  meta          dict               dataset, scene, frame, camera, timestamp (str/int/float)

Camera frame: x right, y down, z forward (metres). A 3D box is (x, y, z) = geometric centre,
(l, w, h) = extents along the object's own x, z and y axes, yaw = rotation about the camera
y axis (KITTI's rotation_y convention; yaw 0 means the length runs along camera x). See
`geometry.box3d_corners`.

Serialisation: one msgpack dict per record. Images are PNG/JPEG bytes; arrays are raw
little-endian bytes (zlib-compressed for the dense float maps) with their dtype and shape.
Shards are ArrayRecord files written atomically (temp file, then rename), with a
`metadata.json` beside them.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import msgpack
import numpy as np
from PIL import Image

CLASSES_3D = ('car', 'pedestrian', 'cyclist')
R_MAX = 80.0
IGNORE_LABEL = 255
SCHEMA_VERSION = 1

# name -> (dtype, shape pattern, stored encoding). 'H', 'W' are shared across the image
# fields of a record; 'K' and 'M' are per-record box counts.
FIELDS: dict[str, tuple[str, tuple[Any, ...], str]] = {
    'rgb': ('uint8', ('H', 'W', 3), 'png'),
    'companion': ('float32', ('H', 'W'), 'zlib'),
    'depth_target': ('float32', ('H', 'W'), 'zlib'),
    'seg': ('uint8', ('H', 'W'), 'png'),
    'boxes3d': ('float32', ('K', 7), 'raw'),
    'boxes3d_cls': ('int32', ('K',), 'raw'),
    'boxes2d': ('float32', ('M', 4), 'raw'),
    'boxes2d_cls': ('int32', ('M',), 'raw'),
    'intrinsics': ('float32', (3, 3), 'raw'),
}
META_KEYS = ('dataset', 'scene', 'frame', 'camera', 'timestamp')


class SchemaError(ValueError):
  """A record does not match the schema; the message names the key and shape."""


def empty_boxes() -> dict[str, np.ndarray]:
  """Box fields for a frame without labels."""
  return {
      'boxes3d': np.zeros((0, 7), np.float32),
      'boxes3d_cls': np.zeros((0,), np.int32),
      'boxes2d': np.zeros((0, 4), np.float32),
      'boxes2d_cls': np.zeros((0,), np.int32),
  }


def validate(record: Mapping[str, Any], where: str = 'record') -> None:
  """Raises SchemaError naming the first key whose presence, dtype or shape is wrong."""
  missing = [k for k in (*FIELDS, 'meta') if k not in record]
  if missing:
    raise SchemaError(f'{where}: missing keys {missing}')
  dims: dict[str, int] = {}
  for key, (dtype, pattern, _) in FIELDS.items():
    value = np.asarray(record[key])
    if value.dtype != np.dtype(dtype):
      raise SchemaError(f'{where}: {key!r} has dtype {value.dtype}, expected {dtype}')
    if value.ndim != len(pattern):
      raise SchemaError(f'{where}: {key!r} has shape {value.shape}, expected {pattern}')
    for size, want in zip(value.shape, pattern):
      if isinstance(want, int):
        ok = size == want
      else:
        ok = dims.setdefault(want, size) == size
      if not ok:
        raise SchemaError(
            f'{where}: {key!r} has shape {value.shape}, expected {pattern} with {dims}')
  meta = record['meta']
  if not isinstance(meta, Mapping) or any(k not in meta for k in META_KEYS):
    raise SchemaError(f'{where}: meta must be a dict with keys {META_KEYS}, got {meta!r}')
  for key in ('companion', 'depth_target'):
    if not np.all(np.isfinite(record[key])):
      raise SchemaError(f'{where}: {key!r} has non-finite values')
  for key in ('boxes3d_cls',):
    cls = np.asarray(record[key])
    if cls.size and (cls.min() < 0 or cls.max() >= len(CLASSES_3D)):
      raise SchemaError(f'{where}: {key!r} values must index CLASSES_3D {CLASSES_3D}')


def _encode_image(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


def encode(record: Mapping[str, Any], rgb_jpeg: bytes | None = None) -> bytes:
  """Validates and serialises one record. `rgb_jpeg`: keep the source JPEG bytes as-is."""
  validate(record)
  out: dict[str, Any] = {'schema_version': SCHEMA_VERSION, 'meta': dict(record['meta'])}
  for key, (dtype, _, encoding) in FIELDS.items():
    value = np.ascontiguousarray(record[key], dtype=np.dtype(dtype).newbyteorder('<'))
    if key == 'rgb' and rgb_jpeg is not None:
      out[key] = {'enc': 'jpeg', 'data': rgb_jpeg}
    elif encoding == 'png':
      out[key] = {'enc': 'png', 'data': _encode_image(value)}
    else:
      data = value.tobytes()
      if encoding == 'zlib':
        data = zlib.compress(data, 1)
      out[key] = {'enc': encoding, 'dtype': value.dtype.str, 'shape': list(value.shape),
                  'data': data}
  return msgpack.packb(out, use_bin_type=True)


def decode(blob: bytes, where: str = 'record') -> dict[str, Any]:
  """Inverse of `encode`. Raises SchemaError naming `where` on a corrupt record."""
  try:
    packed = msgpack.unpackb(blob, raw=False)
    record: dict[str, Any] = {'meta': packed['meta']}
    for key, (dtype, _, _) in FIELDS.items():
      item = packed[key]
      if item['enc'] in ('png', 'jpeg'):
        image = Image.open(io.BytesIO(item['data']))
        if key == 'rgb':
          image = image.convert('RGB')
        record[key] = np.asarray(image, dtype=np.dtype(dtype))
      else:
        data = item['data']
        if item['enc'] == 'zlib':
          data = zlib.decompress(data)
        array = np.frombuffer(data, dtype=np.dtype(item['dtype'])).reshape(item['shape'])
        record[key] = array.astype(np.dtype(dtype))
  except SchemaError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise SchemaError(f'{where}: cannot decode record ({type(e).__name__}: {e})') from e
  validate(record, where)
  return record


def shard_name(split: str, index: int, num_shards: int) -> str:
  return f'{split}-{index:05d}-of-{num_shards:05d}.array_record'


def write_shard(path: str, records: Iterable[bytes]) -> int:
  """Writes serialised records to an ArrayRecord file atomically; returns the count.

  The file appears under `path` only once complete, so a killed job never leaves a
  half-written shard that a rerun would mistake for a finished one.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.array_record')
  os.close(fd)
  count = 0
  try:
    writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
    for blob in records:
      writer.write(blob)
      count += 1
    writer.close()
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return count


def write_json_atomic(path: str, payload: Mapping[str, Any]) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.json')
  with os.fdopen(fd, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_metadata(data_dir: str) -> dict[str, Any]:
  path = os.path.join(data_dir, 'metadata.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: prepare the dataset with data_prep/ first')
  with open(path) as f:
    return json.load(f)
