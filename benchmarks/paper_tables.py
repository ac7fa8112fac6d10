"""Runs a list of paper rows (and seeds) through lemumo_jax.main, then writes the comparison
table in the paper's layout (Tables 1-4: mAP XY, Depth MAE, mAP XZ, Seg. mIoU; Table 5: mAP50,
Car mAP50) with Table 6's compute columns beside it.

  # a paper table's rows, in the paper's order and names (--table=1..6; TABLES below)
  python -m benchmarks.paper_tables --table=2 --seeds=0,1,2 --out_dir=runs/table2
  # any rows: '<row>:frozen' is the row's random-init encoder-frozen control (Table 1)
  python -m benchmarks.paper_tables --rows=lejepa_rgb,lejepa_rgb:frozen,lidar_only,lemumo
  # the paper's Waymo setting; anything after -- goes to every run of lemumo_jax.main
  python -m benchmarks.paper_tables --table=3 --config=configs/waymo.py \
      --out_dir=/runs/waymo_tables -- \
      --config.data.data_dir=/data/tfds/lemumo_waymo/front_320x480/1.0.0
  # Table 5 on FLIR: scratch rows, then Waymo -> FLIR transfer and fine-tuning of the encoders
  # the Waymo runs above exported (/runs/waymo_tables/<row>_seed<seed>/encoder)
  python -m benchmarks.paper_tables --table=5 --config=configs/flir.py \
      --transfer_from=/runs/waymo_tables --out_dir=/runs/flir_tables -- \
      --config.data.data_dir=/data/tfds/lemumo_flir/video_512x640/1.0.0

A row is '<row>[:<kind>]' with <row> a configs/common.py METHODS name. Every (row, seed) runs
in <out_dir>/<row>[_<kind>]_seed<seed> as:
  <row>            mode=pretrain_probe (SSL on the config's dataset, then the frozen probes)
  <row>:frozen     mode=probe with probe.encoder=random
  <row>:transfer   --config=<config>:<row>,transfer (frozen probes, V = 1, no local crops) on
                   the encoder <transfer_from>/<row>_seed<seed>/encoder
  <row>:finetune   --config=<config>:<row>,finetune (mode=finetune) from that encoder
A rerun skips runs whose report exists and resumes unfinished ones from their checkpoints. Each
workdir records the arguments it was made with (--config, the flags after --, --transfer_from;
runs.INVOCATION_FILE): a rerun with others is refused before anything runs, naming them, except
the flags a resumed run may change (logging, checkpoint cadence, loaders, the probe report's
extras: runs.resumable_flags). With --profile (default), each pretrained row also runs
mode=profile for the compute columns (Table 6 runs only that: --table=6 trains nothing):
  Time (min)     Table 6's estimated encoder-training time (median step x schedule steps)
  SSL PFLOPs     XLA FLOPs of the train step x schedule steps
  Memory (GB)    the device's peak memory; on a CPU (no device peak) XLA's static estimate of
                 the step's footprint, marked '*'
Metrics over seeds are reported as mean ± standard deviation (ddof 1). Where a row runs with its
':frozen' control, a second table answers Table 1's question seed by seed: pretraining's gain
over the random-init encoder on each column (positive = pretraining better), its mean over seeds
with a 95% t-interval (bold where the interval excludes 0), and the seeds pretraining won.
Writes <out_dir>/tables.md and tables.json and prints the tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Collection, Sequence
from typing import Any

from absl import app, flags
import numpy as np

from benchmarks import claims
from benchmarks import runs
from benchmarks.runs import (FINETUNE, FROZEN, REPO, TRANSFER, paired_summary,
                             report_path, run_command, run_dir, split_row)
from configs import common
from lemumo_jax import files
from lemumo_jax.evaluation import report

_CONFIG = flags.DEFINE_string('config', 'configs/synthetic.py', 'Dataset config file.')
_TABLE = flags.DEFINE_integer('table', None, "The rows of the paper's Table 1..6, in its order "
                              '(instead of --rows).', lower_bound=1, upper_bound=6)
_ROWS = flags.DEFINE_list('rows', ['lejepa_rgb', 'lidar_only', 'early_fusion', 'late_fusion',
                                   'lemumo'], "Paper rows (configs/common.py METHODS), each "
                          "optionally ':frozen', ':transfer' or ':finetune'.")
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'config.seed values; metrics are averaged over them.')
_OUT_DIR = flags.DEFINE_string('out_dir', 'runs/paper_tables', 'One workdir per run, + tables.')
_PROFILE = flags.DEFINE_bool('profile', True, 'Also run mode=profile for the compute columns.')
_CLAIMS = flags.DEFINE_bool(
    'claims', False, "Run what the paper's qualitative claims need (benchmarks/claims.py: its "
    "rows and the Figure 3 analysis) over --seeds (default 0-4) and write claims.md and "
    'claims.json: one line per claim, the paired mean gain, its 95% interval and a verdict.')
CLAIM_SEEDS = 5
_TRANSFER_FROM = flags.DEFINE_string(
    'transfer_from', None, "For ':transfer' / ':finetune' rows: the --out_dir of the runs that "
    'pretrained the encoders (it holds <row>_seed<seed>/encoder), e.g. a Waymo run of --table=3.')


# The paper's method names (its tables print JEPA as 'JEPa'; citations left out).
DISPLAY_NAMES = {
    'lejepa_rgb': 'LeJEPA', 'dinov3': 'DINOv3', 'lidar_only': 'LiDAR-only',
    'multimae_ss': 'MultiMAE-SS', 'multimae_mt': 'MultiMAE-MT', 'imagebind': 'ImageBind',
    'early_fusion': 'Early Fusion RGBD', 'late_fusion': 'Late Fusion',
    'lemumo_vicreg': 'FT-Pruned + VICReg', 'ft_persistent': 'FT-Persistent + SIGReg',
    'lemumo_3pass': 'FT-Pruned + SIGReg (3-pass)', 'lemumo': 'Le MuMo JEPA',
}
# Table 5's 'Setting' column.
SETTINGS = {'': 'Scratch', TRANSFER: 'Waymo → FLIR', FINETUNE: 'Fine-tune'}


@dataclasses.dataclass(frozen=True)
class Preset:
  """A paper table: its rows in the paper's order and the dataset config it was run on."""
  title: str
  rows: tuple[str, ...]
  config: str
  compute_only: bool = False   # Table 6: mode=profile only, no training


