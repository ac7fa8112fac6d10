"""CenterNet targets, decoding and losses for the detection probes (paper S3; Zhou et al. 2019).

The probe heads (models/probes.py CenterNet3D / CenterNet2D) predict on an output grid of
output_hw cells over an image of image_hw pixels, e.g. a 224 image, 16 px patches, 14x14 tokens
upsampled 2x to 28x28: stride 8. Everything here is channel-last like those heads:
heatmap [h, w, C], regression maps [h, w, D].

Pixel convention (geometry.project_points): pixel (col, row) covers [col, col + 1) x
[row, row + 1). A point (u, v) in image pixels falls in output cell (floor(u / sx),
floor(v / sy)) with sx = W / w, sy = H / h; its sub-cell offset (u / sx - col, v / sy - row) is
in [0, 1), and decoding inverts it exactly: u = (col + offset_x) * sx.

Per object, the regression targets sit at `index` = row * w + col of its centre cell:
  3D  offset [2]; size [3] = log(l, w, h) metres; depth [1] = log z of the box centre (camera z,
      not range: unprojecting a pixel through K needs z); yaw [2] = (sin, cos) of the
      observation angle alpha = yaw - atan2(x, z). A patch sees the object's heading relative
      to its viewing ray, not to the camera axis, so alpha is what it can read; decoding adds
      the ray angle atan2(x, z) of the decoded centre back.
  2D  offset [2]; wh [2] = log(width, height) in image pixels.
The 3D centre is the PROJECTED 3D box centre, not the centre of the 2D box.

Targets are built in the data loader (numpy, one frame); decoding runs at evaluation (numpy,
one frame); the two losses are jax.numpy for the jitted probe step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lemumo_jax.data import geometry

MIN_DEPTH = 0.1  # metres; centres closer than this (or behind the camera) get no target


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
  """CenterNet's heatmap radius (output cells) for a box of height x width cells.

  The radius r bounds how far the two corners of a box may move while it keeps IoU
  >= min_overlap with the original, in three cases: one corner in and one out
  ((h - r)(w - r) / (2hw - (h - r)(w - r)) = o), both in ((h - 2r)(w - 2r) / hw = o), both
  out (hw / ((h + 2r)(w + 2r)) = o). Each case is a quadratic a r^2 + b r + c = 0.
  CenterNet (after CornerNet) takes every root as (-b + sqrt(b^2 - 4ac)) / 2: the larger root
  in case 1 and no 1 / a factor in cases 2 and 3, so the radius is looser than the exact bound.
  That convention is kept so the heatmaps, and the loss values, are CenterNet's. Returns the
  smallest of the three (case 3 in practice).
  """
  o, hw, s = min_overlap, height * width, height + width
  cases = ((1.0, -s, hw * (1 - o) / (1 + o)),
           (4.0, -2 * s, (1 - o) * hw),
           (4 * o, 2 * o * s, (o - 1) * hw))
  return min((-b + np.sqrt(b * b - 4 * a * c)) / 2 for a, b, c in cases)


def gaussian_kernel(radius: int) -> np.ndarray:
  """[2r + 1, 2r + 1] Gaussian with peak exactly 1 and sigma = (2r + 1) / 6."""
  sigma = (2 * radius + 1) / 6.0
  grid = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-(grid[:, None]**2 + grid[None, :]**2) / (2 * sigma * sigma))
  kernel[kernel < np.finfo(np.float64).eps * kernel.max()] = 0  # as CenterNet
  return kernel


def draw_gaussian(heatmap: np.ndarray, col: int, row: int, radius: int) -> None:
  """Splats gaussian_kernel(radius) centred on cell (col, row) into heatmap [h, w] by max."""
  h, w = heatmap.shape
  kernel = gaussian_kernel(radius)
  top, bottom = min(row, radius), min(h - row, radius + 1)
  left, right = min(col, radius), min(w - col, radius + 1)
  window = heatmap[row - top:row + bottom, col - left:col + right]
  np.maximum(window, kernel[radius - top:radius + bottom, radius - left:radius + right],
             out=window)


def _strides(image_hw, output_hw) -> tuple[float, float]:
  """(sx, sy) image pixels per output cell."""
  return image_hw[1] / output_hw[1], image_hw[0] / output_hw[0]


def _check_classes(classes: np.ndarray, count: int, num_classes: int, what: str) -> np.ndarray:
  classes = np.asarray(classes).reshape(-1).astype(np.int64)
  if classes.shape[0] != count:
    raise ValueError(f'{what}: {count} boxes but {classes.shape[0]} classes')
  if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
    raise ValueError(f'{what}: classes must lie in [0, {num_classes}), got {np.unique(classes)}')
  return classes


def _splat_objects(centres_uv, sizes_hw, classes, valid, image_hw, output_hw, num_classes,
                   max_objects, min_overlap):
  """Shared encoder core. centres_uv [K, 2] image px; sizes_hw [K, 2] box (height, width) px.

  Every valid object is drawn into the heatmap; the first max_objects valid ones (input order)
  also get a regression slot. Returns (heatmap [h, w, C], slots [S] object indices,
  index [M] int32, offset [M, 2] float32, mask [M] float32).
  """
  out_h, out_w = output_hw
  sx, sy = _strides(image_hw, output_hw)
  heatmap = np.zeros((num_classes, out_h, out_w), np.float64)
  index = np.zeros(max_objects, np.int32)
  offset = np.zeros((max_objects, 2), np.float32)
  mask = np.zeros(max_objects, np.float32)
  grid_uv = np.asarray(centres_uv, np.float64) / np.array([sx, sy])
  inside = (np.all(np.isfinite(grid_uv), 1) & (grid_uv[:, 0] >= 0) & (grid_uv[:, 0] < out_w)
            & (grid_uv[:, 1] >= 0) & (grid_uv[:, 1] < out_h))
  slots = []
  for k in np.flatnonzero(valid & inside):
    col, row = (int(v) for v in np.floor(grid_uv[k]))
    radius = max(0, int(gaussian_radius(sizes_hw[k, 0] / sy, sizes_hw[k, 1] / sx,
                                        min_overlap)))
    draw_gaussian(heatmap[classes[k]], col, row, radius)
    if len(slots) < max_objects:
      slot = len(slots)
      index[slot] = row * out_w + col
      offset[slot] = grid_uv[k] - (col, row)
      mask[slot] = 1.0
      slots.append(k)
  heatmap = np.ascontiguousarray(heatmap.transpose(1, 2, 0), dtype=np.float32)
  return heatmap, np.asarray(slots, np.int64), index, offset, mask


def visible_3d(boxes3d: np.ndarray, intrinsics: np.ndarray,
               image_hw: tuple[int, int]) -> np.ndarray:
  """[K] bool: the boxes a camera-view probe can see, i.e. the ones encode_targets_3d gives a
  target: centre >= MIN_DEPTH in front and projecting inside the image, and all corners in
  front with a clipped 2D box over 1 px each way. The evaluation's ground truth is this set."""
  boxes = np.asarray(boxes3d, np.float64).reshape(-1, 7)
  centres_uv, z = geometry.project_points(boxes[:, :3], intrinsics)
  _, keep = geometry.boxes3d_to_2d(boxes, intrinsics, *image_hw)
  height, width = image_hw
  inside = (np.all(np.isfinite(centres_uv), 1) & (centres_uv[:, 0] >= 0)
            & (centres_uv[:, 0] < width) & (centres_uv[:, 1] >= 0) & (centres_uv[:, 1] < height))
  return keep & (z >= MIN_DEPTH) & inside


