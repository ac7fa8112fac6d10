"""Probe metrics vs nuscenes-devkit, pycocotools and direct numpy."""

import contextlib
import io

from nuscenes.eval.common.config import config_factory
from nuscenes.eval.common.data_classes import EvalBoxes
from nuscenes.eval.common.utils import center_distance
from nuscenes.eval.detection.algo import accumulate, calc_ap, calc_tp
from nuscenes.eval.detection.data_classes import DetectionBox
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import pytest

from lemumo_jax.evaluation import metrics

# The devkit only accepts nuScenes class names; cyclist plays bicycle.
DEVKIT_NAMES = {'car': 'car', 'pedestrian': 'pedestrian', 'cyclist': 'bicycle'}


def _random_scene(seed, num_frames=14, num_classes=3, box_dim=7, score_levels=None):
  """Frames of GT and noisy predictions (jittered GT copies plus clutter), per-frame dicts."""
  rng = np.random.default_rng(seed)
  preds, gts = [], []
  for f in range(num_frames):
    num_gt = rng.integers(0, 7) if f % 5 else 0  # some frames without any GT
    if box_dim == 7:
      gt = np.concatenate([rng.uniform([-15, -1, 3], [15, 2, 50], (num_gt, 3)),
                           rng.uniform([0.5, 0.5, 1.0], [5, 2, 2], (num_gt, 3)),
                           rng.uniform(-np.pi, np.pi, (num_gt, 1))], 1)
      noise_scale = rng.choice([0.2, 0.8, 2.0, 5.0], (num_gt, 1)) * np.array([1, 0.5, 1.5])
      jitter = np.concatenate([rng.normal(0, 1, (num_gt, 3)) * noise_scale,
                               np.zeros((num_gt, 4))], 1)
      num_clutter = rng.integers(0, 5)
      clutter = np.concatenate([rng.uniform([-15, -1, 3], [15, 2, 50], (num_clutter, 3)),
                                np.ones((num_clutter, 3)), np.zeros((num_clutter, 1))], 1)
    else:
      xy = rng.uniform(0, 200, (num_gt, 2))
      gt = np.concatenate([xy, xy + rng.uniform(5, 60, (num_gt, 2))], 1)
      jitter = rng.normal(0, 1, (num_gt, 4)) * rng.choice([1.0, 4.0, 10.0], (num_gt, 1))
      num_clutter = rng.integers(0, 5)
      xy = rng.uniform(0, 200, (num_clutter, 2))
      clutter = np.concatenate([xy, xy + rng.uniform(5, 60, (num_clutter, 2))], 1)
    gt_cls = rng.integers(0, num_classes, num_gt)
    keep = rng.random(num_gt) < 0.8  # missed detections
    dup = rng.random(num_gt) < 0.3   # duplicate detections
    pred = np.concatenate([(gt + jitter)[keep], (gt + 0.5 * jitter)[dup], clutter])
    pred_cls = np.concatenate([gt_cls[keep], gt_cls[dup], rng.integers(0, num_classes,
                                                                       num_clutter)])
    # A few wrong labels.
    flip = rng.random(pred_cls.size) < 0.1
    pred_cls = np.where(flip, (pred_cls + 1) % num_classes, pred_cls)
    scores = rng.random(pred.shape[0])
    if score_levels:  # many exact ties exercise the tie-breaking order
      scores = np.round(scores * score_levels) / score_levels
    preds.append({'boxes': pred, 'scores': scores, 'classes': pred_cls})
    gts.append({'boxes': gt, 'classes': gt_cls})
  return preds, gts


def _devkit_boxes(frames, plane, scored):
  # center_distance reads translation[:2]: put the plane's two axes first.
  order = {'bev': (0, 2, 1), 'elevation': (2, 1, 0)}[plane]
  boxes = EvalBoxes()
  for i, frame in enumerate(frames):
    token = f'frame{i}'
    items = []
    for j, box in enumerate(frame['boxes']):
      items.append(DetectionBox(
          sample_token=token, translation=tuple(float(box[a]) for a in order),
          size=tuple(float(v) for v in box[3:6]), rotation=(1.0, 0.0, 0.0, 0.0),
          detection_name=DEVKIT_NAMES[metrics.CLASSES_3D[frame['classes'][j]]],
          detection_score=float(frame['scores'][j]) if scored else -1.0))
    boxes.add_boxes(token, items)
  return boxes


