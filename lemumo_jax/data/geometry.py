"""Camera geometry shared by the synthetic source and every dataset converter (float64 numpy).

Conventions (see schema.py): camera frame x right, y down, z forward; pinhole intrinsics K;
3D boxes (x, y, z, l, w, h, yaw) with yaw about the camera y axis (KITTI rotation_y).
"""

from __future__ import annotations

import numpy as np

from lemumo_jax.data.schema import R_MAX


def project_points(points_cam: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Pinhole projection. points_cam [P, 3] -> (uv [P, 2] pixel coords, depth z [P]).

  Pixel (u, v) = (column, row) with the centre of the top-left pixel at (0.5, 0.5); points
  with z <= 0 get uv = nan.
  """
  points = np.asarray(points_cam, np.float64)
  z = points[:, 2]
  with np.errstate(divide='ignore', invalid='ignore'):
    homogeneous = points @ np.asarray(intrinsics, np.float64).T
    uv = homogeneous[:, :2] / homogeneous[:, 2:3]
  uv[z <= 0] = np.nan
  return uv, z


def render_depth(points_cam: np.ndarray, intrinsics: np.ndarray, height: int, width: int,
                 r_max: float = R_MAX) -> tuple[np.ndarray, np.ndarray]:
  """Renders LiDAR points into an aligned depth map (paper section 3.2).

  Points are written in depth-descending order so nearer points overwrite farther ones.
  Returns (companion [H, W] float32 = depth / r_max clipped to [0, 1], 0 = no return;
           depth_m [H, W] float32 metres, 0 = no return).
  """
  uv, z = project_points(points_cam, intrinsics)
  valid = (z > 0) & np.all(np.isfinite(uv), axis=1)
  cols = np.floor(uv[valid, 0]).astype(np.int64)
  rows = np.floor(uv[valid, 1]).astype(np.int64)
  z = z[valid]
  inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
  cols, rows, z = cols[inside], rows[inside], z[inside]
  order = np.argsort(-z, kind='stable')  # farthest first: later (nearer) writes win
  depth = np.zeros((height, width), np.float64)
  depth[rows[order], cols[order]] = z[order]
  companion = np.clip(depth / r_max, 0.0, 1.0)
  return companion.astype(np.float32), depth.astype(np.float32)


def rotation_y(yaw: np.ndarray | float) -> np.ndarray:
  """[..., 3, 3] rotation about the camera y axis."""
  yaw = np.asarray(yaw, np.float64)
  c, s = np.cos(yaw), np.sin(yaw)
  zeros, ones = np.zeros_like(yaw), np.ones_like(yaw)
  return np.stack([
      np.stack([c, zeros, s], -1),
      np.stack([zeros, ones, zeros], -1),
      np.stack([-s, zeros, c], -1),
  ], -2)


def box3d_corners(boxes: np.ndarray) -> np.ndarray:
  """boxes [K, 7] (x, y, z, l, w, h, yaw) -> corners [K, 8, 3] in the camera frame."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
  signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)],
                   np.float64) / 2.0
  # Local axes: length along x, height along y, width along z.
  extents = boxes[:, [3, 5, 4]]
  local = signs[None] * extents[:, None, :]
  return np.einsum('kij,kcj->kci', rotation_y(boxes[:, 6]), local) + boxes[:, None, :3]


def boxes3d_to_2d(boxes: np.ndarray, intrinsics: np.ndarray, height: int,
                  width: int) -> tuple[np.ndarray, np.ndarray]:
  """Image-space boxes [K, 4] (x1, y1, x2, y2) of projected 3D boxes, clipped to the image.

  Returns (boxes2d, keep) where keep [K] marks boxes entirely in front of the camera whose
  clipped box has positive area.
  """
  corners = box3d_corners(boxes)
  if corners.shape[0] == 0:
    return np.zeros((0, 4), np.float32), np.zeros((0,), bool)
  uv, z = project_points(corners.reshape(-1, 3), intrinsics)
  uv = uv.reshape(-1, 8, 2)
  in_front = np.all(z.reshape(-1, 8) > 0.1, axis=1)
  uv = np.where(in_front[:, None, None], uv, 0.0)
  x1 = np.clip(uv[..., 0].min(1), 0, width)
  y1 = np.clip(uv[..., 1].min(1), 0, height)
  x2 = np.clip(uv[..., 0].max(1), 0, width)
  y2 = np.clip(uv[..., 1].max(1), 0, height)
  boxes2d = np.stack([x1, y1, x2, y2], -1)
  keep = in_front & (x2 - x1 > 1.0) & (y2 - y1 > 1.0)
  return boxes2d.astype(np.float32), keep


def transform_points(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
  """Applies a [4, 4] rigid transform to points [P, 3]."""
  transform = np.asarray(transform, np.float64)
  return np.asarray(points, np.float64) @ transform[:3, :3].T + transform[:3, 3]


def scale_intrinsics(intrinsics: np.ndarray, sx: float, sy: float,
                     crop_x: float = 0.0, crop_y: float = 0.0) -> np.ndarray:
  """Intrinsics after cropping (crop_x, crop_y) pixels off the top-left, then scaling."""
  k = np.asarray(intrinsics, np.float64).copy()
  k[0, 2] -= crop_x
  k[1, 2] -= crop_y
  k[0] *= sx
  k[1] *= sy
  return k
