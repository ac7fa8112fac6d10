"""SIGReg and the LeJEPA objective against an independent float64 numpy derivation."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lemumo_jax.objectives import lejepa, sigreg, vicreg
from tests.conftest import REPO, xla_flags

jax.config.update('jax_default_matmul_precision', 'highest')


def sigreg_numpy(z, directions, num_knots=17, t_max=3.0, scale='batch'):
  """Eq. S2 written out with explicit sums, float64; z [N, d], directions [d, K]; scale 'batch'
  multiplies each direction's statistic by N (the LeJEPA reference), 'none' is S2 as printed."""
  z = np.asarray(z, np.float64)
  directions = np.asarray(directions, np.float64)
  n = z.shape[0]
  t = np.array([t_max * j / (num_knots - 1) for j in range(num_knots)])
  dt = t_max / (num_knots - 1)
  trapezoid = np.array([dt if j in (0, num_knots - 1) else 2 * dt for j in range(num_knots)])
  omega = trapezoid * np.exp(-t**2 / 2)
  total = 0.0
  for k in range(directions.shape[1]):
    x = z @ directions[:, k]
    for j in range(num_knots):
      c = np.mean(np.cos(t[j] * x))
      s = np.mean(np.sin(t[j] * x))
      total += omega[j] * ((c - np.exp(-t[j]**2 / 2))**2 + s**2) * (n if scale == 'batch' else 1)
  return total / directions.shape[1]


def test_knots_and_weights_match_the_reference_recipe():
  t, w = sigreg.knots_and_weights(17, 3.0)
  np.testing.assert_allclose(t, np.arange(17) * 3.0 / 16)
  dt = 3.0 / 16
  np.testing.assert_allclose(w[0], dt)
  np.testing.assert_allclose(w[5], 2 * dt * np.exp(-t[5]**2 / 2))
  np.testing.assert_allclose(w[-1], dt * np.exp(-4.5))


def test_directions_are_unit_columns():
  d = sigreg.random_directions(jax.random.PRNGKey(0), 16, 64)
  assert d.shape == (16, 64)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(d), axis=0), 1.0, rtol=1e-6)


@pytest.mark.parametrize('scale', [1.0, 0.3, 2.5])
def test_sigreg_matches_float64_numpy(scale):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(48, 8)) * scale + 0.2
  directions = np.asarray(sigreg.random_directions(jax.random.PRNGKey(1), 8, 32))
  got = float(sigreg.sigreg(jnp.asarray(z, jnp.float32), jnp.asarray(directions)))
  want = sigreg_numpy(z, directions)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sigreg_float64_agrees_to_1e6():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    z = rng.normal(size=(32, 6))
    directions = rng.normal(size=(6, 16))
    directions /= np.linalg.norm(directions, axis=0)
    t, w = sigreg.knots_and_weights()
    # The float32 kernel upcast: run the same formula in float64 through jnp.
    projected = jnp.asarray(z) @ jnp.asarray(directions)
    phase = projected[..., None] * jnp.asarray(t)
    err = (jnp.cos(phase).mean(0) - np.exp(-t**2 / 2))**2 + jnp.sin(phase).mean(0)**2
    got = float(jnp.mean((err @ jnp.asarray(w)) * z.shape[0]))
  np.testing.assert_allclose(got, sigreg_numpy(z, directions), rtol=1e-6, atol=1e-9)


