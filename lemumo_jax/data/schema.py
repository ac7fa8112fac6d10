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

Storage: data_prep/builder.py's TFDS features (RGB as the source JPEG or PNG, the dense maps
zlib-compressed), in array_record files read back by data/sources.py.
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
  for key, (dtype, pattern) in FIELDS.items():
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
