"""Training views of end-to-end fine-tuning: a random-resized crop before the probe view.

S1 fine-tunes with random-resized-crop scale [0.8, 1.0] in train mode. The crop runs on the
host, on the record, before pipeline.ProbeFrame resizes it to the clean probe view, so the
detection targets are built from boxes already in crop coordinates: one crop box per frame,
applied to RGB, the companion map and every label map alike, 2D boxes shifted and clipped to
it, the intrinsics' principal point shifted with it (3D boxes stay in metres). Validation uses
ProbeFrame itself: the clean, uncropped view.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np

from lemumo_jax.data import geometry, pipeline


def random_resized_crop_box(rng: np.random.Generator, image_hw: tuple[int, int],
                            scale: tuple[float, float],
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            attempts: int = 10) -> tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params: (top, left, height, width) in whole pixels.

  Area fraction ~ U(scale), aspect (width / height) log-uniform in `ratio`; the first of
  `attempts` draws that fits is kept, else the largest centred box with the aspect clamped to
  `ratio`.
  """
  height, width = image_hw
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def crop_record(record: dict[str, Any], box: tuple[int, int, int, int]) -> dict[str, Any]:
  """The record restricted to box = (top, left, height, width) pixels of its frame.

  Image fields are sliced; 2D boxes are shifted into the crop and clipped to it, and boxes
  left with no area (under a pixel either way) are dropped with their classes.
  """
  top, left, h, w = box
  out = dict(record)
  for key in ('rgb', 'companion', 'depth_target', 'seg'):
    out[key] = record[key][top:top + h, left:left + w]
  boxes = np.asarray(record['boxes2d'], np.float64).reshape(-1, 4) - [left, top, left, top]
  boxes = np.clip(boxes, 0, [w, h, w, h])
  keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
  out['boxes2d'] = boxes[keep].astype(np.float32)
  out['boxes2d_cls'] = np.asarray(record['boxes2d_cls']).reshape(-1)[keep]
  out['intrinsics'] = geometry.scale_intrinsics(record['intrinsics'], 1.0, 1.0, left,
                                                top).astype(np.float32)
  return out


class CroppedProbeFrame(grain.transforms.RandomMap):
  """Record -> a random-resized crop of it -> `frame` (a ProbeFrame: view + targets)."""

  def __init__(self, frame: pipeline.ProbeFrame, scale: tuple[float, float],
               ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    scale, ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
    if not 0 < scale[0] <= scale[1] <= 1:
      raise ValueError(f'config.finetune.crop_scale={scale}: need 0 < low <= high <= 1')
    if not 0 < ratio[0] <= ratio[1]:
      raise ValueError(f'config.finetune.crop_ratio={ratio}: need 0 < low <= high')
    self._frame, self._scale, self._ratio = frame, scale, ratio

  def random_map(self, record, rng: np.random.Generator):
    box = random_resized_crop_box(rng, record['rgb'].shape[:2], self._scale, self._ratio)
    return self._frame.map(crop_record(record, box))