_T5_ROWS = ('multimae_ss', 'imagebind', 'lemumo',  # scratch (FLIR has no seg: no MultiMAE-MT)
            *(f'{row}{kind}' for kind in (TRANSFER, FINETUNE)
              for row in ('multimae_ss', 'multimae_mt', 'imagebind', 'lemumo')))
TABLES = {
    1: Preset('Table 1: single-modality encoders vs. encoder-frozen controls',
              ('lejepa_rgb', 'lejepa_rgb:frozen', 'lidar_only', 'lidar_only:frozen'),
              'configs/waymo.py'),
    2: Preset('Table 2: fusion variants',
              ('early_fusion', 'late_fusion', 'lemumo_vicreg', 'ft_persistent', 'lemumo_3pass',
               'lemumo'), 'configs/waymo.py'),
    3: Preset('Table 3: patch probes, all encoders from scratch',
              ('lejepa_rgb', 'dinov3', 'lidar_only', 'multimae_ss', 'multimae_mt', 'imagebind',
               'lemumo'), 'configs/waymo.py'),
    4: Preset('Table 4: nuScenes', ('multimae_ss', 'multimae_mt', 'imagebind', 'lemumo'),
              'configs/nuscenes.py'),
    5: Preset('Table 5: FLIR across training regimes', _T5_ROWS, 'configs/flir.py'),
    6: Preset('Table 6: encoder-side compute profile',
              ('multimae_ss', 'early_fusion', 'lejepa_rgb', 'imagebind', 'late_fusion', 'dinov3',
               'lemumo', 'lemumo_vicreg', 'multimae_mt', 'lemumo_3pass', 'ft_persistent'),
              'configs/waymo.py', compute_only=True),
}


