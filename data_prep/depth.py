"""Putting a source camera image and its LiDAR returns onto the stored image grid.

Every record of a prepared dataset shares one stored size [H, W]. A `GridTransform` maps a
source image onto it: crop a box (centred, of the stored aspect ratio, unless a converter
chooses another box), then resize. Pixel convention is geometry.project_points': continuous
coordinates with the centre of pixel (row i, column j) at (j + 0.5, i + 0.5), which is exactly
the convention PIL's `resize(box=...)` samples with, so image, intrinsics, projected points
and 2D boxes stay aligned to a fraction of a pixel.

nuScenes' calibrations follow the OpenCV convention (pixel centres at integers);
`opencv_to_grid_intrinsics` converts them before scaling. Waymo's camera model already puts the
left image edge at 0, as ours does, and is used as it is.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from lemumo_jax.data import geometry
from lemumo_jax.data.schema import IGNORE_LABEL, R_MAX


def opencv_to_grid_intrinsics(intrinsics: np.ndarray) -> np.ndarray:
  """[3, 3] K with pixel centres at integers -> K with pixel centres at +0.5 (ours)."""
  k = np.asarray(intrinsics, np.float64).copy()
  k[0, 2] += 0.5
  k[1, 2] += 0.5
  return k


@dataclasses.dataclass(frozen=True)
class GridTransform:
  """Crop box (x, y, w, h in source pixels, may be fractional) resized to [height, width]."""
  src_height: int
  src_width: int
  height: int
  width: int
  crop_x: float
  crop_y: float
  crop_w: float
  crop_h: float

  @classmethod
  def center_crop(cls, src_height: int, src_width: int, height: int,
                  width: int) -> GridTransform:
    """The largest centred box of the stored aspect ratio, resized to [height, width]."""
    scale = min(src_width / width, src_height / height)
    crop_w, crop_h = width * scale, height * scale
    return cls(src_height, src_width, height, width, (src_width - crop_w) / 2,
               (src_height - crop_h) / 2, crop_w, crop_h)

  @property
  def sx(self) -> float:
    return self.width / self.crop_w

  @property
  def sy(self) -> float:
    return self.height / self.crop_h

  @property
  def is_identity(self) -> bool:
    return (self.src_height, self.src_width) == (self.height, self.width) and np.allclose(
        [self.crop_x, self.crop_y, self.crop_w, self.crop_h],
        [0, 0, self.src_width, self.src_height])

  def intrinsics(self, intrinsics: np.ndarray) -> np.ndarray:
    """[3, 3] K of the source image (our pixel convention) -> K of the stored image."""
    return geometry.scale_intrinsics(intrinsics, self.sx, self.sy, self.crop_x, self.crop_y)

  def points(self, uv: np.ndarray) -> np.ndarray:
    """[P, 2] continuous source pixel coordinates -> stored-grid coordinates."""
    uv = np.asarray(uv, np.float64)
    return np.stack([(uv[:, 0] - self.crop_x) * self.sx, (uv[:, 1] - self.crop_y) * self.sy], -1)

  def boxes(self, boxes: np.ndarray, min_size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """[M, 4] source (x1, y1, x2, y2) -> (stored boxes clipped to the grid [M, 4], keep [M]).

    keep marks boxes whose clipped width and height are at least `min_size` pixels.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    corners = self.points(boxes.reshape(-1, 2)).reshape(-1, 4)
    out = np.stack([np.clip(corners[:, 0], 0, self.width), np.clip(corners[:, 1], 0, self.height),
                    np.clip(corners[:, 2], 0, self.width), np.clip(corners[:, 3], 0, self.height)],
                   -1)
    keep = (out[:, 2] - out[:, 0] >= min_size) & (out[:, 3] - out[:, 1] >= min_size)
    return out.astype(np.float32), keep

  def _check(self, image: np.ndarray, what: str) -> None:
    if image.shape[:2] != (self.src_height, self.src_width):
      raise ValueError(f'{what} has shape {image.shape}, expected '
                       f'{(self.src_height, self.src_width)} from its calibration')

  def _box(self) -> tuple[float, float, float, float]:
    return (self.crop_x, self.crop_y, self.crop_x + self.crop_w, self.crop_y + self.crop_h)

  def rgb(self, image: np.ndarray) -> np.ndarray:
    """[h, w, 3] uint8 -> [H, W, 3] uint8 (antialiased bicubic)."""
    self._check(image, 'rgb image')
    if self.is_identity:
      return np.ascontiguousarray(image, np.uint8)
    out = Image.fromarray(np.asarray(image, np.uint8)).resize(
        (self.width, self.height), Image.Resampling.BICUBIC, box=self._box())
    return np.asarray(out, np.uint8)

  def scalar(self, image: np.ndarray) -> np.ndarray:
    """[h, w] float image -> [H, W] float32 (antialiased bilinear)."""
    self._check(image, 'scalar image')
    out = Image.fromarray(np.asarray(image, np.float32)).resize(  # mode 'F'
        (self.width, self.height), Image.Resampling.BILINEAR, box=self._box())
    return np.asarray(out, np.float32)

  def labels(self, labels: np.ndarray) -> np.ndarray:
    """[h, w] uint8 class map -> [H, W] uint8 (nearest: labels are never blended)."""
    self._check(labels, 'label map')
    out = Image.fromarray(np.asarray(labels, np.uint8)).resize(
        (self.width, self.height), Image.Resampling.NEAREST, box=self._box())
    return np.asarray(out, np.uint8)


def splat_nearest(uv: np.ndarray, depth: np.ndarray, values: np.ndarray, height: int, width: int,
                  fill: float) -> np.ndarray:
  """Writes per-point values into an [H, W] map; where points share a pixel the nearest wins.

  uv [P, 2] stored-grid coordinates, depth [P] metres (> 0), values [P]. Same ordering rule as
  geometry.render_depth (stable sort, farthest first, later writes win), so a label map and
  the depth map rendered from the same points agree on which point owns each pixel.
  """
  uv = np.asarray(uv, np.float64)
  depth = np.asarray(depth, np.float64)
  values = np.asarray(values)
  valid = (depth > 0) & np.all(np.isfinite(uv), axis=1)
  cols = np.floor(uv[valid, 0]).astype(np.int64)
  rows = np.floor(uv[valid, 1]).astype(np.int64)
  depth, values = depth[valid], values[valid]
  inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
  cols, rows, depth, values = cols[inside], rows[inside], depth[inside], values[inside]
  order = np.argsort(-depth, kind='stable')
  out = np.full((height, width), fill, dtype=values.dtype)
  out[rows[order], cols[order]] = values[order]
  return out


def render_depth_at_pixels(uv: np.ndarray, depth: np.ndarray, height: int,
                           width: int) -> tuple[np.ndarray, np.ndarray]:
  """geometry.render_depth for points whose pixels are already known (e.g. Waymo's own
  distortion-aware camera projections). Returns (companion [H, W], depth_m [H, W]) float32."""
  depth_m = splat_nearest(uv, depth, np.asarray(depth, np.float64), height, width, 0.0)
  companion = np.clip(depth_m / R_MAX, 0.0, 1.0)
  return companion.astype(np.float32), depth_m.astype(np.float32)


def render_labels(uv: np.ndarray, depth: np.ndarray, labels: np.ndarray, height: int,
                  width: int) -> np.ndarray:
  """Sparse [H, W] uint8 segmentation from labelled points; pixels without a point = ignore."""
  return splat_nearest(uv, depth, np.asarray(labels, np.uint8), height, width,
                       IGNORE_LABEL).astype(np.uint8)