def visible_2d(boxes2d: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
  """[K] bool: 2D boxes of positive size whose centre lies inside the image (encode_targets_2d's
  set)."""
  boxes = np.asarray(boxes2d, np.float64).reshape(-1, 4)
  cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
  return ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (cx >= 0)
          & (cx < image_hw[1]) & (cy >= 0) & (cy < image_hw[0]))


def encode_targets_3d(boxes3d: np.ndarray, classes: np.ndarray, intrinsics: np.ndarray,
                      image_hw: tuple[int, int], output_hw: tuple[int, int], num_classes: int,
                      max_objects: int = 64, min_overlap: float = 0.7) -> dict[str, np.ndarray]:
  """CenterNet3D targets for one frame.

  boxes3d [K, 7] camera frame (schema convention), classes [K], intrinsics [3, 3] of the
  image_hw image. An object gets a target when its centre is >= MIN_DEPTH in front of the
  camera and projects inside the image, and geometry.boxes3d_to_2d keeps it (all corners in
  front, clipped 2D box over 1 px each way): that 2D box sets the Gaussian radius.
  Returns {'heatmap' [h, w, C], 'index' [M] int32, 'offset' [M, 2], 'size' [M, 3],
           'depth' [M, 1], 'yaw' [M, 2], 'mask' [M]} (float32 unless stated; M = max_objects).
  """
  boxes = np.asarray(boxes3d, np.float64).reshape(-1, 7)
  classes = _check_classes(classes, boxes.shape[0], num_classes, 'encode_targets_3d')
  if np.any(boxes[:, 3:6] <= 0):
    raise ValueError(f'encode_targets_3d: box sizes (l, w, h) must be > 0, got {boxes[:, 3:6]}')
  centres_uv, _ = geometry.project_points(boxes[:, :3], intrinsics)
  boxes2d, _ = geometry.boxes3d_to_2d(boxes, intrinsics, *image_hw)
  sizes_hw = np.stack([boxes2d[:, 3] - boxes2d[:, 1], boxes2d[:, 2] - boxes2d[:, 0]], -1)
  heatmap, slots, index, offset, mask = _splat_objects(
      centres_uv, sizes_hw, classes, visible_3d(boxes, intrinsics, image_hw), image_hw,
      output_hw, num_classes, max_objects, min_overlap)
  size = np.zeros((max_objects, 3), np.float32)
  depth = np.zeros((max_objects, 1), np.float32)
  yaw = np.zeros((max_objects, 2), np.float32)
  chosen = boxes[slots]
  size[:slots.size] = np.log(chosen[:, 3:6])
  depth[:slots.size, 0] = np.log(chosen[:, 2])
  alpha = chosen[:, 6] - np.arctan2(chosen[:, 0], chosen[:, 2])
  yaw[:slots.size] = np.stack([np.sin(alpha), np.cos(alpha)], -1)
  return {'heatmap': heatmap, 'index': index, 'offset': offset, 'size': size, 'depth': depth,
          'yaw': yaw, 'mask': mask}


