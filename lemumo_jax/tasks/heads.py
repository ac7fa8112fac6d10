"""The probe heads as tasks (paper S3): each one module, target encoding, loss, predictions and
metric, registered by name in HEADS. Adding a head is one class here.

The stages read a head only through this interface:
  module(spec, name)            the flax module over the patch grid [B, h, w, D] (models/probes.py)
  targets(frame, spec)          host-side numpy targets of one resized probe frame
  loss(output, batch)           {'': the head's total, '<term>': ...}, scalars over the batch
  predictions(output)           what validation reads back to the host
  metric(spec, probe_cfg)       an accumulator: update(preds, batch, rows, figure_frames), result()

Losses:
  centernet3d  CenterNet focal heatmap loss + L1 on offset, log size, log depth, (sin, cos) yaw
  centernet2d  focal heatmap loss + L1 on offset and log (w, h)
  seg          softmax cross-entropy over labelled pixels (IGNORE_LABEL skipped)
  depth        L1 in metres over pixels with a depth label
  occupancy    focal-reweighted BCE-with-logits + soft Dice + 0.1 x consistency between the
               'any object' channel and the max over the class channels
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lemumo_jax.data.schema import IGNORE_LABEL
from lemumo_jax.evaluation import metrics
from lemumo_jax.models import probes
from lemumo_jax.tasks import centernet, targets

OCCUPANCY_FOCAL_GAMMA = 2.0
OCCUPANCY_CONSISTENCY_WEIGHT = 0.1


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the heads know of the dataset and the probe setup (class names: metrics only)."""
  geometry: Any                       # data.pipeline.ProbeGeometry
  num_classes_3d: int = 0
  num_classes_2d: int = 0
  max_objects: int = 128              # CenterNet regression slots per frame
  max_gt_boxes: int = 256             # evaluation boxes per frame
  classes_3d: tuple[str, ...] = ()
  classes_2d: tuple[str, ...] = ()
  classes_seg: tuple[str, ...] = ()

  @classmethod
  def create(cls, geometry, metadata: dict[str, Any], max_objects: int = 128,
             max_gt_boxes: int = 256) -> Spec:
    names = {k: tuple(metadata.get(k, ())) for k in ('classes_3d', 'classes_2d', 'seg_classes')}
    return cls(geometry, len(names['classes_3d']), len(names['classes_2d']), int(max_objects),
               int(max_gt_boxes), names['classes_3d'], names['classes_2d'], names['seg_classes'])


@dataclasses.dataclass(frozen=True)
class Frame:
  """One record resized to the probe view: what every head's targets read."""
  record: dict[str, np.ndarray]       # the stored record (full resolution)
  image_hw: tuple[int, int]
  intrinsics: np.ndarray              # [3, 3] scaled to image_hw
  boxes2d: np.ndarray                 # [N, 4] x1 y1 x2 y2 in probe pixels


# ------------------------------------------------------------------------------------- heads


class Head:
  """A probe head; subclasses fill in the five parts. `needs`: the dataset metadata key the
  head cannot do without (its classes), or None; `batch_norm`: its module takes `train`."""
  name: str = ''
  needs: str | None = None
  batch_norm: bool = False

  def module(self, spec, name: str):
    raise NotImplementedError

  def targets(self, frame: Frame, spec) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def loss(self, output, batch) -> dict[str, jax.Array]:
    raise NotImplementedError

  def predictions(self, output) -> dict[str, jax.Array]:
    return {self.name: output}

  def metric(self, spec, probe_cfg):
    raise NotImplementedError


