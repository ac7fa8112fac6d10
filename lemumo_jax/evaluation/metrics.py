"""Probe metrics of paper S3 ("Metric definitions and correspondence"), in float64 numpy.

  center_distance_ap     3D detection: center-distance AP at 0.5/1/2/4 m -> mAP XY, mAP XZ, ADE
  coco_ap                2D detection: COCO AP at one IoU threshold (0.5 -> mAP50, Car mAP50)
  SegmentationMetric     mIoU from a confusion matrix accumulated over frames
  DepthMAE               mean absolute depth error over the valid pixels of all frames
  FeatureVariance        how a frozen patch grid's variance splits into frame-global, position
                         and local content (why a probe can or cannot read objects off it)
  Detection3DAccumulator, Detection2DAccumulator   streaming front-ends over validation batches

Frames are dicts. Predictions: 'boxes' [P, 7] (3D, schema convention) or [P, 4] (2D, x1 y1 x2 y2
pixels), 'scores' [P], 'classes' [P] int. Ground truth: 'boxes' [G, 7] or [G, 4], 'classes' [G].

One module of ~500 lines on purpose: every metric definition of S3 side by side, where they
can be read against the paper's table of definitions. No reference library is imported here; tests/test_metrics.py checks the detection numbers
against nuscenes-devkit (`accumulate` + `calc_ap` + `calc_tp`) and pycocotools (COCOeval).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lemumo_jax.data.schema import CLASSES_3D, IGNORE_LABEL

# Camera frame (schema.py): x right, y down, z forward. The paper matches in the LiDAR/ego frame
# (x forward, y left, z up): "XY" is the ground plane and "XZ" the vertical plane through the
# forward axis. In camera axes the ground plane is (x, z) and the forward-up plane is (z, y).
# XZ must contain the forward (depth) axis: the paper's XZ mAP is 3-5x lower than its XY mAP
# in every reported row, which a lateral-height plane (free of the depth error that dominates
# a monocular probe) could not produce.
PLANES = {'bev': (0, 2), 'elevation': (2, 1)}
PLANE_REPORT_NAMES = {'bev': 'XY', 'elevation': 'XZ'}
DISTANCE_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
NUM_RECALL_POINTS = 101  # nuScenes and COCO both sample recall at 0, 0.01, ..., 1


def _frame(frame: Mapping[str, Any], box_dim: int, scored: bool, where: str):
  """Validated float64/int arrays (boxes [N, box_dim], scores [N] or None, classes [N])."""
  keys = ('boxes', 'scores', 'classes') if scored else ('boxes', 'classes')
  missing = [k for k in keys if k not in frame]
  if missing:
    raise KeyError(f'{where}: missing keys {missing} (has {sorted(frame)})')
  boxes = np.asarray(frame['boxes'], np.float64)
  if boxes.size == 0:  # [] or [0] from a frame without objects
    boxes = boxes.reshape(0, box_dim)
  if boxes.ndim != 2 or boxes.shape[1] != box_dim:
    raise ValueError(f"{where}: 'boxes' has shape {boxes.shape}, expected [N, {box_dim}]")
  classes = np.asarray(frame['classes']).reshape(-1).astype(np.int64)
  scores = np.asarray(frame['scores'], np.float64).reshape(-1) if scored else None
  if classes.shape[0] != boxes.shape[0] or (scored and scores.shape[0] != boxes.shape[0]):
    raise ValueError(f'{where}: {boxes.shape[0]} boxes but {classes.shape[0]} classes'
                     + (f' and {scores.shape[0]} scores' if scored else ''))
  return boxes, scores, classes


def _check_frames(preds: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]],
                  box_dim: int, num_classes: int) -> list:
  if len(preds) != len(gts):
    raise ValueError(f'{len(preds)} prediction frames but {len(gts)} ground-truth frames')
  frames = []
  for i, (pred, gt) in enumerate(zip(preds, gts)):
    pb, ps, pc = _frame(pred, box_dim, True, f'preds[{i}]')
    gb, _, gc = _frame(gt, box_dim, False, f'gts[{i}]')
    for name, cls in (('preds', pc), ('gts', gc)):
      if cls.size and (cls.min() < 0 or cls.max() >= num_classes):
        raise ValueError(f"{name}[{i}]: 'classes' must lie in [0, {num_classes}), "
                         f'got {np.unique(cls)}')
    frames.append((pb, ps, pc, gb, gc))
  return frames


# ----------------------------------------------------------------------------------------------
# 3D: center-distance AP (nuscenes-devkit eval.detection.algo semantics).


def _greedy_center_match(dist: np.ndarray, scores: np.ndarray,
                         threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """Matches one frame's predictions of one class to its ground truth.

  dist [P, G] centre distances. Predictions go by descending score, ties by descending index
  (the devkit sorts (score, index) pairs and reverses); each takes the nearest unmatched GT
  (first on ties) when that distance is strictly below `threshold`.
  Returns (tp [P] bool, matched distance [P], nan where unmatched).
  """
  num_pred, num_gt = dist.shape
  tp = np.zeros(num_pred, bool)
  matched = np.full(num_pred, np.nan)
  if num_gt == 0:
    return tp, matched
  taken = np.zeros(num_gt, bool)
  for p in np.lexsort((np.arange(num_pred), scores))[::-1]:
    candidates = np.where(taken, np.inf, dist[p])
    j = int(np.argmin(candidates))
    if candidates[j] < threshold:
      taken[j] = True
      tp[p] = True
      matched[p] = candidates[j]
  return tp, matched


def _precision_curve(scores: np.ndarray, tp: np.ndarray, matched: np.ndarray,
                     num_gt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The devkit's interpolated curves at recall 0, 0.01, ..., 1 for one class and threshold.

  scores, tp, matched [P] over the whole dataset in frame order. Returns (precision [101],
  confidence [101], cumulative-mean TP distance [101] resampled at those confidences).
  Precision is linearly interpolated (np.interp), not an envelope, exactly as the devkit does.
  """
  recall_points = np.linspace(0, 1, NUM_RECALL_POINTS)
  if not tp.any():  # the devkit's DetectionMetricData.no_predictions()
    zeros = np.zeros(NUM_RECALL_POINTS)
    return zeros, zeros, np.ones(NUM_RECALL_POINTS)
  order = np.lexsort((np.arange(scores.size), scores))[::-1]
  tp, scores, matched = tp[order], scores[order], matched[order]
  tp_sum = np.cumsum(tp).astype(float)
  fp_sum = np.cumsum(~tp).astype(float)
  precision = np.interp(recall_points, tp_sum / float(num_gt), tp_sum / (fp_sum + tp_sum),
                        right=0)
  confidence = np.interp(recall_points, tp_sum / float(num_gt), scores, right=0)
  distances = matched[tp]
  running_mean = np.cumsum(distances) / np.arange(1, distances.size + 1)
  # np.interp needs increasing x: walk the confidences from low to high.
  trans_err = np.interp(confidence[::-1], scores[tp][::-1], running_mean[::-1])[::-1]
  return precision, confidence, trans_err