def encode_targets_2d(boxes2d: np.ndarray, classes: np.ndarray, image_hw: tuple[int, int],
                      output_hw: tuple[int, int], num_classes: int, max_objects: int = 64,
                      min_overlap: float = 0.7) -> dict[str, np.ndarray]:
  """CenterNet2D targets for one frame: boxes2d [K, 4] x1 y1 x2 y2 pixels, classes [K].

  Boxes of positive width and height whose centre lies inside the image get a target.
  Returns {'heatmap' [h, w, C], 'index' [M] int32, 'offset' [M, 2], 'wh' [M, 2] (log pixels),
           'mask' [M]}.
  """
  boxes = np.asarray(boxes2d, np.float64).reshape(-1, 4)
  classes = _check_classes(classes, boxes.shape[0], num_classes, 'encode_targets_2d')
  width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  centres = (boxes[:, :2] + boxes[:, 2:]) / 2
  heatmap, slots, index, offset, mask = _splat_objects(
      centres, np.stack([height, width], -1), classes, (width > 0) & (height > 0), image_hw,
      output_hw, num_classes, max_objects, min_overlap)
  wh = np.zeros((max_objects, 2), np.float32)
  wh[:slots.size] = np.log(np.stack([width[slots], height[slots]], -1))
  return {'heatmap': heatmap, 'index': index, 'offset': offset, 'wh': wh, 'mask': mask}


