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
  return corners_to_2d(box3d_corners(boxes), intrinsics, height, width)


def corners_to_2d(corners: np.ndarray, intrinsics: np.ndarray, height: int,
                  width: int) -> tuple[np.ndarray, np.ndarray]:
  """boxes3d_to_2d on corners [K, 8, 3] in the camera frame (boxes of any 3D orientation)."""
  corners = np.asarray(corners, np.float64).reshape(-1, 8, 3)
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


# Box corners (box3d_corners order) joined by an edge differ in one sign bit.
_BOX_EDGES = np.array([(i, j) for i in range(8) for j in range(i + 1, 8)
                       if bin(i ^ j).count('1') == 1])


def _slope_bounds(origin: np.ndarray, boxes: np.ndarray, eps: float = 1e-3) -> np.ndarray:
  """Range of ray slopes (dx/dz, dy/dz) from `origin` that can reach each box.

  The part of a box in front of the plane z = origin_z + eps is a convex polytope whose
  vertices are the box corners in front plus the edge crossings of that plane; its slope
  image is contained in the bounding rectangle of those vertices' slopes. Used to cull rays.
  boxes [B, 7] -> [B, 4] (sx_lo, sx_hi, sy_lo, sy_hi); +inf/-inf when nothing is in front.
  """
  corners = box3d_corners(boxes) - origin  # [B, 8, 3]
  start, end = corners[:, _BOX_EDGES[:, 0]], corners[:, _BOX_EDGES[:, 1]]  # [B, 12, 3]
  with np.errstate(divide='ignore', invalid='ignore'):
    frac = (eps - start[..., 2]) / (end[..., 2] - start[..., 2])
  crossing = (frac > 0) & (frac < 1)
  cut = start + np.where(crossing, frac, 0.0)[..., None] * (end - start)
  points = np.concatenate([corners, cut], 1)  # [B, 20, 3]
  valid = np.concatenate([corners[..., 2] >= eps, crossing], 1)
  z = np.where(valid, points[..., 2], 1.0)
  slopes = points[..., :2] / z[..., None]  # [B, 20, 2]
  lo = np.where(valid[..., None], slopes, np.inf).min(1)
  hi = np.where(valid[..., None], slopes, -np.inf).max(1)
  return np.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], -1)


def intersect_boxes(origin: np.ndarray, dirs: np.ndarray,
                    boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Nearest entry of forward rays into oriented boxes (slab method in each box's frame).

  origin [3]; dirs [P, 3] with dirs[:, 2] > 0; boxes [B, 7] (schema convention).
  Returns (t [P] ray parameter of the nearest hit, inf if none; box index [P], -1 if none).
  A point is origin + t * dirs, so t is metres of z when dirs[:, 2] == 1.
  """
  origin = np.asarray(origin, np.float64)
  dirs = np.asarray(dirs, np.float64)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
  if dirs.ndim != 2 or dirs.shape[1] != 3 or np.any(dirs[:, 2] <= 0):
    raise ValueError(f'dirs must be [P, 3] with positive z, got shape {dirs.shape}')
  t_best = np.full(dirs.shape[0], np.inf)
  index = np.full(dirs.shape[0], -1, np.int64)
  if boxes.shape[0] == 0:
    return t_best, index
  slope_x, slope_y = dirs[:, 0] / dirs[:, 2], dirs[:, 1] / dirs[:, 2]
  bounds = _slope_bounds(origin, boxes) + np.array([-1e-9, 1e-9, -1e-9, 1e-9])
  rotations = rotation_y(boxes[:, 6])  # [B, 3, 3] local -> camera
  halves = boxes[:, [3, 5, 4]] / 2.0  # local x, y, z half-extents
  for b in range(boxes.shape[0]):
    sx_lo, sx_hi, sy_lo, sy_hi = bounds[b]
    candidates = np.flatnonzero((slope_x >= sx_lo) & (slope_x <= sx_hi)
                                & (slope_y >= sy_lo) & (slope_y <= sy_hi))
    if candidates.size == 0:
      continue
    local_origin = (origin - boxes[b, :3]) @ rotations[b]
    local_dirs = dirs[candidates] @ rotations[b]
    # A zero component means a ray parallel to that slab; a tiny one gives the same verdict
    # without 0 * inf = nan when the origin lies on the slab plane.
    local_dirs = np.where(np.abs(local_dirs) < 1e-12, 1e-12, local_dirs)
    t_lo = (-halves[b] - local_origin) / local_dirs
    t_hi = (halves[b] - local_origin) / local_dirs
    t_near = np.minimum(t_lo, t_hi).max(1)
    t_far = np.maximum(t_lo, t_hi).min(1)
    hit = (t_near <= t_far) & (t_near > 0) & (t_near < t_best[candidates])
    t_best[candidates[hit]] = t_near[hit]
    index[candidates[hit]] = b
  return t_best, index