def _average_precision(precision: np.ndarray, min_recall: float, min_precision: float) -> float:
  """The devkit's calc_ap: drop recall <= min_recall, subtract min_precision, renormalise."""
  clipped = precision[round(100 * min_recall) + 1:] - min_precision
  clipped[clipped < 0] = 0
  return float(np.mean(clipped)) / (1.0 - min_precision)


def _tp_error(confidence: np.ndarray, error: np.ndarray, min_recall: float) -> float:
  """The devkit's calc_tp, mean error over recall in (min_recall, max achieved recall].

  Where max recall never exceeds min_recall the devkit returns 1.0 (a unitless placeholder);
  in metres that would read as a real error, so nan is returned instead.
  """
  first = round(100 * min_recall) + 1
  nonzero = np.nonzero(confidence)[0]
  last = nonzero[-1] if nonzero.size else 0
  if last < first:
    return float('nan')
  return float(np.mean(error[first:last + 1]))


def _nanmean(values) -> float:
  values = np.asarray(list(values), np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else float('nan')


def center_distance_ap(preds: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]],
                       classes: Sequence[str] = CLASSES_3D,
                       thresholds: Sequence[float] = DISTANCE_THRESHOLDS, plane: str = 'bev',
                       min_recall: float = 0.1, min_precision: float = 0.1,
                       tp_threshold: float = 2.0) -> dict[str, Any]:
  """3D detection AP under center-distance matching (paper S3), nuScenes-devkit semantics.

  For each class and threshold: predictions of the whole dataset are matched greedily by
  descending score, each to the nearest still-unmatched GT of its frame and class when the
  distance is < threshold (`accumulate`); AP is the devkit's `calc_ap` on the 101-point
  interpolated precision (recall <= min_recall dropped, precision floored at min_precision and
  renormalised). A class's AP is the mean over thresholds; mAP the mean over classes.

  Distances are measured in one plane of the camera frame (x right, y down, z forward):
    plane='bev'        (x, z): the ground plane, reported as "mAP XY" (ego frame XY)
    plane='elevation'  (z, y): the forward-up plane, reported as "mAP XZ" (ego frame XZ)

  ADE per class is the devkit's trans_err at `tp_threshold` (its `calc_tp`): the running mean
  of matched-pair distances, read off at each recall in (min_recall, max recall] and averaged;
  nan where recall never exceeds min_recall (the devkit writes 1.0 there).

  Classes without any ground truth get AP nan and are left out of the mean (the devkit would
  score them 0): a class absent from the split cannot be evaluated.

  Args:
    preds: per frame {'boxes' [P, 7], 'scores' [P], 'classes' [P]}.
    gts: per frame {'boxes' [G, 7], 'classes' [G]}; same length as preds.
    classes: class names; class index i in the arrays is classes[i].
  Returns:
    {'mAP': float, 'AP': {name: float}, 'AP_per_threshold': {name: {threshold: float}},
     'ADE': {name: float}, 'mADE': float, 'num_gt': {name: int}}
  """
  if plane not in PLANES:
    raise ValueError(f'plane must be one of {sorted(PLANES)}, got {plane!r}')
  axes = list(PLANES[plane])
  frames = _check_frames(preds, gts, 7, len(classes))
  result: dict[str, Any] = {'AP': {}, 'AP_per_threshold': {}, 'ADE': {}, 'num_gt': {}}
  for c, name in enumerate(classes):
    per_frame = []  # (scores [P], dist [P, G]) of this class
    for pb, ps, pc, gb, gc in frames:
      p_xy, g_xy = pb[pc == c][:, axes], gb[gc == c][:, axes]
      diff = p_xy[:, None, :] - g_xy[None, :, :]
      per_frame.append((ps[pc == c], np.sqrt(np.sum(diff * diff, -1))))
    num_gt = sum(d.shape[1] for _, d in per_frame)
    result['num_gt'][name] = num_gt
    if num_gt == 0:
      result['AP_per_threshold'][name] = {float(t): float('nan') for t in thresholds}
      result['AP'][name] = result['ADE'][name] = float('nan')
      continue
    scores = np.concatenate([s for s, _ in per_frame])
    curves = {}
    for threshold in dict.fromkeys((*thresholds, tp_threshold)):
      matches = [_greedy_center_match(d, s, threshold) for s, d in per_frame]
      tp = np.concatenate([m[0] for m in matches])
      matched = np.concatenate([m[1] for m in matches])
      curves[threshold] = _precision_curve(scores, tp, matched, num_gt)
    per_threshold = {float(t): _average_precision(curves[t][0], min_recall, min_precision)
                     for t in thresholds}
    result['AP_per_threshold'][name] = per_threshold
    result['AP'][name] = float(np.mean(list(per_threshold.values())))
    _, confidence, trans_err = curves[tp_threshold]
    result['ADE'][name] = _tp_error(confidence, trans_err, min_recall)
  result['mAP'] = _nanmean(result['AP'].values())
  result['mADE'] = _nanmean(result['ADE'].values())
  return result


