"""Progress lines and TensorBoard writers shared by the long-running stages."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def metric_writer(directory: str):
  """clu TensorBoard writer into <directory>/tensorboard (host 0 only; a no-op elsewhere)."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncMultiWriter(
      [metric_writers.SummaryWriter(os.path.join(directory, 'tensorboard'))])


# The objective terms a pretraining progress line shows beside the loss, when the objective
# reports them (LeJEPA, VICReg, InfoNCE, DINO + iBOT, MultiMAE).
LOSS_TERMS = ('sigreg', 'invariance', 'variance', 'covariance', 'dino', 'ibot', 'recon_rgb',
              'recon_companion', 'seg_ce')


def eta(remaining_steps: int, rate: float) -> str:
  return format_eta(remaining_steps / max(rate, 1e-9))


def host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """A step's metrics (device arrays; None entries dropped) -> Python floats."""
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items() if v is not None}


def loss_terms(scalars: Mapping[str, float], names: tuple[str, ...] = LOSS_TERMS) -> str:
  """'sigreg 1.2345, invariance 0.1234' for the names present, or ''."""
  return ', '.join(f'{name} {scalars[name]:.4f}' for name in names if name in scalars)