class _CenterNet(Head):
  """The shared part of the 3D and 2D CenterNet heads; `prefix` names their batch keys."""
  prefix, dim, regression, batch_norm = '', '', (), True

  def loss(self, output, batch):
    p = self.prefix
    terms = {'heatmap': centernet.focal_heatmap_loss(output['heatmap'], batch[f'{p}_heatmap'])}
    for name in self.regression:
      terms[name] = centernet.masked_l1_loss(output[name], batch[f'{p}_index'],
                                             batch[f'{p}_{name}'], batch[f'{p}_mask'])
    return {'': sum(terms.values()), **terms}

  def predictions(self, output):
    preds = {f'{self.prefix}_{k}': v for k, v in output.items()}
    preds[f'{self.prefix}_heatmap'] = jax.nn.sigmoid(output['heatmap'])
    return preds

  def _gt(self, boxes, classes, visible, spec) -> dict[str, np.ndarray]:
    g, d = spec.max_gt_boxes, self.dim
    what = f'{d.upper()} boxes'
    return {f'gt{d}_boxes': targets.pad_rows(boxes[visible].astype(np.float32), g, what),
            f'gt{d}_classes': targets.pad_rows(classes[visible].astype(np.int32), g, what),
            f'gt{d}_mask': targets.pad_rows(np.ones(int(visible.sum()), np.float32), g, what)}


class CenterNet3DHead(_CenterNet):
  name, needs, prefix, dim = 'centernet3d', 'classes_3d', 'ct3d', '3d'
  regression = ('offset', 'size', 'depth', 'yaw')

  def module(self, spec, name):
    return probes.CenterNet3D(spec.num_classes_3d, spec.centernet_hidden, name=name)

  def targets(self, frame, spec):
    boxes, classes = frame.record['boxes3d'], frame.record['boxes3d_cls']
    out = self._gt(boxes, classes, centernet.visible_3d(boxes, frame.intrinsics, frame.image_hw),
                   spec)
    encoded = centernet.encode_targets_3d(boxes, classes, frame.intrinsics, frame.image_hw,
                                          spec.geometry.detection_hw, spec.num_classes_3d,
                                          spec.max_objects)
    return out | {f'ct3d_{k}': v for k, v in encoded.items()}

  def metric(self, spec, probe_cfg):
    return _DetectionMetric(self, metrics.Detection3DAccumulator(spec.classes_3d), spec, probe_cfg)


class CenterNet2DHead(_CenterNet):
  name, needs, prefix, dim = 'centernet2d', 'classes_2d', 'ct2d', '2d'
  regression = ('offset', 'wh')

  def module(self, spec, name):
    return probes.CenterNet2D(spec.num_classes_2d, spec.centernet_hidden, name=name)

  def targets(self, frame, spec):
    classes = frame.record['boxes2d_cls']
    out = self._gt(frame.boxes2d, classes, centernet.visible_2d(frame.boxes2d, frame.image_hw),
                   spec)
    encoded = centernet.encode_targets_2d(frame.boxes2d, classes, frame.image_hw,
                                          spec.geometry.detection_hw, spec.num_classes_2d,
                                          spec.max_objects)
    return out | {f'ct2d_{k}': v for k, v in encoded.items()}

  def metric(self, spec, probe_cfg):
    return _DetectionMetric(self, metrics.Detection2DAccumulator(spec.classes_2d), spec, probe_cfg)


class SegHead(Head):
  name, needs = 'seg', 'seg_classes'

  def module(self, spec, name):
    return probes.SegProbe(spec.num_seg_classes, tuple(spec.seg_size), name=name)

  def targets(self, frame, spec):
    return {'seg': targets.nearest(frame.record['seg'], spec.geometry.seg_hw)}

  def loss(self, output, batch):
    labels = batch['seg'].astype(jnp.int32)
    valid = labels != IGNORE_LABEL
    ce = optax.softmax_cross_entropy_with_integer_labels(output.astype(jnp.float32),
                                                         jnp.where(valid, labels, 0))
    return {'': jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)}

  def predictions(self, output):
    return {'seg': jnp.argmax(output, axis=-1).astype(jnp.int32)}

  def metric(self, spec, probe_cfg):
    return _SegMetric(spec.classes_seg)


class DepthHead(Head):
  name = 'depth'

  def module(self, spec, name):
    return probes.DepthProbe(name=name)

  def targets(self, frame, spec):
    return {'depth': targets.cell_mean(frame.record['depth_target'], spec.geometry.depth_hw)}

  def loss(self, output, batch):
    valid = batch['depth'] > 0
    return {'': jnp.sum(jnp.abs(output - batch['depth']) * valid) / jnp.maximum(jnp.sum(valid),
                                                                                 1)}

  def metric(self, spec, probe_cfg):
    return _DepthMetric()


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


