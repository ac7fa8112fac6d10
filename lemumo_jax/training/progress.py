"""Progress lines and TensorBoard writers shared by the long-running stages."""

from __future__ import annotations

import os

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
