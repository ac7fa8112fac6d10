"""Dense target encodings of the probe heads (host-side numpy): sparse-aware depth cells,
box-footprint occupancy, nearest resizing of label maps, fixed-size ground-truth rows."""

from __future__ import annotations

import numpy as np


def cell_mean(values: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """Sparse-aware downsample: [H, W] (0 = no label) -> [h, w], each cell the mean of the valid
  (> 0, finite) source pixels whose index maps into it (row r -> floor(r h / H)), 0 if none.
  Nearest or bilinear resizing would drop or smear sparse LiDAR returns. Where the output is
  finer than the input, the input is first repeated by an integer factor (nearest upsampling)
  so that every cell has source pixels."""
  out_h, out_w = out_hw
  values = np.repeat(np.repeat(values, -(-out_h // values.shape[0]), axis=0),
                     -(-out_w // values.shape[1]), axis=1)
  height, width = values.shape
  rows = (np.arange(height) * out_h) // height
  cols = (np.arange(width) * out_w) // width
  cell = (rows[:, None] * out_w + cols[None, :]).reshape(-1)
  flat = values.reshape(-1).astype(np.float64)
  valid = np.isfinite(flat) & (flat > 0)
  total = np.bincount(cell[valid], flat[valid], minlength=out_h * out_w)
  count = np.bincount(cell[valid], minlength=out_h * out_w)
  mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
  return mean.reshape(out_h, out_w).astype(np.float32)


def occupancy_target(boxes2d: np.ndarray, classes: np.ndarray, num_classes: int,
                     image_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
  """[h, w, num_classes + 1] float32 box-footprint occupancy: a cell is occupied by a box when
  its centre lies inside the box (or it holds the centre of a box too small to cover any
  cell centre); the last channel is 'any object'."""
  out_h, out_w = out_hw
  sy, sx = image_hw[0] / out_h, image_hw[1] / out_w
  target = np.zeros((out_h, out_w, num_classes + 1), np.float32)
  centre_x = (np.arange(out_w) + 0.5) * sx
  centre_y = (np.arange(out_h) + 0.5) * sy
  for (x1, y1, x2, y2), cls in zip(np.asarray(boxes2d, np.float64).reshape(-1, 4),
                                   np.asarray(classes).reshape(-1)):
    if not (x2 > x1 and y2 > y1):
      continue
    in_x = (centre_x >= x1) & (centre_x < x2)
    in_y = (centre_y >= y1) & (centre_y < y2)
    cells = in_y[:, None] & in_x[None, :]
    if not cells.any():
      col = int(np.clip((x1 + x2) / 2 / sx, 0, out_w - 1))
      row = int(np.clip((y1 + y2) / 2 / sy, 0, out_h - 1))
      cells[row, col] = True
    target[..., int(cls)][cells] = 1.0
  target[..., -1] = target[..., :-1].max(-1) if num_classes else 0.0
  return target


def nearest(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize by pixel centres ([H, W, ...] -> [h, w, ...])."""
  height, width = image.shape[:2]
  rows = np.minimum(((np.arange(out_hw[0]) + 0.5) * height / out_hw[0]).astype(int), height - 1)
  cols = np.minimum(((np.arange(out_hw[1]) + 0.5) * width / out_hw[1]).astype(int), width - 1)
  return image[rows[:, None], cols[None, :]]


def pad_rows(array: np.ndarray, rows: int, what: str) -> np.ndarray:
  if array.shape[0] > rows:
    raise ValueError(f'a frame has {array.shape[0]} visible {what}, more than '
                     f'probe.max_gt_boxes={rows}; raise it (--config.probe.max_gt_boxes=N)')
  out = np.zeros((rows, *array.shape[1:]), array.dtype)
  out[:array.shape[0]] = array
  return out
