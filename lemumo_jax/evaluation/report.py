"""Probe reports in the paper's layout (Tables 1-5) and the qualitative figure (Figure 4).

Units follow the paper: detection AP in percent (mAP XY, mAP XZ, mAP50, Car mAP50), Depth MAE in
metres, Seg. mIoU as a fraction. report.json keeps every metric as computed (fractions) next to
the table values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lemumo_jax import files
from lemumo_jax.data import geometry
from lemumo_jax.evaluation import robustness as robustness_lib


@dataclasses.dataclass(frozen=True)
class Column:
  title: str
  key: str          # metric key in ProbeEvaluator.result()
  scale: float      # table value = metric * scale
  digits: int
  higher_is_better: bool


# Table 3 (Waymo) layout; nuScenes (Table 4) uses the same metrics.
COLUMNS_3D = (Column('mAP XY ↑', 'mAP_XY', 100.0, 1, True),
              Column('Depth MAE ↓', 'depth_MAE', 1.0, 3, False),
              Column('mAP XZ ↑', 'mAP_XZ', 100.0, 1, True),
              Column('Seg. mIoU ↑', 'seg_mIoU', 1.0, 3, True))
# Table 5 (FLIR) layout.
COLUMNS_2D = (Column('mAP50 ↑', 'mAP50', 100.0, 2, True),
              Column('Car mAP50 ↑', 'AP50/car', 100.0, 2, True))
# Reported after the paper's columns when present.
EXTRA_COLUMNS = (Column('ADE XY (m) ↓', 'ADE_XY', 1.0, 3, False),
                 Column('Occ. IoU ↑', 'occupancy_IoU', 1.0, 3, True))


@dataclasses.dataclass
class ReportRow:
  method: str
  training_data: str
  metrics: Mapping[str, Any]


def columns_for(rows: Sequence[ReportRow]) -> list[Column]:
  """The paper's columns for the metrics the rows have, then the extras they have."""
  keys = set().union(*(r.metrics for r in rows)) if rows else set()
  main = COLUMNS_3D if 'mAP_XY' in keys or 'depth_MAE' in keys else COLUMNS_2D
  return [c for c in (*main, *EXTRA_COLUMNS) if c.key in keys]


def _value(row: ReportRow, column: Column) -> float:
  value = row.metrics.get(column.key)
  return float('nan') if value is None else float(value) * column.scale


def markdown_table(rows: Sequence[ReportRow], mark_best: bool = False) -> str:
  """| Method | Training Data | <columns> |; with mark_best, the best value per column is bold
  and the second best underlined, as in the paper."""
  columns = columns_for(rows)
  lines = ['| Method | Training Data | ' + ' | '.join(c.title for c in columns) + ' |',
           '|---|---|' + '---:|' * len(columns)]
  ranks = {}
  if mark_best and len(rows) > 1:
    for c in columns:
      values = [(_value(r, c), i) for i, r in enumerate(rows)]
      finite = sorted((v if c.higher_is_better else -v, i) for v, i in values if math.isfinite(v))
      ranks[c.key] = {i: rank for rank, (_, i) in enumerate(reversed(finite))}
  for i, row in enumerate(rows):
    cells = []
    for c in columns:
      value = _value(row, c)
      text = f'{value:.{c.digits}f}' if math.isfinite(value) else 'n/a'
      rank = ranks.get(c.key, {}).get(i)
      text = f'**{text}**' if rank == 0 else f'<u>{text}</u>' if rank == 1 else text
      cells.append(text)
    lines.append(f'| {row.method} | {row.training_data} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def robustness_rows(row: ReportRow,
                    robustness: Mapping[str, Mapping[str, Any] | None]) -> list[ReportRow]:
  """'<method> [<condition label>]' rows under `row`, one per condition (no metrics: n/a)."""
  return [ReportRow(f'{row.method} [{robustness_lib.label(name)}]', row.training_data,
                    values or {}) for name, values in robustness.items()]


def table_values(row: ReportRow) -> dict[str, float | None]:
  out = {}
  for c in columns_for([row]):
    value = _value(row, c)
    out[c.title] = round(value, c.digits + 3) if math.isfinite(value) else None
  return out