def select_rows(rows: Sequence[str], from_preset: bool,
                known: Collection[str] | None = None) -> list[str]:
  """The rows to run. A preset's rows that this checkout does not define are skipped with a
  message; an unknown row asked for by name is a ValueError."""
  known = common.METHODS if known is None else known
  selected = []
  for row in rows:
    base, _ = split_row(row)
    if base in known:
      selected.append(row)
    elif from_preset:
      print(f'skipping {row}: no row {base!r} in configs/common.py METHODS', flush=True)
    else:
      raise ValueError(f'unknown row {base!r} (in --rows); choose from {sorted(known)}')
  return selected


def check_seeds(values: Sequence[str]) -> list[str]:
  """--seeds as distinct non-negative integers (they name run folders: nothing else may
  become a path)."""
  seeds = [str(v).strip() for v in values]
  bad = [s for s in seeds if not s.isdigit() or not s.isascii()]
  if bad or not seeds:
    raise ValueError(f'--seeds: {bad or seeds} are not non-negative integers (e.g. --seeds=0,1,2)')
  seeds = [str(int(s)) for s in seeds]
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'--seeds: {seeds} repeats a seed')
  return seeds


def display_name(row: str) -> str | None:
  base, kind = split_row(row)
  name = DISPLAY_NAMES.get(base)
  return f'{name} encoder frozen' if name and kind == FROZEN else name


def transfer_encoder(transfer_from: str, row: str, seed: str) -> str:
  """The exported encoder a ':transfer' / ':finetune' row starts from."""
  return os.path.join(run_dir(os.path.abspath(transfer_from), split_row(row)[0], seed),
                      'encoder')


def commands(config: str, row: str, seed: str, workdir: str, extra: Sequence[str],
             profile: bool, transfer_from: str | None = None,
             compute_only: bool = False) -> list[list[str]]:
  """The lemumo_jax.main invocations of one (row, seed)."""
  base, kind = split_row(row)
  regime = {TRANSFER: ',transfer', FINETUNE: ',finetune'}.get(kind, '')
  main = [sys.executable, '-m', 'lemumo_jax.main', f'--config={config}:{base}{regime}',
          f'--workdir={workdir}', f'--config.seed={seed}', *extra]
  if compute_only:
    return [main + ['--config.mode=profile']]
  if kind == FROZEN:
    return [main + ['--config.mode=probe', '--config.probe.encoder=random']]
  if kind in (TRANSFER, FINETUNE):
    if not transfer_from:
      raise ValueError(f'row {row} needs --transfer_from')
    encoder = transfer_encoder(transfer_from, row, seed)
    if kind == TRANSFER:
      return [main + ['--config.mode=probe', f'--config.probe.encoder_dir={encoder}']]
    return [main + ['--config.mode=finetune', f'--config.finetune.encoder_dir={encoder}']]
  calls = [main + ['--config.mode=pretrain_probe']]
  if profile:
    calls.append(main + ['--config.mode=profile'])
  return calls


def _mean_std(values: list[float]) -> tuple[float, float]:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  if not finite:
    return float('nan'), float('nan')
  return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def _cell(mean: float, std: float, digits: int, seeds: int) -> str:
  if not math.isfinite(mean):
    return 'n/a'
  return f'{mean:.{digits}f}' + (f' ± {std:.{digits}f}' if seeds > 1 else '')