@pytest.mark.parametrize('plane,seed,score_levels', [('bev', 0, None), ('elevation', 1, None),
                                                     ('bev', 2, 3), ('elevation', 3, 2)])
def test_center_distance_ap_matches_devkit(plane, seed, score_levels):
  config = config_factory('detection_cvpr_2019')
  assert tuple(config.dist_ths) == metrics.DISTANCE_THRESHOLDS
  preds, gts = _random_scene(seed, score_levels=score_levels)
  ours = metrics.center_distance_ap(preds, gts, plane=plane, min_recall=config.min_recall,
                                    min_precision=config.min_precision,
                                    tp_threshold=config.dist_th_tp)
  pred_boxes = _devkit_boxes(preds, plane, True)
  gt_boxes = _devkit_boxes(gts, plane, False)
  checked_ade = 0
  for name in metrics.CLASSES_3D:
    assert ours['num_gt'][name] > 0
    aps = []
    for threshold in config.dist_ths:
      md = accumulate(gt_boxes, pred_boxes, DEVKIT_NAMES[name], center_distance, threshold)
      ap = calc_ap(md, config.min_recall, config.min_precision)
      aps.append(ap)
      assert ours['AP_per_threshold'][name][threshold] == pytest.approx(ap, abs=1e-6)
      if threshold == config.dist_th_tp:
        trans_err = calc_tp(md, config.min_recall, 'trans_err')
        if md.max_recall_ind >= round(100 * config.min_recall) + 1:
          assert ours['ADE'][name] == pytest.approx(trans_err, abs=1e-6)
          checked_ade += 1
        else:
          assert np.isnan(ours['ADE'][name])
    assert ours['AP'][name] == pytest.approx(np.mean(aps), abs=1e-6)
  assert checked_ade >= 2
  assert ours['mAP'] == pytest.approx(np.mean(list(ours['AP'].values())), abs=1e-12)
  # The scene is hard enough that AP separates thresholds.
  per_t = ours['AP_per_threshold']['car']
  assert per_t[0.5] < per_t[4.0]


def test_center_distance_ap_edge_cases():
  preds, gts = _random_scene(3)
  perfect = [{'boxes': g['boxes'], 'scores': np.linspace(1, 0.5, len(g['classes'])),
              'classes': g['classes']} for g in gts]
  res = metrics.center_distance_ap(perfect, gts)
  assert res['mAP'] == pytest.approx(1.0)
  assert all(ade == pytest.approx(0.0) for ade in res['ADE'].values())
  # No predictions at all: AP 0, ADE undefined.
  empty = [{'boxes': np.zeros((0, 7)), 'scores': np.zeros(0), 'classes': np.zeros(0, int)}
           for _ in gts]
  res = metrics.center_distance_ap(empty, gts)
  assert res['mAP'] == 0.0 and np.isnan(res['mADE'])
  # A class without GT is nan and drops out of the mean; predictions of it do no harm.
  no_cyclist = [{'boxes': g['boxes'][g['classes'] != 2], 'classes': g['classes'][
      g['classes'] != 2]} for g in gts]
  res = metrics.center_distance_ap(perfect, no_cyclist)
  assert np.isnan(res['AP']['cyclist']) and res['num_gt']['cyclist'] == 0
  assert res['mAP'] == pytest.approx(1.0)
  # Plane choice: a pure height error matters for elevation matching only.
  shifted = [dict(p, boxes=p['boxes'] + np.array([0, 3.0, 0, 0, 0, 0, 0])) for p in perfect]
  assert metrics.center_distance_ap(shifted, gts, plane='bev')['mAP'] == pytest.approx(1.0)
  assert metrics.center_distance_ap(shifted, gts, plane='elevation')['AP_per_threshold'][
      'car'][2.0] == 0.0
  with pytest.raises(ValueError, match='plane'):
    metrics.center_distance_ap(perfect, gts, plane='xy')
  with pytest.raises(ValueError, match=r'preds\[0\]'):
    metrics.center_distance_ap([{'boxes': np.zeros((2, 6)), 'scores': np.zeros(2),
                                 'classes': np.zeros(2, int)}], gts[:1])


