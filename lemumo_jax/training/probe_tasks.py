"""What the probe heads learn and how they are scored: the heads' losses (paper S3) and the
validation accumulator of the probe and fine-tune stages.

Losses, per head:
  centernet3d  CenterNet focal heatmap loss + L1 on offset, log size, log depth, (sin, cos) yaw
  centernet2d  focal heatmap loss + L1 on offset and log (w, h)
  seg          softmax cross-entropy over labelled pixels (IGNORE_LABEL skipped)
  depth        L1 in metres over pixels with a depth label
  occupancy    focal-reweighted BCE-with-logits + soft Dice + 0.1 x consistency between the
               'any object' channel and the max over the class channels
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lemumo_jax.data import pipeline
from lemumo_jax.data.schema import IGNORE_LABEL
from lemumo_jax.evaluation import metrics
from lemumo_jax.tasks import centernet

OCCUPANCY_FOCAL_GAMMA = 2.0
OCCUPANCY_CONSISTENCY_WEIGHT = 0.1
REGRESSION_3D = ('offset', 'size', 'depth', 'yaw')
REGRESSION_2D = ('offset', 'wh')


# ----------------------------------------------------------------------------------- losses


def _seg_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  labels = labels.astype(jnp.int32)
  valid = labels != IGNORE_LABEL
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       jnp.where(valid, labels, 0))
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def _depth_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  valid = target > 0
  return jnp.sum(jnp.abs(pred - target) * valid) / jnp.maximum(jnp.sum(valid), 1)


def occupancy_losses(logits: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
  """logits, target [B, h, w, C + 1] (the last channel = any object) -> focal BCE, Dice,
  consistency (each a scalar)."""
  logits = logits.astype(jnp.float32)
  prob = jax.nn.sigmoid(logits)
  bce = optax.sigmoid_binary_cross_entropy(logits, target)
  p_t = prob * target + (1 - prob) * (1 - target)
  focal = jnp.mean(bce * (1 - p_t)**OCCUPANCY_FOCAL_GAMMA)
  intersection = jnp.sum(prob * target, axis=(1, 2))
  dice = 1 - (2 * intersection + 1) / (jnp.sum(prob, axis=(1, 2)) + jnp.sum(target, axis=(1, 2))
                                       + 1)
  out = {'focal': focal, 'dice': jnp.mean(dice)}
  if logits.shape[-1] > 2:  # several classes plus 'any'
    out['consistency'] = jnp.mean(jnp.abs(prob[..., -1] - jnp.max(prob[..., :-1], axis=-1)))
  else:
    out['consistency'] = jnp.zeros(())
  return out


def probe_losses(outputs: dict[str, Any], batch: dict[str, jax.Array],
                 heads: tuple[str, ...]) -> dict[str, jax.Array]:
  """Batch losses: '<head>' (that head's total), '<head>/<term>', and 'loss' = sum of heads."""
  out = {}
  for head, prefix, regression in (('centernet3d', 'ct3d', REGRESSION_3D),
                                   ('centernet2d', 'ct2d', REGRESSION_2D)):
    if head not in heads:
      continue
    pred = outputs[head]
    terms = {'heatmap': centernet.focal_heatmap_loss(pred['heatmap'], batch[f'{prefix}_heatmap'])}
    for name in regression:
      terms[name] = centernet.masked_l1_loss(pred[name], batch[f'{prefix}_index'],
                                             batch[f'{prefix}_{name}'], batch[f'{prefix}_mask'])
    out.update({f'{head}/{k}': v for k, v in terms.items()})
    out[head] = sum(terms.values())
  if 'seg' in heads:
    out['seg'] = _seg_loss(outputs['seg'], batch['seg'])
  if 'depth' in heads:
    out['depth'] = _depth_loss(outputs['depth'], batch['depth'])
  if 'occupancy' in heads:
    terms = occupancy_losses(outputs['occupancy'], batch['occupancy'])
    out.update({f'occupancy/{k}': v for k, v in terms.items()})
    out['occupancy'] = (terms['focal'] + terms['dice']
                        + OCCUPANCY_CONSISTENCY_WEIGHT * terms['consistency'])
  out['loss'] = sum(out[h] for h in heads)
  return out



# ------------------------------------------------------------------------------- evaluation


class ProbeEvaluator:
  """Accumulates one validation pass: per-example losses, detections, seg, depth, occupancy."""

  def __init__(self, heads, metadata, geometry: pipeline.ProbeGeometry, probe_cfg,
               num_figure_frames: int = 0):
    self.heads, self.geometry, self.cfg = tuple(heads), geometry, probe_cfg
    self.classes_3d = tuple(metadata.get('classes_3d', ()))
    self.classes_2d = tuple(metadata.get('classes_2d', ()))
    self.seg_classes = tuple(metadata.get('seg_classes', ()))
    self.det3d = metrics.Detection3DAccumulator(self.classes_3d)
    self.det2d = metrics.Detection2DAccumulator(self.classes_2d)
    self.seg = metrics.SegmentationMetric(max(len(self.seg_classes), 1))
    self.depth = metrics.DepthMAE()
    channels = len(self.classes_2d) + 1
    self.occ_inter, self.occ_union = np.zeros(channels), np.zeros(channels)
    self.loss_sums: dict[str, float] = {}
    self.count = 0
    self.num_figure_frames = num_figure_frames
    self.figure_frames: list[dict[str, Any]] = []

  def update(self, losses: dict[str, np.ndarray], preds: dict[str, np.ndarray],
             batch: dict[str, np.ndarray]) -> None:
    valid = np.asarray(batch['valid']) > 0
    for name, values in losses.items():
      self.loss_sums[name] = self.loss_sums.get(name, 0.0) + float(np.sum(values[valid]))
    self.count += int(valid.sum())
    cfg, geo = self.cfg, self.geometry
    for b in np.flatnonzero(valid):
      frame = {}
      for dim, accumulator in (('3d', self.det3d), ('2d', self.det2d)):
        if f'centernet{dim}' not in self.heads:
          continue
        if dim == '3d':
          decoded = centernet.decode_3d(
              *(preds[f'ct3d_{k}'][b] for k in ('heatmap', *REGRESSION_3D)),
              batch['intrinsics'][b], geo.image_hw, k=cfg.max_detections,
              score_threshold=cfg.score_threshold)
        else:
          decoded = centernet.decode_2d(
              *(preds[f'ct2d_{k}'][b] for k in ('heatmap', *REGRESSION_2D)), geo.image_hw,
              k=cfg.max_detections, score_threshold=cfg.score_threshold)
        gt = batch[f'gt{dim}_mask'][b] > 0
        gt_boxes, gt_classes = batch[f'gt{dim}_boxes'][b][gt], batch[f'gt{dim}_classes'][b][gt]
        accumulator.update(*decoded, gt_boxes, gt_classes)
        frame.update({f'pred_boxes{dim}': decoded[0], f'pred_scores{dim}': decoded[1],
                      f'pred_classes{dim}': decoded[2], f'gt_boxes{dim}': gt_boxes,
                      f'gt_classes{dim}': gt_classes})
      if len(self.figure_frames) < self.num_figure_frames:
        frame.update(rgb=batch['rgb'][b], intrinsics=batch['intrinsics'][b])
        for key in ('seg', 'depth', 'occupancy'):
          if key in self.heads:
            frame[f'pred_{key}'], frame[f'gt_{key}'] = preds[key][b], batch[key][b]
        self.figure_frames.append(frame)
    if 'seg' in self.heads:
      self.seg.update(preds['seg'][valid], batch['seg'][valid])
    if 'depth' in self.heads:
      self.depth.update(preds['depth'][valid], batch['depth'][valid])
    if 'occupancy' in self.heads:
      pred, target = preds['occupancy'][valid] > 0.5, batch['occupancy'][valid] > 0.5
      self.occ_inter += np.sum(pred & target, axis=(0, 1, 2))
      self.occ_union += np.sum(pred | target, axis=(0, 1, 2))

  def result(self) -> dict[str, Any]:
    """Flat metrics: 'loss' and 'loss/<part>' (mean per frame), then per head: mAP_XY, ADE_XY,
    mAP_XZ, AP_XY/<class>, ...; mAP50, AP50/<class>; seg_mIoU, IoU/<class>; depth_MAE (m);
    occupancy_IoU ('any object') and occupancy_IoU/<class>. AP and IoU are fractions."""
    if not self.count:
      raise RuntimeError('the validation pass saw no frames')
    out = {('loss' if k == 'loss' else f'loss/{k}'): v / self.count
           for k, v in self.loss_sums.items()}
    if 'centernet3d' in self.heads:
      out.update(self.det3d.summary())
    if 'centernet2d' in self.heads:
      out.update(self.det2d.summary())
    if 'seg' in self.heads:
      seg = self.seg.result()
      out['seg_mIoU'] = seg['mIoU']
      out.update({f'IoU/{n}': float(v) for n, v in zip(self.seg_classes, seg['IoU'])})
    if 'depth' in self.heads:
      out['depth_MAE'] = self.depth.result()
    if 'occupancy' in self.heads:
      # Neutral empty-union policy: a channel nobody (target or prediction) occupied over the
      # split has no IoU and is left out, neither 0 nor 1.
      iou = np.divide(self.occ_inter, self.occ_union, out=np.full(self.occ_union.shape, np.nan),
                      where=self.occ_union > 0)
      out['occupancy_IoU'] = float(iou[-1])
      out.update({f'occupancy_IoU/{n}': float(v) for n, v in zip(self.classes_2d, iou[:-1])})
    return out
