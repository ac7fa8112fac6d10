"""benchmarks/claims.py: the paper's claims as paired seed-by-seed tests, against float64."""

import math

import numpy as np

from benchmarks import claims
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
  assert len([l for l in lines if l.startswith('| ') and 'Table' in l or 'Figure' in l]) >= len(
      claims.CLAIMS)
  assert '| Le MuMo JEPA beats LeJEPA (RGB) on Depth MAE | Table 3 | Depth MAE ↓ | '
  assert any('+0.000 [+0.000, +0.000], 0/4 seeds' in l for l in lines)