def _jsonable(value):
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_report(directory: str, row: ReportRow, details: Mapping[str, Any],
                 figure_frames: Sequence[Mapping[str, Any]] = (),
                 metadata: Mapping[str, Any] | None = None,
                 image_hw: tuple[int, int] | None = None,
                 title: str = 'Frozen patch probes',
                 robustness: Mapping[str, Mapping[str, Any] | None] | None = None
                 ) -> dict[str, str]:
  """report.md (headed '# <title>: <method>') + report.json (+ probe_outputs.png when frames
  are given) in `directory`. `robustness` ({condition: metrics, None when n/a}; the probe stage
  gives it, evaluation/robustness.py) adds rows under the table and report.json's
  'robustness'."""
  os.makedirs(directory, exist_ok=True)
  paths = {'markdown': os.path.join(directory, 'report.md'),
           'json': os.path.join(directory, 'report.json')}
  metadata = metadata or {}
  if figure_frames:
    paths['figure'] = os.path.join(directory, 'probe_outputs.png')
    save_figure(paths['figure'], figure_frames, metadata, image_hw)
  all_metrics = '\n'.join(f'| {k} | {v:.6g} |' if isinstance(v, (float, int)) and v == v
                          else f'| {k} | n/a |' for k, v in sorted(row.metrics.items()))
  lines = [f'# {title}: {row.method}', '',
           markdown_table([row, *robustness_rows(row, robustness or {})]), '',
           'Detection AP in percent (center-distance AP at 0.5/1/2/4 m averaged over thresholds, '
           'then classes; XY = bird\'s-eye ground plane, XZ = forward-vertical plane), Depth MAE '
           'in metres over valid pixels, Seg. mIoU as a fraction; the numbers of the validation '
           'with the lowest probe loss.', '']
  if robustness:
    lines += ['Rows in brackets: the same heads on the val split with the companion perturbed '
              '(config.probe.robustness), nothing retrained: missing = all 0; shifted k px = '
              'moved k px right, the uncovered columns 0; LiDAR returns dropped = that fraction '
              'of the pixels with a return set to 0 at random. n/a: the probed patch grid does '
              'not read the companion, or a LiDAR-only condition on a thermal companion.', '']
  lines += [
           *(f'- {k}: {v}' for k, v in details.items()), '']
  if 'figure' in paths:
    lines += ['![probe outputs](probe_outputs.png)', '']
  lines += ['## All validation metrics', '', '| metric | value |', '|---|---:|', all_metrics, '']
  files.write_text_atomic(paths['markdown'], '\n'.join(lines))
  payload = {'method': row.method, 'training_data': row.training_data,
             'table': table_values(row), 'metrics': row.metrics, 'details': details}
  if robustness is not None:
    payload['robustness'] = robustness
  files.write_text_atomic(paths['json'], json.dumps(_jsonable(payload), indent=2))
  return paths


def read_report(path: str) -> ReportRow:
  """A ReportRow back from a report.json (for comparison tables across runs)."""
  with open(path) as f:
    payload = json.load(f)
  metrics = {k: (float('nan') if v is None else v) for k, v in payload['metrics'].items()}
  return ReportRow(payload['method'], payload['training_data'], metrics)


# ----------------------------------------------------------------------------------- figure

FIGURE_SCORE_THRESHOLD = 0.3  # detections drawn in the figure (the metrics use all)
_BOX_COLOURS = ('tab:red', 'tab:blue', 'tab:orange', 'tab:purple', 'tab:brown', 'tab:pink')


def _draw_box3d(ax, box, intrinsics, colour, style):
  corners = geometry.box3d_corners(np.asarray(box, np.float64)[None])[0]
  if np.any(corners[:, 2] <= 0.1):
    return
  uv, _ = geometry.project_points(corners, intrinsics)
  for i in range(8):
    for j in range(i + 1, 8):
      if bin(i ^ j).count('1') == 1:  # corners joined by an edge differ in one sign bit
        ax.plot(uv[[i, j], 0], uv[[i, j], 1], color=colour, linestyle=style, linewidth=1)


def save_figure(path: str, frames: Sequence[Mapping[str, Any]], metadata: Mapping[str, Any],
                image_hw: tuple[int, int] | None) -> None:
  """One row per frame: RGB with ground-truth (dashed) and predicted (solid) boxes, then
  predicted / ground-truth depth, segmentation and occupancy for the heads that ran."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = [('rgb', 'RGB + boxes (pred solid, GT dashed)')]
  for key, title in (('depth', 'depth'), ('seg', 'segmentation'), ('occupancy', 'occupancy')):
    if f'pred_{key}' in frames[0]:
      panels += [(f'pred_{key}', f'predicted {title}'), (f'gt_{key}', f'ground-truth {title}')]
  rows, cols = len(frames), len(panels)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
  num_seg = max(len(metadata.get('seg_classes', ())), 1)
  max_depth = max([float(np.max(f['gt_depth'])) for f in frames if 'gt_depth' in f] + [1.0])
  for r, frame in enumerate(frames):
    for c, (key, title) in enumerate(panels):
      ax = axes[r][c]
      ax.set_axis_off()
      if r == 0:
        ax.set_title(title, fontsize=8)
      if key == 'rgb':
        ax.imshow(frame['rgb'])
        height, width = frame['rgb'].shape[:2]
        for dim in ('3d', '2d'):
          for kind, style in (('gt', '--'), ('pred', '-')):
            if f'{kind}_boxes{dim}' not in frame:
              continue
            boxes = np.asarray(frame[f'{kind}_boxes{dim}'])
            classes = np.asarray(frame.get(f'{kind}_classes{dim}', ()))
            if kind == 'pred':
              keep = np.asarray(frame[f'pred_scores{dim}']) >= FIGURE_SCORE_THRESHOLD
              boxes, classes = boxes[keep], classes[keep]
            for box, cls in zip(boxes, classes):
              if dim == '3d':
                _draw_box3d(ax, box, frame['intrinsics'], _BOX_COLOURS[int(cls) % 6], style)
                continue
              x1, y1, x2, y2 = box
              ax.plot([x1, x2, x2, x1, x1], [y1, y1, y2, y2, y1], linestyle=style,
                      linewidth=1, color=_BOX_COLOURS[int(cls) % 6])
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
      elif 'depth' in key:
        depth = np.where(frame[key] > 0, frame[key], np.nan)
        ax.imshow(depth, cmap='magma_r', vmin=0, vmax=max_depth)
      elif 'seg' in key:
        seg = np.where(frame[key] == 255, np.nan, frame[key].astype(np.float64))
        ax.imshow(seg, cmap='tab20', vmin=0, vmax=max(num_seg - 1, 1), interpolation='nearest')
      else:
        ax.imshow(frame[key][..., -1], cmap='gray', vmin=0, vmax=1)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=80)
  plt.close(fig)
  os.replace(tmp, path)