class OccupancyHead(Head):
  name, needs = 'occupancy', 'classes_2d'

  def module(self, spec, name):
    return probes.OccupancyProbe(spec.num_classes_2d + 1, spec.occupancy_hidden, name=name)

  def targets(self, frame, spec):
    return {'occupancy': targets.occupancy_target(frame.boxes2d, frame.record['boxes2d_cls'],
                                          spec.num_classes_2d, frame.image_hw,
                                          spec.geometry.occupancy_hw)}

  def loss(self, output, batch):
    terms = occupancy_losses(output, batch['occupancy'])
    total = terms['focal'] + terms['dice'] + OCCUPANCY_CONSISTENCY_WEIGHT * terms['consistency']
    return {'': total, **terms}

  def predictions(self, output):
    return {'occupancy': jax.nn.sigmoid(output)}

  def metric(self, spec, probe_cfg):
    return _OccupancyMetric(spec.classes_2d)


HEADS: dict[str, Head] = {head.name: head for head in (
    CenterNet3DHead(), CenterNet2DHead(), SegHead(), DepthHead(), OccupancyHead())}


def get(name: str) -> Head:
  if name not in HEADS:
    raise ValueError(f'unknown probe head {name!r}; choose from {list(HEADS)}')
  return HEADS[name]


def probe_losses(outputs: dict[str, Any], batch: dict[str, jax.Array],
                 heads: tuple[str, ...]) -> dict[str, jax.Array]:
  """Batch losses: '<head>' (that head's total), '<head>/<term>', and 'loss' = sum of heads."""
  out = {}
  for name in heads:
    terms = get(name).loss(outputs[name], batch)
    out.update({(name if k == '' else f'{name}/{k}'): v for k, v in terms.items()})
  out['loss'] = sum(out[name] for name in heads)
  return out


def predictions(outputs: dict[str, Any], heads: tuple[str, ...]) -> dict[str, jax.Array]:
  preds = {}
  for name in heads:
    preds.update(get(name).predictions(outputs[name]))
  return preds