def heatmap_peaks(heatmap: np.ndarray, k: int,
                  score_threshold: float = 0.0) -> tuple[np.ndarray, ...]:
  """3x3 max-pool NMS then top-k over heatmap [h, w, C] (probabilities).

  A cell is a peak when it equals the maximum of its 3x3 neighbourhood in its own class
  channel (plateaus keep every tied cell, as CenterNet's pooling equality does).
  Returns (scores [P], classes [P], rows [P], cols [P]) by descending score, P <= k, scores
  >= score_threshold.
  """
  heat = np.asarray(heatmap, np.float64)
  if heat.ndim != 3:
    raise ValueError(f'heatmap must be [h, w, C], got shape {heat.shape}')
  h, w, c = heat.shape
  padded = np.pad(heat, ((1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  pooled = np.max([padded[i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)
  scores = np.where(heat == pooled, heat, -np.inf).reshape(-1)
  top = np.argsort(-scores, kind='stable')[:k]
  top = top[scores[top] >= score_threshold]
  cell, classes = np.divmod(top, c)
  rows, cols = np.divmod(cell, w)
  return scores[top], classes, rows, cols


def _regression_map(name: str, value: np.ndarray, hw: tuple[int, int], dim: int) -> np.ndarray:
  value = np.asarray(value, np.float64)
  if value.shape != (*hw, dim):
    raise ValueError(f'{name} must be [{hw[0]}, {hw[1]}, {dim}] like the heatmap, '
                     f'got shape {value.shape}')
  return value


def decode_3d(heatmap, offset, size, depth, yaw, intrinsics, image_hw: tuple[int, int],
              k: int = 50, score_threshold: float = 0.0):
  """CenterNet3D outputs of one frame -> boxes3d [P, 7] (camera frame), scores [P], classes [P].

  heatmap [h, w, C] after the sigmoid; offset [h, w, 2]; size [h, w, 3] log metres; depth
  [h, w, 1] log z; yaw [h, w, 2] (sin, cos) of the observation angle. The centre pixel
  (col + offset) * stride is lifted to depth z through the inverse intrinsics.
  """
  hw = np.shape(heatmap)[:2]
  offset, size = _regression_map('offset', offset, hw, 2), _regression_map('size', size, hw, 3)
  depth, yaw = _regression_map('depth', depth, hw, 1), _regression_map('yaw', yaw, hw, 2)
  scores, classes, rows, cols = heatmap_peaks(heatmap, k, score_threshold)
  sx, sy = _strides(image_hw, hw)
  u = (cols + offset[rows, cols, 0]) * sx
  v = (rows + offset[rows, cols, 1]) * sy
  z = np.exp(depth[rows, cols, 0])
  rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(
      np.asarray(intrinsics, np.float64)).T
  centres = rays * (z / rays[:, 2])[:, None]
  alpha = np.arctan2(yaw[rows, cols, 0], yaw[rows, cols, 1])
  heading = alpha + np.arctan2(centres[:, 0], centres[:, 2])
  heading = (heading + np.pi) % (2 * np.pi) - np.pi
  boxes = np.concatenate([centres, np.exp(size[rows, cols]), heading[:, None]], -1)
  return boxes.astype(np.float32), scores.astype(np.float32), classes.astype(np.int32)


def decode_2d(heatmap, offset, wh, image_hw: tuple[int, int], k: int = 100,
              score_threshold: float = 0.0):
  """CenterNet2D outputs of one frame -> boxes2d [P, 4] x1 y1 x2 y2 pixels, scores, classes.

  heatmap [h, w, C] after the sigmoid; offset [h, w, 2]; wh [h, w, 2] log pixels.
  """
  hw = np.shape(heatmap)[:2]
  offset, wh = _regression_map('offset', offset, hw, 2), _regression_map('wh', wh, hw, 2)
  scores, classes, rows, cols = heatmap_peaks(heatmap, k, score_threshold)
  sx, sy = _strides(image_hw, hw)
  centre = np.stack([(cols + offset[rows, cols, 0]) * sx, (rows + offset[rows, cols, 1]) * sy],
                    -1)
  half = np.exp(wh[rows, cols]) / 2
  boxes = np.concatenate([centre - half, centre + half], -1)
  return boxes.astype(np.float32), scores.astype(np.float32), classes.astype(np.int32)


# CenterNet clamps sigmoid(x) to [1e-4, 1 - 1e-4]; clipping the logit to the matching range
# is the same clamp, and lets the logs be taken as stable log-sigmoids.
_LOGIT_LIMIT = float(np.log((1 - 1e-4) / 1e-4))


def focal_heatmap_loss(pred_logits: jax.Array, target: jax.Array, alpha: float = 2.0,
                       beta: float = 4.0) -> jax.Array:
  """CenterNet's penalty-reduced pixel-wise focal loss; pred_logits, target [B, h, w, C].

  Positives are the cells where the target is exactly 1 (Gaussian peaks):
  (1 - p)^alpha log p; every other cell: (1 - y)^beta p^alpha log(1 - p). The negated sum over
  the batch is divided by the number of positives in the batch (by 1 when there are none).
  """
  if pred_logits.shape != target.shape:
    raise ValueError(f'focal_heatmap_loss: logits shape {pred_logits.shape} != target shape '
                     f'{target.shape} (both [B, h, w, C])')
  x = jnp.clip(pred_logits.astype(jnp.float32), -_LOGIT_LIMIT, _LOGIT_LIMIT)
  target = target.astype(jnp.float32)
  prob = jax.nn.sigmoid(x)
  positive = target >= 1.0
  pos_term = jax.nn.log_sigmoid(x) * (1 - prob)**alpha
  neg_term = jax.nn.log_sigmoid(-x) * prob**alpha * (1 - target)**beta
  total = jnp.sum(jnp.where(positive, pos_term, neg_term))
  return -total / jnp.maximum(jnp.sum(positive), 1).astype(jnp.float32)


def gather_at(pred: jax.Array, index: jax.Array) -> jax.Array:
  """pred [B, h, w, D], index [B, M] (row * w + col) -> [B, M, D]."""
  b, h, w, d = pred.shape
  flat = pred.reshape(b, h * w, d)
  return jnp.take_along_axis(flat, index.astype(jnp.int32)[..., None], axis=1)


def masked_l1_loss(pred: jax.Array, index: jax.Array, target: jax.Array,
                   mask: jax.Array) -> jax.Array:
  """CenterNet's RegL1Loss: pred [B, h, w, D] read at index [B, M] vs target [B, M, D].

  Sum of |pred - target| over the masked slots (mask [B, M], 1 = object), divided by
  (number of masked slots x D + 1e-4).
  """
  if target.shape != (*index.shape, pred.shape[-1]) or mask.shape != index.shape:
    raise ValueError(f'masked_l1_loss: pred {pred.shape}, index {index.shape}, target '
                     f'{target.shape}, mask {mask.shape}; expected [B, h, w, D], [B, M], '
                     '[B, M, D], [B, M]')
  weight = mask.astype(jnp.float32)[..., None]
  error = jnp.abs(gather_at(pred, index).astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.sum(error * weight) / (jnp.sum(weight) * pred.shape[-1] + 1e-4)
