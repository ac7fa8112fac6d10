"""Figure 3's patch-embedding analysis (mode=analyze): purity, permuted baseline, planar R^2 and
the patch targets against float64 loops and sklearn; the mode end to end with a reference
encoder (files, determinism) and its errors."""

import collections
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, TINY_FLAGS, TINY_PROBE_FLAGS, tiny_config
from lemumo_jax import modes
from lemumo_jax.data.schema import IGNORE_LABEL
from lemumo_jax.evaluation import embedding_analysis as ea
from lemumo_jax.models import encoders
from lemumo_jax.training import analyze
from lemumo_jax.training import state as state_lib

# ----------------------------------------------------------------------------- statistics


def _brute_force_purity(coords, labels, k):
  n = len(coords)
  total = 0.0
  for i in range(n):
    dist = sorted((float(np.sum((coords[i] - coords[j])**2)), j) for j in range(n) if j != i)
    total += sum(labels[j] == labels[i] for _, j in dist[:k]) / k
  return total / n


@pytest.mark.parametrize('k,chunk', [(10, 256), (3, 7)])
def test_knn_class_purity_matches_a_brute_force_loop(k, chunk):
  rng = np.random.default_rng(k)
  coords = rng.normal(size=(80, 2)) * [3.0, 1.0]  # continuous: no tied distances
  labels = rng.integers(0, 4, size=80)
  coords[labels == 0] += 4.0  # one class clustered apart: purity well above chance
  want = _brute_force_purity(coords, labels, k)
  assert ea.knn_class_purity(coords, labels, k=k, chunk=chunk) == pytest.approx(want, abs=1e-12)
  assert ea.knn_class_purity(coords, np.zeros(80, int), k=k) == 1.0
  with pytest.raises(ValueError, match='more than k points'):
    ea.knn_class_purity(coords[:k], labels[:k], k=k)


def test_permuted_purity_averages_fixed_seed_permutations():
  rng = np.random.default_rng(0)
  coords, labels = rng.normal(size=(60, 2)), rng.integers(0, 3, size=60)
  perms = np.random.default_rng(5)
  want = np.mean([_brute_force_purity(coords, perms.permutation(labels), 10) for _ in range(3)])
  got = ea.permuted_purity(coords, labels, num_permutations=3, seed=5)
  assert got == pytest.approx(want, abs=1e-12)
  assert ea.permuted_purity(coords, labels, seed=5) == ea.permuted_purity(coords, labels, seed=5)


def test_planar_r2_matches_sklearn():
  from sklearn.linear_model import LinearRegression  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  coords = rng.normal(size=(200, 2)) * 10
  values = 3.0 + 0.5 * coords[:, 0] - 0.2 * coords[:, 1] + rng.normal(size=200) * 4
  want = LinearRegression().fit(coords, values).score(coords, values)
  assert ea.planar_r2(coords, values) == pytest.approx(want, abs=1e-12)
  assert ea.planar_r2(coords, 2.0 * coords[:, 0] + 1.0) == pytest.approx(1.0, abs=1e-12)
  with pytest.raises(ValueError, match='constant'):
    ea.planar_r2(coords, np.full(200, 7.0))


# --------------------------------------------------------------------------- patch targets


def test_patch_majority_class_and_mean_depth_match_loops():
  rng = np.random.default_rng(2)
  grid, (ph, pw), num_classes = (3, 4), (4, 2), 5
  labels = rng.integers(0, num_classes, size=(2, 12, 8)).astype(np.uint8)
  labels[rng.uniform(size=labels.shape) < 0.3] = IGNORE_LABEL
  labels[0, :4, :2] = IGNORE_LABEL                      # patch (0, 0) of frame 0: no label
  labels[1, :4, 2:4] = [[1, 2]] * 4                     # a 4-4 tie: the smaller class wins
  depth = rng.uniform(2, 60, size=(2, 12, 8)) * (rng.uniform(size=(2, 12, 8)) < 0.4)
  depth[1, 4:8, 6:8] = 0.0                              # patch (1, 3) of frame 1: no return
  classes = ea.patch_majority_class(labels, grid, num_classes)
  mean_depth = ea.patch_mean_depth(depth, grid)
  assert classes.shape == mean_depth.shape == (2, 3, 4)
  for b in range(2):
    for i in range(3):
      for j in range(4):
        block = labels[b, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].reshape(-1)
        counts = collections.Counter(int(v) for v in block if v != IGNORE_LABEL)
        best = max(counts.values(), default=0)
        want = min(c for c, n in counts.items() if n == best) if counts else -1
        assert classes[b, i, j] == want, (b, i, j)
        values = [float(v) for v in depth[b, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].reshape(-1)
                  if v > 0]
        assert mean_depth[b, i, j] == pytest.approx(sum(values) / len(values) if values else 0.0,
                                                    abs=1e-12)
  assert classes[0, 0, 0] == -1 and classes[1, 0, 1] == 1 and mean_depth[1, 1, 3] == 0.0
  with pytest.raises(ValueError, match=r'label map is 12x8, not a whole number'):
    ea.patch_majority_class(labels, (5, 4), num_classes)
  with pytest.raises(ValueError, match='depth map is 12x8'):
    ea.patch_mean_depth(depth, (3, 3))
  with pytest.raises(ValueError, match=r'labels outside \[0, 3\)'):
    ea.patch_majority_class(labels, grid, 3)