class ProbeHeads(nn.Module):
  """Every enabled head over one patch grid; the heads share nothing but the input.

  patches [B, h, w, D] -> {'centernet3d': {...}, 'centernet2d': {...}, 'seg': [B, Hs, Ws, C],
  'depth': [B, 4h, 4w], 'occupancy': [B, 2h, 2w, C2 + 1]} for the heads listed in `heads`.
  """
  heads: tuple[str, ...]
  num_classes_3d: int
  num_classes_2d: int
  num_seg_classes: int
  seg_size: tuple[int, int]
  centernet_hidden: int = 256
  occupancy_hidden: int = 64

  @nn.compact
  def __call__(self, patches: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    for name in self.heads:
      get(name)
    patches = patches.astype(jnp.float32)
    out = {}
    for name, head in HEADS.items():
      if name in self.heads:
        module = head.module(self, name)
        out[name] = module(patches, train=train) if head.batch_norm else module(patches)
    return out


class ProbeEvaluator:
  """Accumulates one validation pass: per-example losses and every head's metric."""

  def __init__(self, heads, spec: Spec, probe_cfg, num_figure_frames: int = 0):
    self.metrics = {name: get(name).metric(spec, probe_cfg) for name in HEADS if name in heads}
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
    rows = np.flatnonzero(valid)
    frames = []
    for b in rows:
      if len(self.figure_frames) < self.num_figure_frames:
        self.figure_frames.append({'rgb': batch['rgb'][b], 'intrinsics': batch['intrinsics'][b]})
        frames.append(self.figure_frames[-1])
      else:
        frames.append(None)
    for metric in self.metrics.values():
      metric.update(preds, batch, rows, frames)

  def result(self) -> dict[str, Any]:
    """Flat metrics: 'loss' and 'loss/<part>' (mean per frame), then per head: mAP_XY, ADE_XY,
    mAP_XZ, AP_XY/<class>, ...; mAP50, AP50/<class>; seg_mIoU, IoU/<class>; depth_MAE (m);
    occupancy_IoU ('any object') and occupancy_IoU/<class>. AP and IoU are fractions."""
    if not self.count:
      raise RuntimeError('the validation pass saw no frames')
    out = {('loss' if k == 'loss' else f'loss/{k}'): v / self.count
           for k, v in self.loss_sums.items()}
    for metric in self.metrics.values():
      out.update(metric.result())
    return out


# ----------------------------------------------------------------------------------- metrics


class _DetectionMetric:
  def __init__(self, head: _CenterNet, accumulator, spec, probe_cfg):
    self.head, self.accumulator, self.spec, self.cfg = head, accumulator, spec, probe_cfg

  def update(self, preds, batch, rows, frames) -> None:
    p, d, hw = self.head.prefix, self.head.dim, self.spec.geometry.image_hw
    for b, frame in zip(rows, frames):
      maps = [preds[f'{p}_{k}'][b] for k in ('heatmap', *self.head.regression)]
      if d == '3d':
        decoded = centernet.decode_3d(*maps, batch['intrinsics'][b], hw, k=self.cfg.max_detections,
                                      score_threshold=self.cfg.score_threshold)
      else:
        decoded = centernet.decode_2d(*maps, hw, k=self.cfg.max_detections,
                                      score_threshold=self.cfg.score_threshold)
      gt = batch[f'gt{d}_mask'][b] > 0
      gt_boxes, gt_classes = batch[f'gt{d}_boxes'][b][gt], batch[f'gt{d}_classes'][b][gt]
      self.accumulator.update(*decoded, gt_boxes, gt_classes)
      if frame is not None:
        frame.update({f'pred_boxes{d}': decoded[0], f'pred_scores{d}': decoded[1],
                      f'pred_classes{d}': decoded[2], f'gt_boxes{d}': gt_boxes,
                      f'gt_classes{d}': gt_classes})

  def result(self) -> dict[str, Any]:
    return self.accumulator.summary()


def _figure_maps(key, preds, batch, rows, frames) -> None:
  for b, frame in zip(rows, frames):
    if frame is not None:
      frame[f'pred_{key}'], frame[f'gt_{key}'] = preds[key][b], batch[key][b]


class _SegMetric:
  def __init__(self, classes):
    self.classes = tuple(classes)
    self.metric = metrics.SegmentationMetric(max(len(self.classes), 1))

  def update(self, preds, batch, rows, frames) -> None:
    self.metric.update(preds['seg'][rows], batch['seg'][rows])
    _figure_maps('seg', preds, batch, rows, frames)

  def result(self):
    seg = self.metric.result()
    return {'seg_mIoU': seg['mIoU'],
            **{f'IoU/{n}': float(v) for n, v in zip(self.classes, seg['IoU'])}}


class _DepthMetric:
  def __init__(self):
    self.metric = metrics.DepthMAE()

  def update(self, preds, batch, rows, frames) -> None:
    self.metric.update(preds['depth'][rows], batch['depth'][rows])
    _figure_maps('depth', preds, batch, rows, frames)

  def result(self):
    return {'depth_MAE': self.metric.result()}


class _OccupancyMetric:
  def __init__(self, classes):
    self.classes = tuple(classes)
    self.inter = np.zeros(len(self.classes) + 1)
    self.union = np.zeros(len(self.classes) + 1)

  def update(self, preds, batch, rows, frames) -> None:
    pred, target = preds['occupancy'][rows] > 0.5, batch['occupancy'][rows] > 0.5
    self.inter += np.sum(pred & target, axis=(0, 1, 2))
    self.union += np.sum(pred | target, axis=(0, 1, 2))
    _figure_maps('occupancy', preds, batch, rows, frames)

  def result(self):
    # Neutral empty-union policy: a channel nobody (target or prediction) occupied over the
    # split has no IoU and is left out, neither 0 nor 1.
    iou = np.divide(self.inter, self.union, out=np.full(self.union.shape, np.nan),
                    where=self.union > 0)
    return {'occupancy_IoU': float(iou[-1]),
            **{f'occupancy_IoU/{n}': float(v) for n, v in zip(self.classes, iou[:-1])}}