def aggregate(out_dir: str, rows: Sequence[str], seeds: Sequence[str],
              compute_only: bool = False) -> dict[str, Any]:
  """Per row: paper name, setting, method, training data, per-column mean/std over seeds,
  compute columns (compute_only: those alone)."""
  table = []
  for row in rows:
    kind = split_row(row)[1]
    reports, profiles = [], []
    for seed in seeds:
      workdir = run_dir(out_dir, row, seed)
      if not compute_only:
        reports.append(report.read_report(report_path(workdir, row)))
      profile_path = os.path.join(workdir, 'profile.json')
      if kind == '' and os.path.exists(profile_path):
        with open(profile_path) as f:
          profiles.append(json.load(f))
    method = reports[0].method if reports else split_row(row)[0]
    entry = {'row': row, 'name': display_name(row) or method, 'setting': SETTINGS.get(kind, ''),
             'method': method, 'training_data': reports[0].training_data if reports else '',
             'seeds': list(seeds), 'metrics': {}, 'compute': {}}
    for column in report.columns_for(reports):
      values = [float(r.metrics.get(column.key, float('nan'))) * column.scale for r in reports]
      mean, std = _mean_std(values)
      entry['metrics'][column.title] = {'mean': mean, 'std': std, 'values': values}
    if profiles:
      memory = [p['peak_bytes'] if p['peak_bytes'] is not None else p['xla_memory_bytes']
                for p in profiles]
      entry['compute'] = {
          'Time (min)': _mean_std([p['time_min'] for p in profiles])[0],
          'SSL PFLOPs': _mean_std([p['ssl_pflops_total'] for p in profiles])[0],
          'Memory (GB)': _mean_std([m / 1e9 if m is not None else None for m in memory])[0],
          'memory_is_xla_estimate': profiles[0]['peak_bytes'] is None}
    table.append(entry)
  result = {'rows': table, 'seeds': list(seeds)}
  result['frozen_gaps'] = frozen_gaps(result)
  return result


_ALL_COLUMNS = {c.title: c for c in (*report.COLUMNS_3D, *report.COLUMNS_2D,
                                     *report.EXTRA_COLUMNS)}


def frozen_gaps(result: dict[str, Any]) -> list[dict[str, Any]]:
  """For every row aggregated together with its ':frozen' control: per metric column, the gain
  of pretraining over the random-init encoder, paired by seed and signed so that positive means
  pretraining is better (frozen - pretrained for a lower-is-better column). Each column gets
  the per-seed gains, their mean, a two-sided 95% t-interval of the mean (n - 1 degrees of
  freedom; none from one seed) and the number of seeds pretraining won. Seeds where either run
  lacks the metric are left out of that column."""
  by_row = {r['row']: r for r in result['rows']}
  gaps = []
  for row in result['rows']:
    control = by_row.get(f'{row["row"]}{FROZEN}') if split_row(row['row'])[1] == '' else None
    if control is None:
      continue
    columns = {}
    for title, pre in row['metrics'].items():
      if title not in control['metrics']:
        continue
      sign = 1.0 if _ALL_COLUMNS[title].higher_is_better else -1.0
      gains = [sign * (p - f) for p, f in zip(pre['values'], control['metrics'][title]['values'])
               if math.isfinite(p) and math.isfinite(f)]
      if gains:
        columns[title] = paired_summary(gains)
    gaps.append({'row': row['row'], 'name': row.get('name') or row['method'],
                 'columns': columns})
  return gaps


def _gap_cell(gap: dict[str, Any], digits: int) -> str:
  text = f'{gap["mean"]:+.{digits}f}'
  low, high = gap['ci95']
  if math.isfinite(low):
    text += f' [{low:+.{digits}f}, {high:+.{digits}f}]'
  text += f' {gap["wins"]}/{gap["seeds"]}'
  return f'**{text}**' if math.isfinite(low) and (low > 0 or high < 0) else text


