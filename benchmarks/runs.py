"""The run layout paper_tables and claims share: one lemumo_jax.main workdir per (row, seed)
under an --out_dir, where its report lies, running it, and the paired seed statistics."""

from __future__ import annotations

import math
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

FROZEN, TRANSFER, FINETUNE = ':frozen', ':transfer', ':finetune'
KINDS = ('', FROZEN, TRANSFER, FINETUNE)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def split_row(row: str) -> tuple[str, str]:
  """'<row>[:<kind>]' -> (row, kind) with kind one of KINDS; an unknown kind is a ValueError."""
  base, sep, kind = row.partition(':')
  kind = sep + kind
  if kind not in KINDS:
    raise ValueError(f'row {row!r}: the part after the row name must be one of '
                     f'{[k for k in KINDS if k]}')
  return base, kind


def run_dir(out_dir: str, row: str, seed: str) -> str:
  return os.path.join(out_dir, f'{row.replace(":", "_")}_seed{seed}')


def report_path(workdir: str, row: str) -> str:
  stage = {'': 'probe', FROZEN: 'probe_random', TRANSFER: 'probe', FINETUNE: 'finetune'}
  return os.path.join(workdir, stage[split_row(row)[1]], 'report.json')


def paired_summary(gains: Sequence[float]) -> dict[str, Any]:
  """Per-seed gains (positive = better) -> mean, two-sided 95% t-interval of the mean (n - 1
  degrees of freedom; nan from one seed), seeds won and seeds."""
  n = len(gains)
  mean = float(np.mean(gains)) if n else float('nan')
  low = high = float('nan')
  if n > 1:
    half = stats.t.ppf(0.975, n - 1) * float(np.std(gains, ddof=1)) / math.sqrt(n)
    low, high = mean - half, mean + half
  return {'gains': [float(g) for g in gains], 'mean': mean, 'ci95': [low, high],
          'wins': int(sum(g > 0 for g in gains)), 'seeds': n}


def run_command(cmd: Sequence[str], label: str, env: Mapping[str, str]) -> None:
  print(f'[{label}] {" ".join(cmd[1:])}', flush=True)
  proc = subprocess.run(cmd, cwd=REPO, env=env)
  if proc.returncode:
    raise SystemExit(f'[{label}] failed (exit {proc.returncode}); rerun the same command to '
                     f'resume it')
