"""Robustness rows of the probe report: the paper's stated limitation, measured (beyond the paper).

The paper assumes aligned, calibrated sensors. After the probe stage restores its best heads, it
validates them once more per condition of config.probe.robustness with the companion map of the
clean probe view perturbed; the encoder re-runs on the perturbed inputs (never the feature
cache), the targets stay clean and nothing is retrained. Conditions (CONDITIONS):

  companion_missing   every companion pixel 0: no LiDAR return anywhere (model.companion_valid's
                      'has a return' channel derives from companion != 0, so it reads 0 too)
  shift_<k>px         the companion moved k px right (along image rows, what a yaw error of the
                      extrinsics mostly does), at the probe view's resolution; the k uncovered
                      columns on the left are 0 (no return; for a thermal companion 0 is the
                      coldest value, the same fill)
  drop_<p>            p % of the pixels that hold a return (> 0) set to 0, chosen uniformly per
                      frame; depth companions only. Pixels drop independently, so where the view
                      is finer than the LiDAR frame a return spanning several pixels can lose
                      some of them

A condition is n/a (a null entry, 'n/a' cells) when the probed patch grid does not read the
companion (reads_companion) or it is depth-only and the companion is thermal.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lemumo_jax.data import pipeline


@dataclasses.dataclass(frozen=True)
class Condition:
  label: str                 # the report row's suffix: '<method> [<label>]'
  zero: bool = False
  shift: int = 0             # pixels to the right
  drop: float = 0.0          # fraction of the returns zeroed
  depth_only: bool = False


CONDITIONS = {
    'companion_missing': Condition('companion missing', zero=True),
    'shift_2px': Condition('companion shifted 2 px', shift=2),
    'shift_4px': Condition('companion shifted 4 px', shift=4),
    'shift_8px': Condition('companion shifted 8 px', shift=8),
    'drop_50': Condition('50% LiDAR returns dropped', drop=0.5, depth_only=True),
    'drop_90': Condition('90% LiDAR returns dropped', drop=0.9, depth_only=True),
}


def check_conditions(names: Sequence[str]) -> None:
  unknown = [names] if isinstance(names, str) else [n for n in names if n not in CONDITIONS]
  if unknown:
    raise ValueError(f'config.probe.robustness={names!r}: unknown {unknown}; choose a tuple of '
                     f'{list(CONDITIONS)}, or () for none')


def label(name: str) -> str:
  return CONDITIONS[name].label


def reads_companion(model_cfg: Mapping[str, Any] | None) -> bool:
  """Whether the probed patch grid depends on the companion. model_cfg None: the raw input
  patches (probe.encoder='raw'), which hold it. A 'vit' reads its one input; 'dual' (ImageBind)
  probes its RGB branch, which never sees the companion branch's tokens; every other family
  (fusion, early/late fusion, MultiMAE, whose RGB tokens attend to the companion's) reads it."""
  if model_cfg is None:
    return True
  if model_cfg['family'] == 'vit':
    return model_cfg.get('inputs', 'rgb') == 'companion'
  return model_cfg['family'] != 'dual'


def not_applicable(name: str, model_cfg: Mapping[str, Any] | None, companion: str) -> str | None:
  """Why condition `name` has no row for this probe (None: it runs)."""
  if not reads_companion(model_cfg):
    return 'the probed patch grid does not read the companion'
  if CONDITIONS[name].depth_only and companion != 'depth':
    return f'LiDAR returns only; the companion is {companion}'
  return None


# ------------------------------------------------------------------------------ perturbations


def zero_companion(companion: np.ndarray) -> np.ndarray:
  return np.zeros_like(companion)


def shift_companion(companion: np.ndarray, pixels: int) -> np.ndarray:
  """companion [B, H, W] or [B, H, W, C] moved `pixels` to the right; the uncovered left
  columns are 0."""
  out = np.zeros_like(companion)
  if pixels < companion.shape[2]:
    out[:, :, pixels:] = companion[:, :, :companion.shape[2] - pixels]
  return out


def drop_returns(companion: np.ndarray, fraction: float,
                 rngs: Sequence[np.random.Generator]) -> np.ndarray:
  """companion [B, H, W] or [B, H, W, C] with round(fraction x n_b) of frame b's n_b returns
  (pixels with a channel > 0) set to 0, drawn uniformly without replacement by rngs[b]; the
  other pixels are untouched."""
  out = companion.copy()
  for frame, rng in zip(out, rngs, strict=True):
    has_return = frame > 0 if frame.ndim == 2 else np.any(frame > 0, axis=-1)
    returns = np.flatnonzero(has_return)
    dropped = rng.choice(returns, int(round(fraction * len(returns))), replace=False)
    frame.reshape(has_return.size, -1)[dropped] = 0
  return out


def frame_rng(seed: int, name: str, record: int) -> np.random.Generator:
  """The generator of one val frame under one condition: a function of (config.seed, the
  condition's name, the frame's index in the split), so reruns are bitwise equal and the draw
  does not depend on the batch size or the number of hosts."""
  return np.random.default_rng([seed % 2**32, zlib.crc32(name.encode()), int(record)])


def perturb(companion: np.ndarray, name: str, *, seed: int,
            records: np.ndarray) -> np.ndarray:
  """A host batch's companion [B, H, W(, C)] under condition `name`; records [B]: the frames'
  indices in the val split (pipeline.eval_record_indices)."""
  condition = CONDITIONS[name]
  if condition.zero:
    return zero_companion(companion)
  if condition.shift:
    return shift_companion(companion, condition.shift)
  return drop_returns(companion, condition.drop, [frame_rng(seed, name, r) for r in records])


def perturb_batch(host_batch: Mapping[str, np.ndarray], name: str, *, seed: int,
                  batch_index: int) -> dict[str, np.ndarray]:
  """Batch `batch_index` of this host's pipeline.probe_eval_loader pass with its companion
  perturbed; every other key (the targets) as it was."""
  records = pipeline.eval_record_indices(batch_index, len(host_batch['valid']))
  return dict(host_batch, companion=perturb(host_batch['companion'], name, seed=seed,
                                            records=records))
