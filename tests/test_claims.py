"""benchmarks/claims.py: the paper's claims as paired seed-by-seed tests, against float64."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import claims, runs
from conftest import REPO, TINY_FLAGS, TINY_PROBE_FLAGS
from lemumo_jax.evaluation import report

T_975 = {1: 12.706204736174694, 2: 4.302652729749462, 3: 3.182446305284263,
         4: 2.7764451051977987}


def interval(gains):
  g = np.asarray(gains, np.float64)
  n = len(g)
  mean = g.sum() / n
  half = T_975[n - 1] * math.sqrt(((g - mean) ** 2).sum() / (n - 1)) / math.sqrt(n)
  return mean, mean - half, mean + half


def _reports(values):
  """{row: {metric: [per seed]}} -> {(row, seed): ReportRow} (metrics as fractions)."""
  out = {}
  for row, metrics in values.items():
    for i in range(len(next(iter(metrics.values())))):
      out[(row, str(i))] = report.ReportRow(row, 'RGB', {k: v[i] for k, v in metrics.items()})
  return out


SEEDS = ['0', '1', '2', '3']


def test_beats_signs_by_direction_and_gives_each_verdict():
  reports = _reports({
      'lemumo': {'depth_MAE': [2.0, 2.1, 1.9, 2.0], 'mAP_XY': [0.050, 0.040, 0.045, 0.052],
                 'seg_mIoU': [0.20, 0.21, 0.19, 0.20]},
      'lejepa_rgb': {'depth_MAE': [3.0, 3.2, 2.8, 3.1], 'mAP_XY': [0.048, 0.044, 0.041, 0.050],
                     'seg_mIoU': [0.25, 0.26, 0.24, 0.25]}})
  table = [claims.Claim('depth', 'T3', 'beats', 'lemumo', 'lejepa_rgb', ('depth_MAE',)),
           claims.Claim('xy', 'T3', 'beats', 'lemumo', 'lejepa_rgb', ('mAP_XY',)),
           claims.Claim('seg', 'T3', 'beats', 'lemumo', 'lejepa_rgb', ('seg_mIoU',))]
  results = claims.evaluate(table, SEEDS, reports, {}, {})
  assert [r['verdict'] for r in results] == ['holds', 'tie', 'contradicted']
  # Depth MAE is lower-is-better: the gain is lejepa - lemumo, in metres.
  depth = results[0]['metrics']['depth_MAE']
  np.testing.assert_allclose(depth['gains'], [1.0, 1.1, 0.9, 1.1], atol=1e-12)
  mean, low, high = interval([1.0, 1.1, 0.9, 1.1])
  np.testing.assert_allclose([depth['mean'], *depth['ci95']], [mean, low, high], atol=1e-9)
  # mAP XY in table units (percent).
  xy = results[1]['metrics']['mAP_XY']
  np.testing.assert_allclose(xy['gains'], [0.2, -0.4, 0.4, 0.2], atol=1e-9)
  assert xy['wins'] == 3 and xy['seeds'] == 4
  assert results[2]['metrics']['seg_mIoU']['mean'] < 0


def test_missing_seeds_are_left_out_and_one_seed_gives_no_verdict():
  reports = _reports({'lemumo': {'depth_MAE': [2.0, float('nan'), 1.0, 2.0]},
                      'early_fusion': {'depth_MAE': [3.0, 3.0, 3.0, 3.0]}})
  claim = claims.Claim('d', 'T2', 'beats', 'lemumo', 'early_fusion', ('depth_MAE',))
  (result,) = claims.evaluate([claim], SEEDS, reports, {}, {})
  assert result['metrics']['depth_MAE']['gains'] == [1.0, 2.0, 1.0]
  assert result['seeds'] == 3
  (one,) = claims.evaluate([claim], ['0'], reports, {}, {})
  assert one['verdict'] == 'too few seeds' and one['seeds'] == 1


def test_within_noise_and_fraction():
  reports = _reports({
      'lemumo': {'mAP_XY': [0.05, 0.06, 0.04, 0.05], 'depth_MAE': [2.0, 2.0, 2.0, 2.0]},
      'ft_persistent': {'mAP_XY': [0.06, 0.05, 0.05, 0.04], 'depth_MAE': [1.5, 1.6, 1.4, 1.5]}})
  claim = claims.Claim('n', 'T2', 'within_noise', 'lemumo', 'ft_persistent',
                       ('mAP_XY', 'depth_MAE'))
  (result,) = claims.evaluate([claim], SEEDS, reports, {}, {})
  assert result['verdict'] == 'contradicted (Depth MAE ↓: lemumo worse)'
  (xy_only,) = claims.evaluate([claims.Claim('n', 'T2', 'within_noise', 'lemumo', 'ft_persistent',
                                             ('mAP_XY',))], SEEDS, reports, {}, {})
  assert xy_only['verdict'] == 'holds'
  # No interval excludes 0, but the mean gap (0.5 m) is bigger than one seed's spread: the
  # interval alone would call it noise.
  reports = _reports({'lemumo': {'depth_MAE': [1.0, 1.6, 1.0, 1.6]},
                      'ft_persistent': {'depth_MAE': [2.1, 1.5, 2.1, 1.5]}})
  depth = claims.Claim('n', 'T2', 'within_noise', 'lemumo', 'ft_persistent', ('depth_MAE',))
  (result,) = claims.evaluate([depth], SEEDS, reports, {}, {})
  summary = result['metrics']['depth_MAE']
  mean, low, high = interval([1.1, -0.1, 1.1, -0.1])
  np.testing.assert_allclose([summary['mean'], *summary['ci95']], [mean, low, high], atol=1e-9)
  assert low < 0 < high
  a, b = np.array([1.0, 1.6, 1.0, 1.6]), np.array([2.1, 1.5, 2.1, 1.5])
  noise = math.sqrt((((a - a.mean()) ** 2).sum() / 3 + ((b - b.mean()) ** 2).sum() / 3) / 2)
  np.testing.assert_allclose(summary['noise'], noise, rtol=1e-12)
  assert result['verdict'] == f'inconclusive (Depth MAE ↓: mean gap 0.500 > seed noise {noise:.3f})'
  assert 'seed noise 0.346' in claims.markdown([result], 'S.')
  # The same gap inside a wider spread is noise.
  reports = _reports({'lemumo': {'depth_MAE': [1.0, 2.6, 1.0, 2.6]},
                      'ft_persistent': {'depth_MAE': [3.1, 1.5, 3.1, 1.5]}})
  (result,) = claims.evaluate([depth], SEEDS, reports, {}, {})
  assert result['verdict'] == 'holds' and result['metrics']['depth_MAE']['noise'] > 0.5
  profiles = {(row, s): {'ssl_pflops_total': flops} for s in SEEDS
              for row, flops in (('lemumo', 2.0), ('ft_persistent', 5.0))}
  fraction = claims.Claim('f', 'T6', 'fraction', 'lemumo', 'ft_persistent')
  (result,) = claims.evaluate([fraction], SEEDS, {}, profiles, {})
  assert result['verdict'] == 'holds' and result['ratios'] == [0.4] * 4
  (reverse,) = claims.evaluate([claims.Claim('f', 'T6', 'fraction', 'ft_persistent', 'lemumo')],
                               SEEDS, {}, profiles, {})
  assert reverse['verdict'] == 'contradicted'


def test_figure3_claims_read_the_analysis_encoders_in_order():
  analyses = {s: {'encoders': [{'purity_10nn': 0.5 + 0.01 * i, 'planar_r2': 0.3},
                               {'purity_10nn': 0.4, 'planar_r2': 0.3 + 0.01 * (i % 2)}]}
              for i, s in enumerate(SEEDS)}
  table = [c for c in claims.CLAIMS if c.source == 'Figure 3']
  assert [c.metrics for c in table] == [('purity_10nn',), ('planar_r2',)]
  purity, r2 = claims.evaluate(table, SEEDS, {}, {}, analyses)
  np.testing.assert_allclose(purity['metrics']['purity_10nn']['gains'],
                             [0.1, 0.11, 0.12, 0.13], atol=1e-12)
  assert purity['verdict'] == 'holds'
  np.testing.assert_allclose(r2['metrics']['planar_r2']['gains'], [0, -0.01, 0, -0.01],
                             atol=1e-12)
  assert r2['verdict'] == 'tie'


def test_every_claim_names_known_rows_and_metrics_and_renders():
  for claim in claims.CLAIMS:
    assert claim.row in claims.ROWS and claim.versus in claims.ROWS, claim
    for key in claim.metrics:
      assert claims.metric_title(key)
  reports = _reports({row: {'mAP_XY': [0.05] * 4, 'depth_MAE': [2.0] * 4, 'mAP_XZ': [0.1] * 4,
                            'seg_mIoU': [0.2] * 4} for row in claims.ROWS})
  profiles = {(row, s): {'ssl_pflops_total': 1.0} for row in claims.ROWS for s in SEEDS}
  analyses = {s: {'encoders': [{'purity_10nn': 0.5, 'planar_r2': 0.4}] * 2} for s in SEEDS}
  results = claims.evaluate(claims.CLAIMS, SEEDS, reports, profiles, analyses)
  text = claims.markdown(results, 'Schedule.')
  lines = text.splitlines()
  assert lines[0].startswith('| Claim | Source | Measure |')
  body = [l for l in lines[2:] if l.startswith('| ')]
  assert len(body) == len(claims.CLAIMS)
  assert body[0].startswith('| Le MuMo JEPA beats LeJEPA (RGB) on Depth MAE | Table 3 | '
                            'Depth MAE ↓ | +0.000 [+0.000, +0.000], 0/4 seeds | tie |')
  assert any('+0.000 [+0.000, +0.000], 0/4 seeds' in l for l in lines)


def _write_json(path, payload):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(payload, f)


def test_run_claims_reads_the_runs_and_analyses_missing_figure3(tmp_path, monkeypatch):
  """run_claims on an --out_dir of finished runs: the analysis of a seed whose analysis.json
  compared other encoders is run again (the command names that seed's Le MuMo workdir and
  LeJEPA RGB encoder), then claims.md and claims.json come from the runs' own files."""
  out_dir, seeds = str(tmp_path), ['0', '1']
  for seed in seeds:
    for row in claims.ROWS:
      workdir = runs.run_dir(out_dir, row, seed)
      _write_json(runs.report_path(workdir, row), {
          'method': row, 'training_data': 'RGB+Depth', 'details': {
              'total_steps': 2048, 'val_frames': 256},
          'metrics': {'mAP_XY': 0.03 + 0.01 * (row == 'lemumo'), 'depth_MAE': 8.0 - int(seed),
                      'mAP_XZ': 0.07, 'seg_mIoU': 0.2}})
      if not row.endswith(':frozen'):
        _write_json(os.path.join(workdir, 'profile.json'), {'ssl_pflops_total': 1.0 + (
            row == 'ft_persistent')})
    _write_json(os.path.join(runs.run_dir(out_dir, 'lemumo', seed), 'config.json'), {
        'data': {'num_train': 2048, 'image_size': [96, 128]}, 'model': {'width': 96, 'depth': 4},
        'train': {'batch_size': 32, 'num_epochs': 4, 'num_steps': 0},
        'probe': {'batch_size': 32}})
  def encoder(row, seed):
    return os.path.join(runs.run_dir(out_dir, row, seed), 'encoder')

  _write_json(claims.analysis_path(out_dir, '0'),
              {'encoders': [{'purity_10nn': 0.5, 'planar_r2': 0.4,
                             'encoder_dir': encoder('lemumo', '0')},
                            {'purity_10nn': 0.4, 'planar_r2': 0.3,
                             'encoder_dir': encoder('lejepa_rgb', '0')}]})
  # Seed 1's analysis compared another reference (a mode=analyze run by hand): run again.
  _write_json(claims.analysis_path(out_dir, '1'),
              {'encoders': [{'purity_10nn': 0.9, 'planar_r2': 0.9,
                             'encoder_dir': encoder('lemumo', '1')},
                            {'purity_10nn': 0.1, 'planar_r2': 0.1,
                             'encoder_dir': encoder('early_fusion', '1')}]})
  ran = []

  def fake_run(cmd, label, env):
    ran.append(cmd)
    _write_json(claims.analysis_path(out_dir, '1'),
                {'encoders': [{'purity_10nn': 0.52, 'planar_r2': 0.38,
                               'encoder_dir': encoder('lemumo', '1')},
                              {'purity_10nn': 0.41, 'planar_r2': 0.31,
                               'encoder_dir': encoder('lejepa_rgb', '1')}]})

  monkeypatch.setattr(runs, 'run_command', fake_run)
  text = claims.run_claims('configs/synthetic.py', out_dir, seeds, ['--config.data.num_val=8'],
                           {})
  (cmd,) = ran
  assert cmd[3:] == ['--config=configs/synthetic.py:lemumo',
                     f'--workdir={runs.run_dir(out_dir, "lemumo", "1")}', '--config.seed=1',
                     '--config.data.num_val=8', '--config.mode=analyze',
                     '--config.analyze.reference_dir='
                     f'{os.path.join(runs.run_dir(out_dir, "lejepa_rgb", "1"), "encoder")}']
  with open(tmp_path / 'claims.json') as f:
    payload = json.load(f)
  assert payload['seeds'] == seeds and len(payload['claims']) == len(claims.CLAIMS)
  by_text = {c['claim']: c for c in payload['claims']}
  xy = by_text['Le MuMo JEPA beats LeJEPA (RGB) on mAP XY']
  np.testing.assert_allclose(xy['metrics']['mAP_XY']['gains'], [1.0, 1.0], atol=1e-9)
  assert xy['verdict'] == 'holds' and by_text[
      'Le MuMo JEPA beats LeJEPA (RGB) on Depth MAE']['verdict'] == 'tie'
  assert by_text["FT-Pruned costs a fraction of FT-Persistent's SSL FLOPs"]['ratios'] == [0.5, 0.5]
  np.testing.assert_allclose(by_text[claims.CLAIMS[-2].text]['metrics']['purity_10nn']['gains'],
                             [0.1, 0.11], atol=1e-12)
  assert (tmp_path / 'claims.md').read_text() == text
  assert 'SSL: 256 steps of batch 32 on 2048 scenes of 96x128' in text
  assert 'probes: 2048 steps of batch 32, validated on 256 frames' in text