# ----------------------------------------------------------------------------------------------
# 2D: COCO AP (pycocotools COCOeval semantics, area 'all', no crowd annotations).


def _coco_iou(dets_xywh: np.ndarray, gts_xywh: np.ndarray) -> np.ndarray:
  """[D, G] IoU with pycocotools' bbIou arithmetic (x + w edges, areas w * h, no +1)."""
  d, g = dets_xywh[:, None, :], gts_xywh[None, :, :]
  iw = np.minimum(d[..., 0] + d[..., 2], g[..., 0] + g[..., 2]) - np.maximum(d[..., 0], g[..., 0])
  ih = np.minimum(d[..., 1] + d[..., 3], g[..., 1] + g[..., 3]) - np.maximum(d[..., 1], g[..., 1])
  inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
  union = d[..., 2] * d[..., 3] + g[..., 2] * g[..., 3] - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _coco_match_image(ious: np.ndarray, threshold: float) -> np.ndarray:
  """ious [D, G] with detections in descending-score order -> tp [D] bool.

  Each detection takes the unmatched GT of highest IoU >= threshold; on equal IoU the later
  GT wins, as in COCOeval.evaluateImg's loop.
  """
  num_det, num_gt = ious.shape
  tp = np.zeros(num_det, bool)
  taken = np.zeros(num_gt, bool)
  floor = min(threshold, 1 - 1e-10)
  for i in range(num_det if num_gt else 0):
    candidates = np.where(taken, -np.inf, ious[i])
    best = candidates.max()
    if best >= floor:
      j = np.flatnonzero(candidates == best)[-1]
      taken[j] = True
      tp[i] = True
  return tp


