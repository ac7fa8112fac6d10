"""The paper's qualitative claims (Tables 1-3, 6 and Figure 3) as paired, seed-by-seed tests.

`python -m benchmarks.paper_tables --claims` runs the rows below for every seed, the Figure 3
analysis (mode=analyze) of each seed's Le MuMo encoder against that seed's LeJEPA RGB encoder,
and then this module's `evaluate`, which reads nothing but the runs' own files:

  beats        row A is better than row B on a metric: the per-seed gains (signed by the
               metric's direction, positive = A better), their mean and two-sided 95%
               t-interval (n - 1 degrees of freedom). holds: the interval lies above 0;
               contradicted: below 0; tie: it straddles 0.
  within_noise row A is within seed noise of row B on every listed metric. The noise of a
               metric is the seed-to-seed spread of one run, pooled over the two rows:
               sqrt((s_A^2 + s_B^2) / 2), s the standard deviation (ddof 1) over the paired
               seeds. holds: every interval straddles 0 and every mean gain is within the
               noise; contradicted (naming the metric): an interval excludes 0; inconclusive
               (naming it): no interval excludes 0 but a mean gain exceeds the noise. With few
               seeds an interval straddles 0 whatever the gap, so the interval alone would
               call any gap noise.
  fraction     row A costs less than row B (SSL FLOPs of the whole schedule, profile.json):
               holds when A / B < 1 in every seed.
A verdict needs two seeds or more ('too few seeds' otherwise): no claim is read off one draw.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks import runs
from lemumo_jax import files
from lemumo_jax.evaluation import report

# Every row the claims read, each run as paper_tables runs it ('<row>:frozen': the random-init
# encoder-frozen control, probes only).
ROWS = ('lemumo', 'lemumo:frozen', 'lejepa_rgb', 'early_fusion', 'late_fusion', 'ft_persistent')
# The Figure 3 analysis: this row's encoder, with REFERENCE_ROW's (same seed) beside it.
ANALYSIS_ROW, REFERENCE_ROW = 'lemumo', 'lejepa_rgb'

_COLUMNS = {c.key: c for c in (*report.COLUMNS_3D, *report.EXTRA_COLUMNS)}
# Figure 3's numbers (analysis.json), higher is better.
ANALYSIS_METRICS = {'purity_10nn': '10-NN class purity (t-SNE)',
                    'planar_r2': 'planar depth R² (t-SNE)'}


@dataclasses.dataclass(frozen=True)
class Claim:
  text: str
  source: str                  # where the paper makes it
  kind: str                    # 'beats' | 'within_noise' | 'fraction'
  row: str
  versus: str
  metrics: tuple[str, ...] = ()  # report.json keys or ANALYSIS_METRICS keys


CLAIMS = (
    Claim('Le MuMo JEPA beats LeJEPA (RGB) on Depth MAE', 'Table 3', 'beats', 'lemumo',
          'lejepa_rgb', ('depth_MAE',)),
    Claim('Le MuMo JEPA beats LeJEPA (RGB) on mAP XY', 'Table 3', 'beats', 'lemumo',
          'lejepa_rgb', ('mAP_XY',)),
    Claim('Le MuMo JEPA beats LeJEPA (RGB) on mAP XZ', 'Table 3', 'beats', 'lemumo',
          'lejepa_rgb', ('mAP_XZ',)),
    Claim('Le MuMo JEPA beats LeJEPA (RGB) on Seg. mIoU', 'Table 3', 'beats', 'lemumo',
          'lejepa_rgb', ('seg_mIoU',)),
    Claim('Le MuMo JEPA beats its random-init frozen encoder on Depth MAE', 'Table 1',
          'beats', 'lemumo', 'lemumo:frozen', ('depth_MAE',)),
    Claim('Le MuMo JEPA beats its random-init frozen encoder on mAP XY', 'Table 1', 'beats',
          'lemumo', 'lemumo:frozen', ('mAP_XY',)),
    Claim('Le MuMo JEPA beats its random-init frozen encoder on Seg. mIoU', 'Table 1', 'beats',
          'lemumo', 'lemumo:frozen', ('seg_mIoU',)),
    Claim('Token fusion (Le MuMo JEPA) beats Early Fusion RGBD on Depth MAE', 'Table 2', 'beats',
          'lemumo', 'early_fusion', ('depth_MAE',)),
    Claim('Token fusion (Le MuMo JEPA) beats Late Fusion on Depth MAE', 'Table 2', 'beats',
          'lemumo', 'late_fusion', ('depth_MAE',)),
    Claim('Le MuMo JEPA beats Early Fusion RGBD on mAP XY', 'Table 2', 'beats', 'lemumo',
          'early_fusion', ('mAP_XY',)),
    Claim('Le MuMo JEPA beats Late Fusion on mAP XY', 'Table 2', 'beats', 'lemumo',
          'late_fusion', ('mAP_XY',)),
    Claim('FT-Pruned is within noise of FT-Persistent (mAP XY, Depth MAE, Seg. mIoU)',
          'Table 2', 'within_noise', 'lemumo', 'ft_persistent',
          ('mAP_XY', 'depth_MAE', 'seg_mIoU')),
    Claim('FT-Pruned costs a fraction of FT-Persistent\'s SSL FLOPs', 'Table 6', 'fraction',
          'lemumo', 'ft_persistent'),
    Claim('Le MuMo JEPA\'s fusion tokens have a higher 10-NN class purity than LeJEPA RGB '
          'patch tokens', 'Figure 3', 'beats', 'lemumo', 'lejepa_rgb', ('purity_10nn',)),
    Claim('Le MuMo JEPA\'s fusion tokens have a higher planar depth R² than LeJEPA RGB patch '
          'tokens', 'Figure 3', 'beats', 'lemumo', 'lejepa_rgb', ('planar_r2',)),
)


def metric_value(key: str, seed: str, row: str, reports: Mapping[tuple[str, str], Any],
                 analyses: Mapping[str, Any]) -> float:
  """One seed's value of a report metric (table units) or a Figure 3 number; nan if absent."""
  if key in ANALYSIS_METRICS:
    analysis = analyses.get(seed)
    if analysis is None:
      return float('nan')
    index = 0 if row == ANALYSIS_ROW else 1 if row == REFERENCE_ROW else None
    encoders = analysis['encoders']
    if index is None or index >= len(encoders):
      return float('nan')
    value = encoders[index].get(key)
  else:
    row_report = reports.get((row, seed))
    value = None if row_report is None else row_report.metrics.get(key)
    value = None if value is None else float(value) * _COLUMNS[key].scale
  return float('nan') if value is None else float(value)


