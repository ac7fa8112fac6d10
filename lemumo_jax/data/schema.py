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

Storage: data_prep/builder.py's TFDS features (RGB as the source JPEG, PNG or raw pixels; the
dense maps zlib-compressed, or the companion as uncompressed uint16 = round(value * 65535)),
in array_record files read back by data/sources.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

CLASSES_3D = ('car', 'pedestrian', 'cyclist')
R_MAX = 80.0
IGNORE_LABEL = 255
SCHEMA_VERSION = 1

# name -> (dtype, shape pattern). 'H', 'W' are shared across the image
# fields of a record; 'K' and 'M' are per-record box counts.
FIELDS: dict[str, tuple[str, tuple[Any, ...]]] = {
    'rgb': ('uint8', ('H', 'W', 3)),
    'companion': ('float32', ('H', 'W')),
    'depth_target': ('float32', ('H', 'W')),
    'seg': ('uint8', ('H', 'W')),
    'boxes3d': ('float32', ('K', 7)),
    'boxes3d_cls': ('int32', ('K',)),
    'boxes2d': ('float32', ('M', 4)),
    'boxes2d_cls': ('int32', ('M',)),
    'intrinsics': ('float32', (3, 3)),
}
META_KEYS = ('dataset', 'scene', 'frame', 'camera', 'timestamp')


# The companion stored (and shipped to the device) as uint16: value = code / COMPANION_CODES,
# a step of 1.2 mm of LiDAR depth at R_MAX, finer than a 16-bit thermal frame's counts.
COMPANION_CODES = 65535


def companion_to_uint16(companion: np.ndarray) -> np.ndarray:
  """[0, 1] float companion -> uint16 codes (nearest)."""
  companion = np.asarray(companion, np.float32)
  if companion.size and (companion.min() < 0 or companion.max() > 1):
    raise SchemaError(f'companion values must lie in [0, 1] to be stored as uint16, got '
                      f'[{companion.min()}, {companion.max()}]')
  return np.round(companion.astype(np.float64) * COMPANION_CODES).astype(np.uint16)


def companion_from_uint16(codes):
  """uint16 codes -> float32 companion: codes / COMPANION_CODES in float32 (numpy or jax
  arrays alike; one IEEE division, so host and device agree bit for bit)."""
  return codes.astype(np.float32) / np.float32(COMPANION_CODES)


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


def validate(record: Mapping[str, Any], where: str = 'record',
             keys: tuple[str, ...] | None = None) -> None:
  """Raises SchemaError naming the first key whose presence, dtype or shape is wrong. `keys`:
  the FIELDS a partial record holds (a stage's read, sources.TfdsSource(keys=...)); default
  all of them and meta. A companion may be uint16 codes (companion_from_uint16)."""
  fields = tuple(FIELDS) if keys is None else tuple(keys)
  unknown = [k for k in fields if k not in FIELDS]
  if unknown:
    raise SchemaError(f'{where}: unknown keys {unknown}; the schema has {list(FIELDS)}')
  missing = [k for k in (*fields, *(('meta',) if keys is None else ())) if k not in record]
  if missing:
    raise SchemaError(f'{where}: missing keys {missing}')
  dims: dict[str, int] = {}
  for key in fields:
    dtype, pattern = FIELDS[key]
    value = np.asarray(record[key])
    if key == 'companion' and value.dtype == np.uint16:
      dtype = 'uint16'
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
  if 'meta' in record or keys is None:
    meta = record['meta']
    if not isinstance(meta, Mapping) or any(k not in meta for k in META_KEYS):
      raise SchemaError(f'{where}: meta must be a dict with keys {META_KEYS}, got {meta!r}')
  for key in ('companion', 'depth_target'):
    value = np.asarray(record[key]) if key in fields else None
    if value is not None and value.dtype.kind == 'f' and not np.all(np.isfinite(value)):
      raise SchemaError(f'{where}: {key!r} has non-finite values')
  for key in ('boxes3d_cls',) if 'boxes3d_cls' in fields else ():
    cls = np.asarray(record[key])
    if cls.size and (cls.min() < 0 or cls.max() >= len(CLASSES_3D)):
      raise SchemaError(f'{where}: {key!r} values must index CLASSES_3D {CLASSES_3D}')