def coco_ap(preds: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]],
            classes: Sequence[str], iou_threshold: float = 0.5,
            max_dets: int = 100) -> dict[str, Any]:
  """COCO-style AP at one IoU threshold (paper's FLIR mAP50 / Car mAP50 at 0.5).

  Follows COCOeval with iouThrs=[iou_threshold], areaRng 'all', maxDets max_dets: per frame
  and class the detections are ranked by score (stable), the top max_dets kept and matched
  greedily to GT; over the dataset they are re-ranked (stable, frame order) and precision is
  made monotone (envelope) and sampled at 101 recall points (0 past the max recall).
  A class without GT gets nan (COCOeval's -1) and is left out of the mean.

  Args:
    preds: per frame {'boxes' [P, 4] x1 y1 x2 y2, 'scores' [P], 'classes' [P]}.
    gts: per frame {'boxes' [G, 4], 'classes' [G]}.
  Returns: {'mAP': float, 'AP': {name: float}, 'num_gt': {name: int}}.
  """
  frames = _check_frames(preds, gts, 4, len(classes))
  for i, (_, _, _, gb, _) in enumerate(frames):
    if np.any(gb[:, 2:] < gb[:, :2]):
      raise ValueError(f"gts[{i}]: 'boxes' must be x1 y1 x2 y2 with x2 >= x1, y2 >= y1")
  recall_points = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
  to_xywh = lambda b: np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1)
  result: dict[str, Any] = {'AP': {}, 'num_gt': {}}
  for c, name in enumerate(classes):
    scores, tps, ignored, num_gt = [], [], [], 0
    for pb, ps, pc, gb, gc in frames:
      det_scores = ps[pc == c]
      order = np.argsort(-det_scores, kind='mergesort')[:max_dets]
      dets, det_scores = to_xywh(pb[pc == c][order]), det_scores[order]
      gt_boxes = to_xywh(gb[gc == c])
      num_gt += gt_boxes.shape[0]
      scores.append(det_scores)
      tps.append(_coco_match_image(_coco_iou(dets, gt_boxes), iou_threshold))
      # COCOeval ignores unmatched detections whose area w * h falls outside areaRng 'all'
      # [0, 1e10], e.g. an inverted box (x2 < x1).
      area = dets[:, 2] * dets[:, 3]
      ignored.append(~tps[-1] & ((area < 0) | (area > 1e10)))
    result['num_gt'][name] = num_gt
    if num_gt == 0:
      result['AP'][name] = float('nan')
      continue
    order = np.argsort(-np.concatenate(scores), kind='mergesort')
    tp, ignore = np.concatenate(tps)[order], np.concatenate(ignored)[order]
    tp_sum = np.cumsum(tp & ~ignore).astype(float)
    fp_sum = np.cumsum(~tp & ~ignore).astype(float)
    recall = tp_sum / num_gt
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    # Recall points beyond the maximum recall reached keep precision 0.
    index = np.searchsorted(recall, recall_points, side='left')
    sampled = np.zeros(recall_points.size)
    sampled[index < tp.size] = precision[index[index < tp.size]]
    result['AP'][name] = float(np.mean(sampled))
  result['mAP'] = _nanmean(result['AP'].values())
  return result


# ----------------------------------------------------------------------------------------------
# Streaming accumulators.