def gaps_markdown(gaps: Sequence[dict[str, Any]]) -> str:
  """| Method | <columns> | with cells '+gain [95% interval] wins/seeds'."""
  titles = [t for t in _ALL_COLUMNS if any(t in g['columns'] for g in gaps)]
  if not titles:
    return ''
  lines = ['Pretrained vs. its encoder-frozen control, paired by seed: mean gain of pretraining '
           '(positive = better) [95% t-interval], seeds won. Bold: the interval excludes 0.', '',
           '| Method | ' + ' | '.join(titles) + ' |', '|---|' + '---:|' * len(titles)]
  for gap in gaps:
    cells = [_gap_cell(gap['columns'][t], _ALL_COLUMNS[t].digits) if t in gap['columns']
             else 'n/a' for t in titles]
    lines.append(f'| {gap["name"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def markdown(result: dict[str, Any]) -> str:
  """The table: [Setting (Table 5's regimes)], Method, [Training Data], metric columns (best
  bold, second underlined), [compute columns]; then a note on seeds."""
  rows, seeds = result['rows'], len(result['seeds'])
  columns = [c for c in (*report.COLUMNS_3D, *report.COLUMNS_2D)
             if any(c.title in r['metrics'] for r in rows)]
  compute = any(r['compute'] for r in rows)
  setting = any(r.get('setting', '') not in ('', SETTINGS['']) for r in rows)
  training_data = any(r['training_data'] for r in rows)
  header = ['Setting'] * setting + ['Method'] + ['Training Data'] * training_data
  text_columns = len(header)
  header += [c.title for c in columns]
  if compute:
    header += ['Time (min)', 'SSL PFLOPs', 'Memory (GB)']
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * text_columns + '---:|' * (len(header) - text_columns)]
  best = {}
  for c in columns:  # bold best, underline second best, as the paper does
    means = [(r['metrics'].get(c.title, {}).get('mean', float('nan')), i)
             for i, r in enumerate(rows)]
    ranked = sorted(((m if c.higher_is_better else -m), i) for m, i in means if math.isfinite(m))
    best[c.title] = {i: rank for rank, (_, i) in enumerate(reversed(ranked))}
  for i, r in enumerate(rows):
    cells = ([r.get('setting') or SETTINGS['']] * setting + [r.get('name') or r['method']]
             + [r['training_data']] * training_data)
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
  text = '\n'.join(lines) + '\n\n' + ' '.join(notes) + '\n'
  gaps = gaps_markdown(result.get('frozen_gaps', []))
  return text + ('\n' + gaps if gaps else '')


def _check_transfer_encoders(pending: Sequence[tuple[str, str]], transfer_from: str | None):
  """Exits with a message unless every pending ':transfer' / ':finetune' run has its encoder."""
  needs = [(row, seed) for row, seed in pending if split_row(row)[1] in (TRANSFER, FINETUNE)]
  if not needs:
    return
  if not transfer_from:
    raise SystemExit(f'rows {sorted({row for row, _ in needs})} start from encoders pretrained '
                     f'in other runs: pass --transfer_from=<the --out_dir of those runs> (it '
                     f'holds <row>_seed<seed>/encoder; e.g. a --table=3 --config=configs/waymo.py '
                     f'run)')
  encoders = dict.fromkeys(transfer_encoder(transfer_from, row, seed) for row, seed in needs)
  missing = [e for e in encoders if not os.path.exists(os.path.join(e, 'encoder_config.json'))]
  if missing:
    raise SystemExit(f'--transfer_from={transfer_from}: no exported encoder in '
                     f'{", ".join(missing)}; pretrain those rows with --out_dir={transfer_from} '
                     f'first')


def _check_finished_runs(finished: Sequence[tuple[str, str]], out_dir: str,
                         extra: Sequence[str], compute_only: bool) -> None:
  """Exits naming each finished run whose records say it was made otherwise than the table
  claims (another seed, schedule, row: a folder renamed or filled by hand), before anything
  runs. The pending ones are checked by lemumo_jax.main itself when it resumes them."""
  wrong = []
  for row, seed in finished:
    workdir = run_dir(out_dir, row, seed)
    try:
      cmd = commands(_CONFIG.value, row, seed, workdir, extra, False, _TRANSFER_FROM.value,
                     compute_only)[0]
    except ValueError:  # a ':transfer' row without --transfer_from: main names it
      continue
    config = runs.command_config(cmd)
    differences = runs.tabled_differences(workdir, row, config)
    profile_method = _profile_method(workdir)
    if profile_method not in (None, config.method):
      differences.append(f'profile.json: method: {profile_method!r} -> {config.method!r}')
    if differences:
      wrong.append(f'{workdir} ({"; ".join(differences)})')
  if wrong:
    raise SystemExit(f'finished run(s) hold other settings than this table would list them '
                     f'with (recorded -> claimed): {"; ".join(wrong)}. Remove them to rerun, '
                     f'or pass the arguments they were made with, or use another --out_dir')


def _profile_method(workdir: str) -> str | None:
  profile = files.read_json(os.path.join(workdir, 'profile.json'),
                            'it is the run\'s compute profile: rerun mode=profile')
  return profile.get('method') if profile else None