def _coco_eval(preds, gts, num_classes, max_dets):
  xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
  images, annotations, results = [], [], []
  for i, (pred, gt) in enumerate(zip(preds, gts)):
    images.append({'id': i + 1, 'width': 300, 'height': 300})
    for box, cls in zip(gt['boxes'], gt['classes']):
      bbox = xywh(box)
      annotations.append({'id': len(annotations) + 1, 'image_id': i + 1,
                          'category_id': int(cls) + 1, 'bbox': bbox,
                          'area': bbox[2] * bbox[3], 'iscrowd': 0})
    for box, score, cls in zip(pred['boxes'], pred['scores'], pred['classes']):
      results.append({'image_id': i + 1, 'category_id': int(cls) + 1, 'bbox': xywh(box),
                      'score': float(score)})
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = {'images': images, 'annotations': annotations,
                    'categories': [{'id': c + 1, 'name': str(c)} for c in range(num_classes)]}
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(results), 'bbox')
    evaluator.params.iouThrs = np.array([0.5])
    evaluator.params.maxDets = [max_dets]
    evaluator.evaluate()
    evaluator.accumulate()
  precision = evaluator.eval['precision'][0, :, :, 0, 0]  # [R, K]
  per_class = [float(np.mean(precision[:, k])) if precision[0, k] > -1 else float('nan')
               for k in range(num_classes)]
  valid = precision[precision > -1]
  return float(np.mean(valid)) if valid.size else -1.0, per_class


@pytest.mark.parametrize('seed,score_levels,max_dets', [(0, None, 100), (1, 10, 100),
                                                        (2, None, 3)])
def test_coco_ap_matches_pycocotools(seed, score_levels, max_dets):
  classes = ('car', 'person', 'bicycle', 'dog')  # 'dog' has detections but no GT
  preds, gts = _random_scene(seed, num_frames=12, box_dim=4, num_classes=3,
                             score_levels=score_levels)
  preds[0] = {'boxes': np.concatenate([preds[0]['boxes'], [[10, 10, 50, 50]]]),
              'scores': np.concatenate([preds[0]['scores'], [0.9]]),
              'classes': np.concatenate([preds[0]['classes'], [3]])}
  ours = metrics.coco_ap(preds, gts, classes, max_dets=max_dets)
  ref_map, ref_per_class = _coco_eval(preds, gts, len(classes), max_dets)
  assert ours['mAP'] == pytest.approx(ref_map, abs=1e-6)
  for name, ref in zip(classes, ref_per_class):
    if np.isnan(ref):
      assert np.isnan(ours['AP'][name])
    else:
      assert ours['AP'][name] == pytest.approx(ref, abs=1e-6)
  assert np.isnan(ours['AP']['dog']) and 0 < ours['mAP'] < 1


def test_coco_ap_edge_cases():
  _, gts = _random_scene(4, box_dim=4, num_classes=2)
  perfect = [{'boxes': g['boxes'], 'scores': np.ones(len(g['classes'])),
              'classes': g['classes']} for g in gts]
  acc = metrics.Detection2DAccumulator(('car', 'person'))
  for p, g in zip(perfect, gts):
    acc.update(p['boxes'], p['scores'], p['classes'], g['boxes'], g['classes'])
  summary = acc.summary()
  assert summary['mAP50'] == pytest.approx(1.0) and summary['AP50/car'] == pytest.approx(1.0)
  empty = [{'boxes': np.zeros((0, 4)), 'scores': [], 'classes': []} for _ in gts]
  assert metrics.coco_ap(empty, gts, ('car', 'person'))['mAP'] == 0.0
  # Equal IoU (2/3) with two GTs: COCOeval gives the first detection the later GT, which
  # leaves the earlier GT to the second detection (IoU 1; 0.43 with the later GT).
  tie_gt = [{'boxes': np.array([[0.0, 0, 10, 10], [4, 0, 14, 10]]), 'classes': [0, 0]}]
  tie_pred = [{'boxes': np.array([[2.0, 0, 12, 10], [0, 0, 10, 10]]), 'scores': [0.9, 0.8],
               'classes': [0, 0]}]
  assert metrics.coco_ap(tie_pred, tie_gt, ('car',))['mAP'] == pytest.approx(1.0)
  assert _coco_eval(tie_pred, tie_gt, 1, 100)[0] == pytest.approx(1.0)