class _DetectionFrames:
  """Keeps one dict per validation frame; the subclasses score them all at the end."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.preds: list[dict[str, np.ndarray]] = []
    self.gts: list[dict[str, np.ndarray]] = []

  def update(self, pred_boxes, pred_scores, pred_classes, gt_boxes, gt_classes) -> None:
    """One frame: pred_boxes [P, 7] (3D) or [P, 4] (2D), pred_scores [P], pred_classes [P];
    gt_boxes [G, 7] or [G, 4], gt_classes [G]. Validated when scored."""
    self.preds.append({'boxes': np.asarray(pred_boxes), 'scores': np.asarray(pred_scores),
                       'classes': np.asarray(pred_classes)})
    self.gts.append({'boxes': np.asarray(gt_boxes), 'classes': np.asarray(gt_classes)})


class Detection3DAccumulator(_DetectionFrames):
  """Frames in, `result(plane)` = center_distance_ap out; `summary()` gives the report keys."""

  def __init__(self, classes: Sequence[str] = CLASSES_3D,
               thresholds: Sequence[float] = DISTANCE_THRESHOLDS, **ap_kwargs):
    self.classes, self.thresholds, self.ap_kwargs = tuple(classes), tuple(thresholds), ap_kwargs
    super().__init__()

  def result(self, plane: str = 'bev') -> dict[str, Any]:
    return center_distance_ap(self.preds, self.gts, self.classes, self.thresholds, plane,
                              **self.ap_kwargs)

  def summary(self) -> dict[str, float]:
    """{'mAP_XY', 'ADE_XY', 'AP_XY/<class>', ... and the same for XZ}."""
    out = {}
    for plane, tag in PLANE_REPORT_NAMES.items():
      res = self.result(plane)
      out[f'mAP_{tag}'] = res['mAP']
      out[f'ADE_{tag}'] = res['mADE']
      out.update({f'AP_{tag}/{name}': ap for name, ap in res['AP'].items()})
    return out


class Detection2DAccumulator(_DetectionFrames):
  """Frames in, `result()` = coco_ap out; `summary()` gives 'mAP50' and 'AP50/<class>'."""

  def __init__(self, classes: Sequence[str], iou_threshold: float = 0.5, max_dets: int = 100):
    self.classes, self.iou_threshold, self.max_dets = tuple(classes), iou_threshold, max_dets
    super().__init__()

  def result(self) -> dict[str, Any]:
    return coco_ap(self.preds, self.gts, self.classes, self.iou_threshold, self.max_dets)

  def summary(self) -> dict[str, float]:
    tag = f'{round(100 * self.iou_threshold)}'
    res = self.result()
    return {f'mAP{tag}': res['mAP'], **{f'AP{tag}/{n}': ap for n, ap in res['AP'].items()}}


class SegmentationMetric:
  """mIoU from a [C, C] confusion matrix (rows = target, columns = prediction) over all frames.

  Pixels labelled `ignore_label` are skipped. IoU_c = TP / (TP + FP + FN) from the summed
  counts (not a mean of per-frame IoUs). A class absent from both target and prediction over
  the whole split has 0/0 IoU: it is reported nan and left out of the mean. A class present
  in the predictions only scores 0 and counts.
  """

  def __init__(self, num_classes: int, ignore_label: int = IGNORE_LABEL):
    self.num_classes, self.ignore_label = num_classes, ignore_label
    self.reset()

  def reset(self) -> None:
    self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

  def update(self, pred: np.ndarray, target: np.ndarray) -> None:
    """pred, target: integer labels of one shape, e.g. [B, H, W] (argmax the logits first)."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
      raise ValueError(f'segmentation pred shape {pred.shape} != target shape {target.shape}')
    keep = target != self.ignore_label
    pred, target = pred[keep].astype(np.int64), target[keep].astype(np.int64)
    for name, labels in (('pred', pred), ('target', target)):
      if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
        raise ValueError(f'segmentation {name} labels must lie in [0, {self.num_classes}) or be '
                         f'{self.ignore_label}, got {np.unique(labels)}')
    counts = np.bincount(target * self.num_classes + pred, minlength=self.num_classes**2)
    self.confusion += counts.reshape(self.num_classes, self.num_classes)

  def result(self) -> dict[str, Any]:
    """{'mIoU': float, 'IoU': [C] float (nan = absent), 'pixel_accuracy': float}."""
    conf = self.confusion.astype(np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = np.divide(tp, union, out=np.full_like(tp, np.nan), where=union > 0)
    total = conf.sum()
    return {'mIoU': _nanmean(iou), 'IoU': iou,
            'pixel_accuracy': float(tp.sum() / total) if total else float('nan')}


class DepthMAE:
  """Mean absolute depth error (metres) over the valid pixels (target > 0) of all frames.

  Accumulated as sum |pred - target| / pixel count over the whole split, so every valid pixel
  weighs the same; a mean of per-frame means would over-weight sparsely labelled frames.
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.abs_error_sum, self.count = 0.0, 0

  def update(self, pred: np.ndarray, target: np.ndarray) -> None:
    """pred, target: depth in metres of one shape, e.g. [B, H, W]; target 0 = no label."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if pred.shape != target.shape:
      raise ValueError(f'depth pred shape {pred.shape} != target shape {target.shape}')
    valid = np.isfinite(target) & (target > 0)
    self.abs_error_sum += float(np.abs(pred[valid] - target[valid]).sum())
    self.count += int(valid.sum())

  def result(self) -> float:
    return self.abs_error_sum / self.count if self.count else float('nan')


class FeatureVariance:
  """Two-way decomposition of a patch grid's variance over the frames of a split.

  x[f, p, d] is channel d of the token at grid position p of frame f. Summed over channels, its
  total variance over all (f, p) splits exactly (a balanced two-way layout) into
    frame     the variance across frames of each frame's mean token: what every token of a frame
              shares (scene-level content: brightness, weather, layout)
    position  the variance across positions of the mean token at each position over frames
              (positional embeddings, a fixed horizon row)
    local     the rest, x - frame mean - position mean + grand mean: content that differs
              between the tokens of one frame, which is where objects live.
  `result()` gives each as a fraction of the total. A grid whose `frame` share is near 1 has
  tokens that all say the same thing about their frame: a patch probe must dig the local part
  out of a small residual. Moments accumulate in float64 per batch.
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.frames = 0
    self.sum, self.sum_sq = None, None          # over every (frame, position): [D]
    self.frame_mean_sum_sq = None               # sum over frames of frame-mean^2: [D]
    self.position_sum = None                    # [P, D] summed over frames

  def update(self, patches: np.ndarray, valid: np.ndarray | None = None) -> None:
    """patches [B, h, w, D] (or [B, P, D]); valid [B] (0 = padding, skipped)."""
    x = np.asarray(patches, np.float64)
    if x.ndim == 4:
      x = x.reshape(x.shape[0], -1, x.shape[-1])
    if x.ndim != 3:
      raise ValueError(f'patches must be [B, h, w, D] or [B, P, D], got shape {np.shape(patches)}')
    if valid is not None:
      x = x[np.asarray(valid).reshape(-1) > 0]
    self.update_moments(x.shape[0], x.sum((0, 1)), np.square(x).sum((0, 1)),
                        np.square(x.mean(1)).sum(0), x.sum(0))

  def update_moments(self, frames, total_sum, total_sum_sq, frame_mean_sum_sq,
                     position_sum) -> None:
    """The same from one batch's moments (as the probe stage reduces them on the device):
    frames (count), total_sum [D], total_sum_sq [D], frame_mean_sum_sq [D], position_sum [P, D]."""
    position_sum = np.asarray(position_sum, np.float64)
    if self.position_sum is None:
      self.sum, self.sum_sq = np.zeros(position_sum.shape[-1]), np.zeros(position_sum.shape[-1])
      self.frame_mean_sum_sq, self.position_sum = (np.zeros(position_sum.shape[-1]),
                                                   np.zeros(position_sum.shape))
    elif position_sum.shape != self.position_sum.shape:
      raise ValueError(f'patches [P, D] = {position_sum.shape} differ from the earlier '
                       f'{self.position_sum.shape}')
    self.frames += int(frames)
    self.sum += np.asarray(total_sum, np.float64)
    self.sum_sq += np.asarray(total_sum_sq, np.float64)
    self.frame_mean_sum_sq += np.asarray(frame_mean_sum_sq, np.float64)
    self.position_sum += position_sum

  def result(self) -> dict[str, float]:
    """{'frame', 'position', 'local'}: fractions of the total variance (they sum to 1)."""
    if not self.frames:
      raise RuntimeError('FeatureVariance saw no frames')
    positions = self.position_sum.shape[0]
    grand = self.sum / (self.frames * positions)
    total = np.sum(self.sum_sq / (self.frames * positions) - grand**2)
    frame = np.sum(self.frame_mean_sum_sq / self.frames - grand**2)
    position = np.sum(np.mean(np.square(self.position_sum / self.frames), 0) - grand**2)
    if total <= 0:
      return {'frame': float('nan'), 'position': float('nan'), 'local': float('nan')}
    return {'frame': float(frame / total), 'position': float(position / total),
            'local': float(1.0 - (frame + position) / total)}