def test_sigreg_per_view_leading_axis():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 20, 4))
  directions = np.asarray(sigreg.random_directions(jax.random.PRNGKey(2), 4, 8))
  got = np.asarray(sigreg.sigreg(jnp.asarray(z, jnp.float32), jnp.asarray(directions)))
  want = [sigreg_numpy(z[v], directions) for v in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_gaussian_small_and_not_growing_with_n_collapsed_large():
  key = jax.random.PRNGKey(0)
  values = {}
  for n in (256, 1024, 4096):
    z = jax.random.normal(jax.random.fold_in(key, n), (n, 16))
    values[n] = float(sigreg.sigreg_loss(jax.random.PRNGKey(7), z))
  # Under H0, E[N (c - phi)^2 + N s^2] = Var cos(tX) + Var sin(tX) = 1 - phi(t)^2 exactly,
  # whatever N: the statistic's expectation is sum_j w_j (1 - exp(-t_j^2)).
  t, w = sigreg.knots_and_weights()
  expected = float(np.sum(w * (1 - np.exp(-t**2))))
  for n, value in values.items():
    assert 0.6 * expected < value < 1.5 * expected, (n, value, expected)
  gaussian = values[1024]
  z = jax.random.normal(key, (1024, 16))
  collapsed = float(sigreg.sigreg_loss(jax.random.PRNGKey(7), 0.01 * z))
  shifted = float(sigreg.sigreg_loss(jax.random.PRNGKey(7), z + 3.0))
  scaled = float(sigreg.sigreg_loss(jax.random.PRNGKey(7), 4.0 * z))
  low_rank = float(sigreg.sigreg_loss(jax.random.PRNGKey(7), z.at[:, 4:].set(0.0)))
  for name, value in [('collapsed', collapsed), ('shifted', shifted), ('scaled', scaled),
                      ('low_rank', low_rank)]:
    assert value > 20 * gaussian and value > 10.0, (name, value, gaussian)


def invariance_numpy(z_global, z_local, reduction):
  """S1 with explicit loops, float64: centre = mean of the global views; 'sum' sums the squared
  error over the d dimensions (S1's ||.||^2), 'mean' also averages over them (the reference)."""
  z_global = np.asarray(z_global, np.float64)
  views = list(z_global) + ([] if z_local is None else list(np.asarray(z_local, np.float64)))
  num_views, n, d = len(views), z_global.shape[1], z_global.shape[2]
  total = 0.0
  for v in views:
    for i in range(n):
      centre = sum(g[i] for g in z_global) / len(z_global)
      total += sum((v[i, j] - centre[j]) ** 2 for j in range(d))
  per_sample = total / (num_views * n)
  return per_sample if reduction == 'sum' else per_sample / d


@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_invariance_loss_reductions_match_float64_loops(reduction):
  rng = np.random.default_rng(0)
  zg = rng.normal(size=(2, 5, 4))
  zl = rng.normal(size=(3, 5, 4))
  for local in (zl, None):
    got = float(lejepa.invariance_loss(jnp.asarray(zg), None if local is None else
                                       jnp.asarray(local), reduction))
    np.testing.assert_allclose(got, invariance_numpy(zg, local, reduction), rtol=1e-5)
  assert float(lejepa.invariance_loss(jnp.ones((2, 5, 4)), jnp.ones((3, 5, 4)), reduction)) == 0.0


def test_default_invariance_is_the_reference_mean():
  """The LeJEPA reference's `(z.mean(0) - z).square().mean()` with the centre over the global
  views; 'sum' is exactly d times it."""
  rng = np.random.default_rng(2)
  zg, zl = rng.normal(size=(2, 7, 16)), rng.normal(size=(4, 7, 16))
  views = np.concatenate([zg, zl])
  reference = np.square(zg.mean(0) - views).mean()
  got = float(lejepa.invariance_loss(jnp.asarray(zg), jnp.asarray(zl)))
  np.testing.assert_allclose(got, reference, rtol=1e-5)
  np.testing.assert_allclose(float(lejepa.invariance_loss(jnp.asarray(zg), jnp.asarray(zl), 'sum')),
                             16 * reference, rtol=1e-5)


def test_unknown_conventions_name_their_config_key():
  z = jnp.zeros((2, 4, 3))
  with pytest.raises(ValueError, match='objective.invariance_reduction'):
    lejepa.invariance_loss(z, None, 'median')
  with pytest.raises(ValueError, match='objective.sigreg_scale'):
    sigreg.sigreg(z[0], jnp.ones((3, 2)), scale='N')


def lejepa_numpy(zg, zl, directions, lam, reduction, scale, extra=()):
  """Eq. 1 / 3 (and S3's SIGReg mean over passes) from the float64 pieces above."""
  def view_mean(g, l):
    views = list(g) + ([] if l is None else list(l))
    return np.mean([sigreg_numpy(v, directions, scale=scale) for v in views])
  passes = [view_mean(zg, zl)] + [view_mean(g, l) for g, l in extra]
  return lam * np.mean(passes) + (1 - lam) * invariance_numpy(zg, zl, reduction)


@pytest.mark.parametrize('reduction', ['mean', 'sum'])
@pytest.mark.parametrize('scale', ['batch', 'none'])
@pytest.mark.parametrize('three_pass', [False, True])
def test_lejepa_loss_every_convention_matches_float64(reduction, scale, three_pass):
  rng = np.random.default_rng(1)
  zg, zl = rng.normal(size=(2, 16, 4)), rng.normal(size=(4, 16, 4))
  extra = [(rng.normal(size=(2, 16, 4)), rng.normal(size=(4, 16, 4))) for _ in range(2)]
  key = jax.random.PRNGKey(3)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  extra_passes = ({name: {'z_global': f32(g), 'z_local': f32(l)}
                   for name, (g, l) in zip(('rgb', 'companion'), extra)} if three_pass else None)
  loss, metrics = lejepa.lejepa_loss(key, f32(zg), f32(zl), lam=0.1, num_slices=32,
                                     invariance_reduction=reduction, sigreg_scale=scale,
                                     extra_passes=extra_passes)
  directions = np.asarray(sigreg.random_directions(key, 4, 32))
  want = lejepa_numpy(zg, zl, directions, 0.1, reduction, scale, extra if three_pass else ())
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  np.testing.assert_allclose(float(metrics['invariance']), invariance_numpy(zg, zl, reduction),
                             rtol=1e-5)
  grads = jax.grad(lambda a: lejepa.lejepa_loss(
      key, a, f32(zl), num_slices=32, invariance_reduction=reduction, sigreg_scale=scale)[0])(
          f32(zg))
  assert np.all(np.isfinite(np.asarray(grads)))


def test_sigreg_scale_none_is_batch_over_n():
  rng = np.random.default_rng(7)
  z = jnp.asarray(rng.normal(size=(40, 6)), jnp.float32)
  directions = sigreg.random_directions(jax.random.PRNGKey(0), 6, 16)
  np.testing.assert_allclose(float(sigreg.sigreg(z, directions, scale='none')) * 40,
                             float(sigreg.sigreg(z, directions)), rtol=1e-6)


_SHARDED_LOSS = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lemumo_jax.objectives import lejepa
    jax.config.update('jax_default_matmul_precision', 'highest')
    rng = np.random.default_rng(11)
    zg, zl = rng.normal(size=(2, 32, 4)), rng.normal(size=(3, 32, 4))
    mesh = Mesh(np.array(jax.devices()), ('data',))
    batch = NamedSharding(mesh, P(None, 'data', None))   # [V, N, d]: samples over devices
    out = {}
    for reduction in ('mean', 'sum'):
      for scale in ('batch', 'none'):
        fn = jax.jit(lambda g, l, r=reduction, s=scale: lejepa.lejepa_loss(
            jax.random.PRNGKey(5), g, l, num_slices=16, invariance_reduction=r,
            sigreg_scale=s)[1])
        metrics = fn(jax.device_put(jnp.asarray(zg, jnp.float32), batch),
                     jax.device_put(jnp.asarray(zl, jnp.float32), batch))
        out[f'{reduction},{scale}'] = {k: float(metrics[k]) for k in ('loss', 'sigreg',
                                                                      'invariance')}
    print('RESULT', json.dumps({'devices': jax.device_count(), 'metrics': out}))
''')


def test_every_convention_on_four_devices_uses_the_global_batch(python_env):
  """Under 4 fake devices with the samples sharded, N in SIGReg is the global batch (32), not
  the per-device 8, and every convention matches the float64 formula."""
  env = dict(python_env, XLA_FLAGS=xla_flags(4),
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _SHARDED_LOSS], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')][-1]
  result = json.loads(line[len('RESULT '):])
  assert result['devices'] == 4
  rng = np.random.default_rng(11)
  zg, zl = rng.normal(size=(2, 32, 4)), rng.normal(size=(3, 32, 4))
  directions = np.asarray(sigreg.random_directions(jax.random.PRNGKey(5), 4, 16))
  for name, metrics in result['metrics'].items():
    reduction, scale = name.split(',')
    want = lejepa_numpy(zg, zl, directions, 0.1, reduction, scale)
    np.testing.assert_allclose(metrics['loss'], want, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(metrics['invariance'], invariance_numpy(zg, zl, reduction),
                               rtol=1e-5, err_msg=name)


def vicreg_numpy(z_global, z_local, sim=25.0, std=25.0, cov=1.0, eps=1e-4):
  """VICReg written out with explicit loops, float64: z [V, N, d]; the centre invariance."""
  z_global = np.asarray(z_global, np.float64)
  views = z_global if z_local is None else np.concatenate(
      [z_global, np.asarray(z_local, np.float64)])
  num_views, n, d = views.shape
  centre = z_global.mean(axis=0)
  inv = sum(((views[v] - centre) ** 2).sum() for v in range(num_views)) / (num_views * n * d)
  var_terms, cov_terms = [], []
  for v in range(num_views):
    x = views[v] - views[v].mean(axis=0)
    c = np.zeros((d, d))
    for i in range(d):
      for j in range(d):
        c[i, j] = sum(x[k, i] * x[k, j] for k in range(n)) / (n - 1)
    var_terms.append(np.mean([max(0.0, 1.0 - np.sqrt(c[j, j] + eps)) for j in range(d)]))
    cov_terms.append(sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d)
  var_loss, cov_loss = np.mean(var_terms), np.mean(cov_terms)
  return sim * inv + std * var_loss + cov * cov_loss, inv, var_loss, cov_loss


@pytest.mark.parametrize('scale,with_local', [(1.0, True), (0.2, True), (2.0, False)])
def test_vicreg_matches_float64_numpy(scale, with_local):
  rng = np.random.default_rng(4)
  base = rng.normal(size=(1, 24, 6))
  mix = rng.normal(size=(6, 6)) * 0.5 + np.eye(6)  # correlated dimensions: covariance > 0
  z_global = (base + 0.3 * rng.normal(size=(2, 24, 6))) @ mix * scale + 0.1
  z_local = (base + 0.5 * rng.normal(size=(3, 24, 6))) @ mix * scale if with_local else None
  loss, metrics = vicreg.vicreg_loss(
      jnp.asarray(z_global, jnp.float32),
      None if z_local is None else jnp.asarray(z_local, jnp.float32))
  want, inv, var, cov = vicreg_numpy(z_global, z_local)
  np.testing.assert_allclose(float(metrics['invariance']), inv, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['variance']), var, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(metrics['covariance']), cov, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert var > 0 or scale > 1.0


def test_vicreg_two_views_is_a_quarter_of_pairwise_mse():
  rng = np.random.default_rng(5)
  z = rng.normal(size=(2, 16, 4))
  got = float(vicreg.invariance_mse(jnp.asarray(z, jnp.float32), None))
  np.testing.assert_allclose(got, np.mean((z[0] - z[1]) ** 2) / 4, rtol=1e-5)


def test_vicreg_collapse_is_penalised_and_whitened_is_not():
  rng = np.random.default_rng(6)
  white = rng.normal(size=(2, 4096, 4)) * 2.0
  _, metrics = vicreg.vicreg_loss(jnp.asarray(white, jnp.float32), None)
  assert float(metrics['variance']) == 0.0 and float(metrics['covariance']) < 0.05
  collapsed = np.zeros((2, 64, 4))
  _, metrics = vicreg.vicreg_loss(jnp.asarray(collapsed, jnp.float32), None)
  np.testing.assert_allclose(float(metrics['variance']), 1.0 - np.sqrt(1e-4), rtol=1e-6)