def test_detection3d_accumulator_summary():
  preds, gts = _random_scene(5)
  acc = metrics.Detection3DAccumulator()
  for p, g in zip(preds, gts):
    acc.update(p['boxes'], p['scores'], p['classes'], g['boxes'], g['classes'])
  summary = acc.summary()
  direct = metrics.center_distance_ap(preds, gts, plane='elevation')
  assert summary['mAP_XZ'] == direct['mAP'] and summary['ADE_XZ'] == direct['mADE']
  assert summary['AP_XY/car'] == metrics.center_distance_ap(preds, gts)['AP']['car']


def test_segmentation_miou_matches_per_class_loop():
  rng = np.random.default_rng(0)
  num_classes = 6
  metric = metrics.SegmentationMetric(num_classes)
  preds, targets = [], []
  for _ in range(3):
    # Class 5 appears in neither target nor prediction.
    target = rng.integers(0, num_classes - 1, (2, 9, 11))
    target[rng.random(target.shape) < 0.2] = 255
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 4, target.shape))
    pred = np.where(pred == 255, 0, pred)  # ignored pixels: any label, they are skipped
    metric.update(pred, target)
    preds.append(pred)
    targets.append(target)
  pred, target = np.concatenate(preds), np.concatenate(targets)
  valid = target != 255
  expected = []
  for c in range(num_classes):
    inter = np.sum((pred == c) & (target == c) & valid)
    union = np.sum(((pred == c) | (target == c)) & valid)
    expected.append(inter / union if union else np.nan)
  result = metric.result()
  np.testing.assert_allclose(result['IoU'], expected, rtol=1e-12)
  assert np.isnan(result['IoU'][5])  # absent from target and prediction: excluded
  assert result['mIoU'] == pytest.approx(np.nanmean(expected), rel=1e-12)
  assert result['pixel_accuracy'] == pytest.approx(np.mean(pred[valid] == target[valid]))
  with pytest.raises(ValueError, match='target labels'):
    metric.update(np.zeros((2, 2), int), np.full((2, 2), 7))
  with pytest.raises(ValueError, match='shape'):
    metric.update(np.zeros((2, 3), int), np.zeros((2, 2), int))


def test_depth_mae_pools_pixels_over_frames():
  rng = np.random.default_rng(0)
  metric = metrics.DepthMAE()
  errors = []
  for density in (0.9, 0.05):  # frames of very different label density
    target = np.where(rng.random((2, 8, 8)) < density, rng.uniform(1, 80, (2, 8, 8)), 0.0)
    pred = target + rng.normal(0, 2, target.shape)
    metric.update(pred.astype(np.float32), target.astype(np.float32))
    valid = target > 0
    errors.append(np.abs(pred.astype(np.float32).astype(np.float64)
                         - target.astype(np.float32))[valid])
  expected = np.concatenate(errors).mean()
  assert metric.result() == pytest.approx(expected, rel=1e-12)
  assert metric.result() != pytest.approx(np.mean([e.mean() for e in errors]), rel=1e-3)
  assert np.isnan(metrics.DepthMAE().result())


def test_feature_variance_matches_the_two_way_decomposition():
  rng = np.random.default_rng(0)
  frames, h, w, d = 10, 3, 4, 5
  x = (3.0 * rng.normal(size=(frames, 1, 1, d)) + 1.5 * rng.normal(size=(1, h, w, d))
       + 0.5 * rng.normal(size=(frames, h, w, d)) + 7.0)
  flat = x.reshape(frames, h * w, d)
  frame_mean, position_mean, grand = flat.mean(1), flat.mean(0), flat.mean((0, 1))
  total = flat.var(axis=(0, 1)).sum()
  local = (flat - frame_mean[:, None] - position_mean[None] + grand).var(axis=(0, 1)).sum()
  want = {'frame': frame_mean.var(0).sum() / total, 'position': position_mean.var(0).sum() / total,
          'local': local / total}
  acc = metrics.FeatureVariance()
  # Two batches, the second padded with a frame that must be skipped.
  acc.update(x[:6].astype(np.float32), np.ones(6))
  acc.update(np.concatenate([x[6:], 100 + x[:1]]), np.array([1, 1, 1, 1, 0]))
  got = acc.result()
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)
  assert abs(sum(got.values()) - 1) < 1e-9
  assert got['frame'] > got['position'] > got['local']   # the planted 3 : 1.5 : 0.5 scales
  with pytest.raises(ValueError, match='patches'):
    acc.update(np.zeros((2, 3, 3, d)))
  with pytest.raises(RuntimeError):
    metrics.FeatureVariance().result()