def test_bottom_k_sample_keeps_the_smallest_priorities_in_arrival_order():
  rng = np.random.default_rng(3)
  priorities = [rng.random(n) for n in (5, 0, 9, 4)]
  sample = ea.BottomKSample(6)
  start = 0
  for p in priorities:
    sample.add(p, item=np.arange(start, start + len(p)), pair=np.zeros((len(p), 2)))
    start += len(p)
  kept = sample.result()
  want = np.sort(np.argsort(np.concatenate(priorities))[:6])
  np.testing.assert_array_equal(kept['item'], want)
  assert kept['pair'].shape == (6, 2) and sample.seen == 18


# ------------------------------------------------------------------------------ end to end


def _export_random_encoder(workdir, method, **model):
  """A randomly initialised encoder exported like pretraining exports one."""
  config = tiny_config(method)
  config.model.update(**model)
  module = encoders.build_encoder(config.model)
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 64, 3)),
                       jnp.zeros((1, 48, 64, 1)), train=False)['params']
  return state_lib.export_encoder(str(workdir), params, config, step=0)


@pytest.fixture(scope='module')
def encoder_dirs(tmp_path_factory):
  """{'row': a lemumo workdir with encoder/, 'reference': a lejepa_rgb encoder/}."""
  row = tmp_path_factory.mktemp('lemumo')
  _export_random_encoder(row, 'lemumo')
  reference = _export_random_encoder(tmp_path_factory.mktemp('lejepa_rgb'), 'lejepa_rgb')
  return {'row': str(row), 'reference': reference}


def _analyze_config(reference_dir=''):
  config = tiny_config('lemumo')
  config.analyze.update(reference_dir=reference_dir, num_points=300, perplexity=10.0,
                        max_iter=250)
  return config


def test_analyze_end_to_end_is_deterministic(encoder_dirs, capsys):
  workdir = encoder_dirs['row']
  config = _analyze_config(encoder_dirs['reference'])
  first = analyze.run(config, workdir)
  out_dir = f'{workdir}/analysis'
  assert first['figure'] == f'{out_dir}/figure3.png' and first['json'] == f'{out_dir}/analysis.json'
  with open(first['figure'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(first['json']) as f:
    payload = json.load(f)
  assert payload['dataset'] == 'synthetic' and payload['split'] == 'val'
  assert payload['frames'] == payload['val_frames'] == 16
  assert payload['probe_view'] == [48, 64] and payload['patch_grid'] == [6, 8]
  assert payload['num_points'] == 300 < payload['labelled_patches'] <= 16 * 48
  assert sum(payload['class_counts'].values()) == 300
  rows = payload['encoders']
  assert [(e['role'], e['label'], e['method'], e['family']) for e in rows] == [
      ('row', 'Le MuMo JEPA fusion tokens', 'lemumo', 'fusion'),
      ('reference', 'LeJEPA RGB patch tokens', 'lejepa_rgb', 'vit')]
  assert rows[0]['encoder_dir'] == f'{workdir}/encoder'
  assert rows[1]['encoder_dir'] == encoder_dirs['reference']
  for row in rows:
    assert row['num_points'] == 300 and row['feature_dim'] == 32
    assert row['tsne'] == {'n_components': 2, 'perplexity': 10.0, 'max_iter': 250,
                           'init': 'pca', 'learning_rate': 'auto', 'metric': 'euclidean',
                           'random_state': 0}
    for key in ('purity_10nn', 'purity_random', 'planar_r2'):
      assert np.isfinite(row[key]), key
    assert 0 <= row['purity_random'] <= 1 and 0 <= row['purity_10nn'] <= 1
    assert 0 <= row['planar_r2'] <= 1
  printed = capsys.readouterr().out
  assert 'Le MuMo JEPA fusion tokens: 10-NN class purity' in printed
  assert 'LeJEPA RGB patch tokens: 10-NN class purity' in printed
  assert 'analyze: 16/16 val frames' in printed

  again = analyze.run(config, workdir)
  for a, b in zip(first['encoders'], again['encoders']):
    assert {k: a[k] for k in ('purity_10nn', 'purity_random', 'planar_r2')} == {
        k: b[k] for k in ('purity_10nn', 'purity_random', 'planar_r2')}


def test_analyze_errors_name_the_key(encoder_dirs, tmp_path, monkeypatch):
  config = _analyze_config()
  with pytest.raises(FileNotFoundError, match='config.probe.encoder_dir'):
    analyze.run(config, str(tmp_path))
  config = _analyze_config(str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='config.analyze.reference_dir'):
    analyze.run(config, encoder_dirs['row'])
  other = _export_random_encoder(tmp_path / 'patch16', 'lejepa_rgb', patch_size=16)
  with pytest.raises(ValueError, match='same patch size'):
    analyze.run(_analyze_config(other), encoder_dirs['row'])
  no_seg = dict(analyze.sources.dataset_metadata(config.data), seg_classes=[])
  monkeypatch.setattr(analyze.sources, 'dataset_metadata', lambda _: no_seg)
  with pytest.raises(ValueError, match='needs seg_classes'):
    analyze.run(_analyze_config(), encoder_dirs['row'])


def test_main_runs_mode_analyze(encoder_dirs, python_env, tmp_path):
  assert 'analyze' in modes.MODES
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py',
         f'--workdir={workdir}', *TINY_FLAGS, *TINY_PROBE_FLAGS, '--config.mode=analyze',
         f'--config.probe.encoder_dir={encoder_dirs["row"]}/encoder',
         '--config.analyze.num_points=200', '--config.analyze.perplexity=10',
         '--config.analyze.max_iter=250', '--config.analyze.max_frames=8']
  proc = subprocess.run(cmd, cwd=REPO, env=python_env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  payload = json.loads((workdir / 'analysis' / 'analysis.json').read_text())
  assert payload['frames'] == 8 and len(payload['encoders']) == 1
  assert (workdir / 'analysis' / 'figure3.png').exists()