def main(argv):
  extra = [a for a in argv[1:] if a != '--']
  out_dir = os.path.abspath(_OUT_DIR.value)
  preset = TABLES.get(_TABLE.value) if _TABLE.value else None
  if sum([preset is not None, flags.FLAGS['rows'].present, _CLAIMS.value]) > 1:
    raise SystemExit('give one of --table, --rows and --claims')
  try:
    rows = select_rows(claims.ROWS if _CLAIMS.value else preset.rows if preset else _ROWS.value,
                       from_preset=preset is not None)
  except ValueError as e:
    raise SystemExit(str(e)) from e
  if not rows:
    raise SystemExit('no rows to run')
  compute_only = bool(preset and preset.compute_only)
  if preset:
    print(f'{preset.title}: {", ".join(rows)}', flush=True)
    if os.path.normpath(_CONFIG.value) != os.path.normpath(preset.config):
      print(f'(the paper ran this table with --config={preset.config}; running with '
            f'--config={_CONFIG.value})', flush=True)
  try:
    seeds = check_seeds(_SEEDS.value)
  except ValueError as e:
    raise SystemExit(str(e)) from e
  if _CLAIMS.value and not flags.FLAGS['seeds'].present:
    seeds = [str(s) for s in range(CLAIM_SEEDS)]
  if _CLAIMS.value:
    print(f'Claims: rows {", ".join(rows)}, seeds {", ".join(seeds)}', flush=True)

  def done(row, seed):
    workdir = run_dir(out_dir, row, seed)
    profiled = os.path.exists(os.path.join(workdir, 'profile.json'))
    if compute_only:
      return profiled
    needs_profile = _PROFILE.value and split_row(row)[1] == ''
    return os.path.exists(report_path(workdir, row)) and (profiled or not needs_profile)

  pending = [(row, seed) for row in rows for seed in seeds if not done(row, seed)]
  _check_transfer_encoders(pending, _TRANSFER_FROM.value)
  runs.check_free([run_dir(out_dir, row, seed) for row, seed in pending])
  _check_finished_runs([(row, seed) for row in rows for seed in seeds
                        if (row, seed) not in pending], out_dir, extra, compute_only)

  def made_with(row):
    transfer = split_row(row)[1] in (TRANSFER, FINETUNE)
    return runs.invocation(_CONFIG.value, extra, _TRANSFER_FROM.value if transfer else None)

  unrecorded = runs.check_invocations([(run_dir(out_dir, row, seed), made_with(row))
                                       for row in rows for seed in seeds])
  if unrecorded:
    print(f'{len(unrecorded)} run(s) predate the record of the arguments they were made with '
          f'({runs.INVOCATION_FILE}), so whether they match this call\'s is not checked: '
          f'{", ".join(os.path.basename(w) for w in unrecorded)}', flush=True)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  # Seed-major for the claims (every row of seed 0 first: a paired comparison grows by whole
  # seeds), row-major otherwise.
  order = ([(row, seed) for seed in seeds for row in rows] if _CLAIMS.value else
           [(row, seed) for row in rows for seed in seeds])
  for row, seed in order:
    workdir = run_dir(out_dir, row, seed)
    if (row, seed) not in pending:
      print(f'[{row} seed {seed}] done earlier: {workdir}', flush=True)
      continue
    runs.record_invocation(workdir, made_with(row))
    for cmd in commands(_CONFIG.value, row, seed, workdir, extra, _PROFILE.value,
                        _TRANSFER_FROM.value, compute_only):
      run_command(cmd, f'{row} seed {seed}', env)
  result = aggregate(out_dir, rows, seeds, compute_only)
  if preset:
    result['title'] = preset.title
  text = markdown(result)
  if preset:
    text = f'{preset.title}\n\n{text}'
  os.makedirs(out_dir, exist_ok=True)
  files.write_text_atomic(os.path.join(out_dir, 'tables.md'), text)
  files.write_text_atomic(os.path.join(out_dir, 'tables.json'), json.dumps(result, indent=2))
  print(text)
  print(f'Tables written to {out_dir}/tables.md and tables.json', flush=True)
  if _CLAIMS.value:
    print(claims.run_claims(_CONFIG.value, out_dir, seeds, extra, env))
    print(f'Claims written to {out_dir}/claims.md and claims.json', flush=True)


if __name__ == '__main__':
  app.run(main)
