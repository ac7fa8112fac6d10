"""Pretrains and probes a list of paper rows (and seeds), then writes the comparison table in the
paper's layout (Tables 1-3: mAP XY, Depth MAE, mAP XZ, Seg. mIoU; Table 5 for 2D data) with
Table 6's compute columns beside it.

  # Table 2/3-style comparison on the embedded synthetic data, 3 seeds
  python -m benchmarks.paper_tables --rows=lejepa_rgb,lidar_only,early_fusion,late_fusion,lemumo \
      --seeds=0,1,2 --out_dir=runs/paper_tables
  # Table 1: a row followed by ':frozen' is its encoder-frozen control (random init, probes only)
  python -m benchmarks.paper_tables --rows=lejepa_rgb,lejepa_rgb:frozen,lidar_only,lidar_only:frozen
  # the paper's Waymo setting; anything after -- goes to every run of lemumo_jax.main
  python -m benchmarks.paper_tables --config=configs/waymo.py --out_dir=/runs/waymo_tables -- \
      --config.data.data_dir=/data/waymo_shards

Every (row, seed) is one `python -m lemumo_jax.main --config=<config>:<row>` process with
mode=pretrain_probe (mode=probe with probe.encoder=random for ':frozen'), in
<out_dir>/<row>_seed<seed>; a rerun skips runs whose report exists and resumes unfinished ones
from their checkpoints. With --profile (default), each pretrained row also runs mode=profile
for the compute columns:
  Time (min)     Table 6's estimated encoder-training time (median step x schedule steps)
  SSL PFLOPs     XLA FLOPs of the train step x schedule steps
  Memory (GB)    the device's peak memory; on a CPU (no device peak) XLA's static estimate of
                 the step's footprint, marked '*'
Metrics over seeds are reported as mean ± standard deviation (ddof 1). Writes
<out_dir>/tables.md and tables.json and prints the table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags
import numpy as np

from lemumo_jax.evaluation import report

_CONFIG = flags.DEFINE_string('config', 'configs/synthetic.py', 'Dataset config file.')
_ROWS = flags.DEFINE_list('rows', ['lejepa_rgb', 'lidar_only', 'early_fusion', 'late_fusion',
                                   'lemumo'], "Paper rows (configs/common.py METHODS); "
                          "'<row>:frozen' is the row's random-init encoder-frozen control.")
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'config.seed values; metrics are averaged over them.')
_OUT_DIR = flags.DEFINE_string('out_dir', 'runs/paper_tables', 'One workdir per run, + tables.')
_PROFILE = flags.DEFINE_bool('profile', True, 'Also run mode=profile for the compute columns.')

FROZEN = ':frozen'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_dir(out_dir: str, row: str, seed: str) -> str:
  name = row.replace(FROZEN, '_frozen')
  return os.path.join(out_dir, f'{name}_seed{seed}')


def report_path(workdir: str, row: str) -> str:
  return os.path.join(workdir, 'probe_random' if row.endswith(FROZEN) else 'probe', 'report.json')


def commands(config: str, row: str, seed: str, workdir: str, extra: Sequence[str],
             profile: bool) -> list[list[str]]:
  """The lemumo_jax.main invocations of one (row, seed)."""
  base_row = row[:-len(FROZEN)] if row.endswith(FROZEN) else row
  main = [sys.executable, '-m', 'lemumo_jax.main', f'--config={config}:{base_row}',
          f'--workdir={workdir}', f'--config.seed={seed}', *extra]
  if row.endswith(FROZEN):
    return [main + ['--config.mode=probe', '--config.probe.encoder=random']]
  runs = [main + ['--config.mode=pretrain_probe']]
  if profile:
    runs.append(main + ['--config.mode=profile'])
  return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  if not finite:
    return float('nan'), float('nan')
  return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def _cell(mean: float, std: float, digits: int, seeds: int) -> str:
  if not math.isfinite(mean):
    return 'n/a'
  return f'{mean:.{digits}f}' + (f' ± {std:.{digits}f}' if seeds > 1 else '')


def aggregate(out_dir: str, rows: Sequence[str], seeds: Sequence[str]) -> dict[str, Any]:
  """Per row: method, training data, per-column mean/std over seeds, compute columns."""
  table = []
  for row in rows:
    reports, profiles = [], []
    for seed in seeds:
      workdir = run_dir(out_dir, row, seed)
      reports.append(report.read_report(report_path(workdir, row)))
      profile_path = os.path.join(workdir, 'profile.json')
      if not row.endswith(FROZEN) and os.path.exists(profile_path):
        with open(profile_path) as f:
          profiles.append(json.load(f))
    entry = {'row': row, 'method': reports[0].method, 'training_data': reports[0].training_data,
             'seeds': list(seeds), 'metrics': {}, 'compute': {}}
    for column in report.columns_for(reports):
      mean, std = _mean_std([r.metrics.get(column.key, float('nan')) * column.scale
                             for r in reports])
      entry['metrics'][column.title] = {'mean': mean, 'std': std}
    if profiles:
      memory = [p['peak_bytes'] if p['peak_bytes'] is not None else p['xla_memory_bytes']
                for p in profiles]
      entry['compute'] = {
          'Time (min)': _mean_std([p['time_min'] for p in profiles])[0],
          'SSL PFLOPs': _mean_std([p['ssl_pflops_total'] for p in profiles])[0],
          'Memory (GB)': _mean_std([m / 1e9 if m is not None else None for m in memory])[0],
          'memory_is_xla_estimate': profiles[0]['peak_bytes'] is None}
    table.append(entry)
  return {'rows': table, 'seeds': list(seeds)}


def markdown(result: dict[str, Any]) -> str:
  rows, seeds = result['rows'], len(result['seeds'])
  columns = [c for c in (*report.COLUMNS_3D, *report.COLUMNS_2D)
             if any(c.title in r['metrics'] for r in rows)]
  compute = any(r['compute'] for r in rows)
  header = ['Method', 'Training Data', *(c.title for c in columns)]
  if compute:
    header += ['Time (min)', 'SSL PFLOPs', 'Memory (GB)']
  lines = ['| ' + ' | '.join(header) + ' |', '|---|---|' + '---:|' * (len(header) - 2)]
  best = {}
  for c in columns:  # bold best, underline second best, as the paper does
    means = [(r['metrics'].get(c.title, {}).get('mean', float('nan')), i)
             for i, r in enumerate(rows)]
    ranked = sorted(((m if c.higher_is_better else -m), i) for m, i in means if math.isfinite(m))
    best[c.title] = {i: rank for rank, (_, i) in enumerate(reversed(ranked))}
  for i, r in enumerate(rows):
    cells = [r['method'], r['training_data']]
    for c in columns:
      value = r['metrics'].get(c.title, {'mean': float('nan'), 'std': float('nan')})
      text = _cell(value['mean'], value['std'], c.digits, seeds)
      rank = best[c.title].get(i) if len(rows) > 1 else None
      cells.append(f'**{text}**' if rank == 0 else f'<u>{text}</u>' if rank == 1 else text)
    if compute:
      comp = r['compute']
      if comp:
        star = '*' if comp['memory_is_xla_estimate'] else ''
        cells += [f'{comp["Time (min)"]:.2f}', f'{comp["SSL PFLOPs"]:.4g}',
                  f'{comp["Memory (GB)"]:.3f}{star}']
      else:
        cells += ['—', '—', '—']
    lines.append('| ' + ' | '.join(cells) + ' |')
  notes = [f'Mean ± std over seeds {", ".join(result["seeds"])}.' if seeds > 1 else
           f'Seed {result["seeds"][0]}.']
  if any(r['compute'].get('memory_is_xla_estimate') for r in rows if r['compute']):
    notes.append('* no device peak on this backend: XLA\'s static estimate of the train step.')
  return '\n'.join(lines) + '\n\n' + ' '.join(notes) + '\n'


def main(argv):
  extra = [a for a in argv[1:] if a != '--']
  out_dir = os.path.abspath(_OUT_DIR.value)
  rows, seeds = list(_ROWS.value), list(_SEEDS.value)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  for row in rows:
    for seed in seeds:
      workdir = run_dir(out_dir, row, seed)
      done = os.path.exists(report_path(workdir, row)) and (
          row.endswith(FROZEN) or not _PROFILE.value
          or os.path.exists(os.path.join(workdir, 'profile.json')))
      if done:
        print(f'[{row} seed {seed}] done earlier: {workdir}', flush=True)
        continue
      for cmd in commands(_CONFIG.value, row, seed, workdir, extra, _PROFILE.value):
        print(f'[{row} seed {seed}] {" ".join(cmd[1:])}', flush=True)
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        if proc.returncode:
          raise SystemExit(f'[{row} seed {seed}] failed (exit {proc.returncode}); rerun the '
                           f'same command to resume it')
  result = aggregate(out_dir, rows, seeds)
  text = markdown(result)
  os.makedirs(out_dir, exist_ok=True)
  for name, payload in (('tables.md', text), ('tables.json', json.dumps(result, indent=2))):
    path = os.path.join(out_dir, name)
    with open(path + '.tmp', 'w') as f:
      f.write(payload)
    os.replace(path + '.tmp', path)
  print(text)
  print(f'Tables written to {out_dir}/tables.md and tables.json', flush=True)


if __name__ == '__main__':
  app.run(main)