@pytest.mark.slow
def test_claims_command_end_to_end(python_env, tmp_path):
  """`paper_tables --claims` at the tiny size with one seed: every row runs seed-major, the
  Figure 3 analysis runs on the seed's Le MuMo and LeJEPA RGB encoders, and claims.md/json hold
  every claim ('too few seeds': no verdict from one draw); the tables (every run's report, the
  compute profile, the encoder-frozen gap) are written beside them; a rerun runs nothing
  again, and `--rows` over the same out_dir tabulates the finished runs it names."""
  tail = ['--', *TINY_FLAGS, *TINY_PROBE_FLAGS,
          '--config.profile.warmup_steps=1', '--config.profile.timed_steps=1',
          '--config.analyze.num_points=100', '--config.analyze.perplexity=10',
          '--config.analyze.max_iter=250',
          # Not what the claims read: the robustness passes and the figure.
          '--config.probe.robustness=()', '--config.probe.num_figure_frames=0']
  cmd = [sys.executable, '-m', 'benchmarks.paper_tables', '--claims', '--seeds=0',
         f'--out_dir={tmp_path}', *tail]
  proc = subprocess.run(cmd, cwd=REPO, env=python_env, capture_output=True, text=True,
                        timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  commit = runs.git_commit()
  started = [l.split(']')[0] + ']' for l in proc.stdout.splitlines() if l.startswith('[')]
  assert started[:2] == ['[lemumo seed 0]', '[lemumo seed 0]']  # pretrain_probe, profile
  assert '[analyze seed 0]' in started
  analysis = json.loads((tmp_path / 'lemumo_seed0' / 'analysis' / 'analysis.json').read_text())
  assert [e['role'] for e in analysis['encoders']] == ['row', 'reference']
  assert analysis['encoders'][1]['encoder_dir'] == str(tmp_path / 'lejepa_rgb_seed0' / 'encoder')
  payload = json.loads((tmp_path / 'claims.json').read_text())
  assert [c['claim'] for c in payload['claims']] == [c.text for c in claims.CLAIMS]
  assert {c['verdict'] for c in payload['claims']} == {'too few seeds'}
  by_kind = {c['kind']: c for c in payload['claims']}
  assert len(by_kind['fraction']['ratios']) == 1 and 0 < by_kind['fraction']['ratios'][0] < 1
  purity = payload['claims'][-2]['metrics']['purity_10nn']
  np.testing.assert_allclose(purity['gains'], [analysis['encoders'][0]['purity_10nn']
                                               - analysis['encoders'][1]['purity_10nn']])
  text = (tmp_path / 'claims.md').read_text()
  assert (f'Measured with --config=configs/synthetic.py; runs: {len(claims.ROWS)} at commit '
          f'{commit}; claims evaluated at commit {commit}; seeds 0') in text
  _check_tables(json.loads((tmp_path / 'tables.json').read_text()), len(claims.ROWS))
  for row in claims.ROWS:  # the arguments and commit every run was made with
    assert runs.read_invocation(runs.run_dir(str(tmp_path), row, '0')) == dict(
        runs.invocation('configs/synthetic.py', tail[1:]), commits=[commit])
  again = subprocess.run(cmd, cwd=REPO, env=python_env, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('done earlier') == len(claims.ROWS)
  assert '[analyze seed 0]' not in again.stdout
  rows = subprocess.run([sys.executable, '-m', 'benchmarks.paper_tables',
                         '--rows=lemumo,lemumo:frozen', '--seeds=0', f'--out_dir={tmp_path}',
                         *tail], cwd=REPO, env=python_env, capture_output=True, text=True,
                        timeout=600)
  assert rows.returncode == 0 and rows.stdout.count('done earlier') == 2, rows.stderr[-3000:]
  _check_tables(json.loads((tmp_path / 'tables.json').read_text()), 2)
  table = (tmp_path / 'tables.md').read_text()
  assert 'Pretrained vs. its encoder-frozen control' in table
  assert table.startswith('| Method | Training Data | mAP XY ↑ | Depth MAE ↓ | mAP XZ ↑ | '
                          'Seg. mIoU ↑ | Time (min) | SSL PFLOPs | Memory (GB) |')


def _check_tables(result, num_rows):
  """tables.json of runs that include lemumo and lemumo:frozen (seed 0)."""
  assert len(result['rows']) == num_rows
  by_method = {r['method']: r for r in result['rows']}
  fused, frozen = by_method['lemumo'], by_method['lemumo encoder frozen']
  assert fused['training_data'] == frozen['training_data'] == 'RGB+Depth'
  assert {'mAP XY ↑', 'Depth MAE ↓', 'mAP XZ ↑', 'Seg. mIoU ↑'} <= set(fused['metrics'])
  assert 0 < fused['metrics']['Depth MAE ↓']['mean'] < 80
  assert 0 < frozen['metrics']['Depth MAE ↓']['mean'] < 80
  assert fused['compute']['SSL PFLOPs'] > 0 and fused['compute']['Time (min)'] > 0
  assert frozen['compute'] == {}
  [gap] = result['frozen_gaps']
  assert gap['row'] == 'lemumo' and gap['columns']['Depth MAE ↓']['seeds'] == 1
  np.testing.assert_allclose(gap['columns']['Depth MAE ↓']['gains'],
                             [frozen['metrics']['Depth MAE ↓']['mean']
                              - fused['metrics']['Depth MAE ↓']['mean']], atol=1e-9)