def _pairs(claim: Claim, key: str, seeds, reports, analyses) -> np.ndarray:
  """(n, 2) float64: the claim's row and its comparison row on `key`, over the n seeds where
  both have a finite value."""
  pairs = [(metric_value(key, s, claim.row, reports, analyses),
            metric_value(key, s, claim.versus, reports, analyses)) for s in seeds]
  return np.asarray([(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)],
                    np.float64).reshape(-1, 2)


def seed_noise(pairs: np.ndarray) -> float:
  """The pooled seed std of the two rows of _pairs (within_noise); NaN under two seeds."""
  if len(pairs) < 2:
    return float('nan')
  return float(np.sqrt((np.var(pairs[:, 0], ddof=1) + np.var(pairs[:, 1], ddof=1)) / 2))


def _higher_is_better(key: str) -> bool:
  return key in ANALYSIS_METRICS or _COLUMNS[key].higher_is_better


def _paired(key: str, pairs: np.ndarray) -> dict[str, Any]:
  """runs.paired_summary of the row's gain over the comparison row, per seed (sign: better)."""
  sign = 1.0 if _higher_is_better(key) else -1.0
  return runs.paired_summary([float(g) for g in sign * (pairs[:, 0] - pairs[:, 1])])


def evaluate(claims: Sequence[Claim], seeds: Sequence[str],
             reports: Mapping[tuple[str, str], Any], profiles: Mapping[tuple[str, str], Any],
             analyses: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Each claim with its per-metric paired summaries and a verdict (module docstring).

  reports: {(row, seed): report.ReportRow}; profiles: {(row, seed): profile.json dict};
  analyses: {seed: analysis.json dict of ANALYSIS_ROW's run}.
  """
  out = []
  for claim in claims:
    entry = {'claim': claim.text, 'source': claim.source, 'kind': claim.kind, 'row': claim.row,
             'versus': claim.versus, 'metrics': {}}
    if claim.kind == 'fraction':
      ratios = [profiles[(claim.row, s)]['ssl_pflops_total']
                / profiles[(claim.versus, s)]['ssl_pflops_total']
                for s in seeds if (claim.row, s) in profiles and (claim.versus, s) in profiles]
      entry['ratios'] = ratios
      entry['seeds'] = len(ratios)
      if len(ratios) < 2:
        entry['verdict'] = 'too few seeds'
      else:
        entry['verdict'] = 'holds' if max(ratios) < 1 else 'contradicted'
      out.append(entry)
      continue
    pairs = {key: _pairs(claim, key, seeds, reports, analyses) for key in claim.metrics}
    summaries = {key: _paired(key, pairs[key]) for key in claim.metrics}
    entry['metrics'] = summaries
    entry['seeds'] = min(s['seeds'] for s in summaries.values())
    if entry['seeds'] < 2:
      entry['verdict'] = 'too few seeds'
    elif claim.kind == 'beats':
      (summary,) = summaries.values()
      low, high = summary['ci95']
      entry['verdict'] = 'holds' if low > 0 else 'contradicted' if high < 0 else 'tie'
    elif claim.kind == 'within_noise':
      for key, summary in summaries.items():
        summary['noise'] = seed_noise(pairs[key])
      outside = [k for k, s in summaries.items() if s['ci95'][0] > 0 or s['ci95'][1] < 0]
      beyond = [k for k, s in summaries.items() if not abs(s['mean']) <= s['noise']]
      if outside:
        entry['verdict'] = 'contradicted (' + ', '.join(
            f'{metric_title(k)}: {claim.row} {"better" if summaries[k]["mean"] > 0 else "worse"}'
            for k in outside) + ')'
      elif beyond:
        entry['verdict'] = 'inconclusive (' + ', '.join(
            f'{metric_title(k)}: mean gap {abs(summaries[k]["mean"]):.{_digits(k)}f} > seed '
            f'noise {summaries[k]["noise"]:.{_digits(k)}f}' for k in beyond) + ')'
      else:
        entry['verdict'] = 'holds'
    else:
      raise ValueError(f'claim {claim.text!r}: unknown kind {claim.kind!r}')
    out.append(entry)
  return out


def metric_title(key: str) -> str:
  return ANALYSIS_METRICS.get(key) or _COLUMNS[key].title


def _digits(key: str) -> int:
  return 3 if key in ANALYSIS_METRICS else _COLUMNS[key].digits


def _summary_cell(summary: dict[str, Any], digits: int) -> str:
  if not summary['seeds']:
    return 'n/a'
  text = f'{summary["mean"]:+.{digits}f}'
  low, high = summary['ci95']
  if math.isfinite(low):
    text += f' [{low:+.{digits}f}, {high:+.{digits}f}]'
  text += f', {summary["wins"]}/{summary["seeds"]} seeds'
  if 'noise' in summary and math.isfinite(summary['noise']):
    text += f', seed noise {summary["noise"]:.{digits}f}'
  return text


def markdown(results: Sequence[dict[str, Any]], schedule: str) -> str:
  """| Claim | Source | Measure | Paired gain [95% CI], seeds won | Verdict |."""
  lines = ['| Claim | Source | Measure | Paired gain of the first row [95% CI], seeds won | '
           'Verdict |', '|---|---|---|---|---|']
  for r in results:
    if r['kind'] == 'fraction':
      ratios = r['ratios']
      cell = (f'{claim_rows(r)} SSL FLOPs ratio {min(ratios):.3f}' +
              (f'–{max(ratios):.3f}' if max(ratios) > min(ratios) + 5e-4 else '')
              + f' ({len(ratios)} seeds)') if ratios else 'n/a'
      lines.append(f'| {r["claim"]} | {r["source"]} | SSL PFLOPs | {cell} | {r["verdict"]} |')
      continue
    measures = '; '.join(metric_title(k) for k in r['metrics'])
    cells = '; '.join(_summary_cell(s, _digits(k)) for k, s in r['metrics'].items())
    lines.append(f'| {r["claim"]} | {r["source"]} | {measures} | {cells} | {r["verdict"]} |')
  return ('\n'.join(lines) + '\n\n' + schedule + '\n\nGains are signed by the measure\'s '
          'direction (positive = the claim\'s first row is better); interval: two-sided 95% '
          't-interval of the mean over the paired seeds. holds / contradicted: the interval '
          'excludes 0 on the claimed / the opposite side; tie: it straddles 0. A within-noise '
          'claim holds when every interval straddles 0 and every mean gap is within the seed '
          'noise (the pooled seed std of the two rows); it is inconclusive when no interval '
          'excludes 0 but a gap exceeds the noise.\n')


def claim_rows(result: dict[str, Any]) -> str:
  return f'{result["row"]} / {result["versus"]}'


# ------------------------------------------------------------------------- running them


def analysis_path(out_dir: str, seed: str) -> str:
  return os.path.join(runs.run_dir(out_dir, ANALYSIS_ROW, seed), 'analysis',
                      'analysis.json')


def analyze_command(config: str, out_dir: str, seed: str, extra: Sequence[str]) -> list[str]:
  """mode=analyze (Figure 3) on a seed's ANALYSIS_ROW encoder with REFERENCE_ROW's beside it."""
  reference = os.path.join(runs.run_dir(out_dir, REFERENCE_ROW, seed), 'encoder')
  return [sys.executable, '-m', 'lemumo_jax.main', f'--config={config}:{ANALYSIS_ROW}',
          f'--workdir={runs.run_dir(out_dir, ANALYSIS_ROW, seed)}',
          f'--config.seed={seed}', *extra, '--config.mode=analyze',
          f'--config.analyze.reference_dir={reference}']


def schedule_note(out_dir: str, config: str, seeds: Sequence[str]) -> str:
  """What the claims were measured on: config, SSL and probe schedules (from the first seed's
  Le MuMo run), seeds, the commits that made the runs and the one evaluating them."""
  workdir = runs.run_dir(out_dir, ANALYSIS_ROW, seeds[0])
  with open(os.path.join(workdir, 'config.json')) as f:
    cfg = json.load(f)
  with open(runs.report_path(workdir, ANALYSIS_ROW)) as f:
    details = json.load(f).get('details', {})
  train, data = cfg['train'], cfg['data']
  ssl_steps = (train['num_steps'] if train['num_steps'] > 0 else
               train['num_epochs'] * (data['num_train'] // train['batch_size']))
  made = {}  # commit -> runs, from each run's record (runs.record_invocation)
  for row in ROWS:
    for seed in seeds:
      record = runs.read_invocation(runs.run_dir(out_dir, row, seed)) or {}
      for commit in record.get('commits') or ['']:
        made[commit] = made.get(commit, 0) + 1
  provenance = ', '.join(f'{n} at commit {c}' if c else f'{n} made before runs recorded theirs'
                         for c, n in sorted(made.items()))
  return (f'Measured with --config={config}; runs: {provenance}; claims evaluated at commit '
          f'{runs.git_commit()}; seeds {", ".join(seeds)} '
          f'(paired: every run of a seed has config.seed=<seed>). SSL: {ssl_steps} steps of '
          f'batch {train["batch_size"]} on {data["num_train"]} scenes of '
          f'{data["image_size"][0]}x{data["image_size"][1]} (model width '
          f'{cfg["model"]["width"]}, depth {cfg["model"]["depth"]}); probes: '
          f'{details.get("total_steps", "?")} steps of batch {cfg["probe"]["batch_size"]}, '
          f'validated on {details.get("val_frames", "?")} frames; Figure 3 numbers from '
          f'mode=analyze.')


def _analysed_encoders(out_dir: str, seed: str) -> list[str] | None:
  """The encoder dirs a seed's analysis.json compared, or None when there is none."""
  path = analysis_path(out_dir, seed)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return [e.get('encoder_dir') for e in json.load(f)['encoders']]


def run_claims(config: str, out_dir: str, seeds: Sequence[str], extra: Sequence[str],
               env: Mapping[str, str]) -> str:
  """After paper_tables has run ROWS for every seed: the Figure 3 analyses (run again where an
  analysis.json is missing or compared other encoders than the seed's ANALYSIS_ROW and
  REFERENCE_ROW ones, e.g. a mode=analyze run by hand), then <out_dir>/claims.md and
  claims.json; returns the markdown."""
  for seed in seeds:
    want = [os.path.join(runs.run_dir(out_dir, row, seed), 'encoder')
            for row in (ANALYSIS_ROW, REFERENCE_ROW)]
    found = _analysed_encoders(out_dir, seed)
    if found != want:
      if found is not None:
        print(f'[analyze seed {seed}] {analysis_path(out_dir, seed)} compared {found}, not '
              f'{want}: analysing again', flush=True)
      runs.run_command(analyze_command(config, out_dir, seed, extra), f'analyze seed {seed}',
                       env)
  reports, profiles, analyses = {}, {}, {}
  for row in ROWS:
    for seed in seeds:
      workdir = runs.run_dir(out_dir, row, seed)
      reports[(row, seed)] = report.read_report(runs.report_path(workdir, row))
      profile_path = os.path.join(workdir, 'profile.json')
      if os.path.exists(profile_path):
        with open(profile_path) as f:
          profiles[(row, seed)] = json.load(f)
  for seed in seeds:
    with open(analysis_path(out_dir, seed)) as f:
      analyses[seed] = json.load(f)
  results = evaluate(CLAIMS, seeds, reports, profiles, analyses)
  text = markdown(results, schedule_note(out_dir, config, seeds))
  files.write_text_atomic(os.path.join(out_dir, 'claims.md'), text)
  files.write_text_atomic(os.path.join(out_dir, 'claims.json'),
                           json.dumps({'seeds': list(seeds), 'claims': results}, indent=2))
  return text
