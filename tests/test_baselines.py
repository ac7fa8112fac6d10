"""Table 2's baseline rows end to end: pretraining through THE loop, then the frozen probes.

Rows: lemumo_vicreg (FT-Pruned + VICReg), lemumo_3pass (FT-Pruned + SIGReg 3-pass),
early_fusion (Early Fusion RGBD), late_fusion (Late Fusion); Table 3's imagebind
(ImageBind-style dual encoder, symmetric InfoNCE), dinov3 (DINO + iBOT with an EMA teacher;
the unit tests are in test_dino.py), multimae_ss and multimae_mt (MultiMAE; the
unit tests are in test_multimae.py).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, synthetic
from conftest import tiny_config
from lemumo_jax.evaluation import robustness
from lemumo_jax.models import encoders, parts
from lemumo_jax.objectives import infonce
from lemumo_jax.training import pretrain, probe
from lemumo_jax.training import state as state_lib

NEW_ROWS = ('lemumo_vicreg', 'lemumo_3pass', 'early_fusion', 'late_fusion', 'imagebind', 'dinov3',
            'multimae_ss', 'multimae_mt')


def test_rows_set_their_objective_and_family():
  c = synthetic.get_config('lemumo_vicreg')
  assert c.objective.name == 'vicreg' and c.model.fusion_mode == 'pruned'
  assert (c.objective.vicreg_sim, c.objective.vicreg_std, c.objective.vicreg_cov) == (25, 25, 1)
  c = synthetic.get_config('lemumo_3pass')
  assert tuple(c.objective.passes) == ('joint', 'rgb', 'companion')
  assert c.objective.name == 'lejepa' and c.model.family == 'fusion'
  assert synthetic.get_config('lemumo').objective.passes == ('joint',)
  assert synthetic.get_config('early_fusion').model.family == 'early_fusion'
  assert synthetic.get_config('late_fusion').model.family == 'late_fusion'
  c = synthetic.get_config('imagebind')
  assert (c.model.family, c.objective.name, c.views.num_local) == ('dual', 'infonce', 0)
  assert c.objective.infonce_temperature == 0.07 and c.views.num_global == 2


def _tiny_model_cfg(family):
  c = tiny_config().model.copy_and_resolve_references()
  c.family = family
  return c


def test_early_fusion_stacks_channels():
  module = encoders.build_encoder(_tiny_model_cfg('early_fusion'))
  rgb, comp = jnp.ones((2, 32, 32, 3)), jnp.ones((2, 32, 32, 1))
  params = module.init(jax.random.PRNGKey(0), rgb, comp, train=False)['params']
  assert params['patch_embed']['proj']['kernel'].shape == (8, 8, 4, 32)
  features = module.apply({'params': params}, rgb, comp, train=False)
  assert features.cls.shape == (2, 32) and features.patches.shape == (2, 4, 4, 32)


def test_late_fusion_concatenates_independent_branches():
  module = encoders.build_encoder(_tiny_model_cfg('late_fusion'))
  rng = np.random.default_rng(0)
  rgb = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  comp = jnp.asarray(rng.normal(size=(2, 32, 32, 1)), jnp.float32)
  params = module.init(jax.random.PRNGKey(0), rgb, comp, train=False)['params']
  assert set(params) == {'rgb_encoder', 'companion_encoder'}
  assert params['rgb_encoder']['cls_token'].shape == (1, 1, 32)
  features = module.apply({'params': params}, rgb, comp, train=False)
  # Two full-width branches concatenated: 2 * model.width channels (the probes infer it).
  assert features.cls.shape == (2, 64) and features.patches.shape == (2, 4, 4, 64)
  # The first half is the RGB ViT alone: changing the companion leaves it unchanged.
  other = module.apply({'params': params}, rgb, comp + 1.0, train=False)
  np.testing.assert_array_equal(other.patches[..., :32], features.patches[..., :32])
  np.testing.assert_array_equal(other.cls[..., :32], features.cls[..., :32])
  assert not np.allclose(other.patches[..., 32:], features.patches[..., 32:])
  bad = _tiny_model_cfg('late_fusion')
  bad.width = 33
  with pytest.raises(ValueError, match='late_fusion: model.width=33'):
    encoders.build_encoder(bad).init(jax.random.PRNGKey(0), rgb, comp, train=False)


def test_dual_patches_are_the_rgb_branch_alone():
  module = encoders.build_encoder(_tiny_model_cfg('dual'))
  rng = np.random.default_rng(0)
  rgb = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  comp = jnp.asarray(rng.normal(size=(2, 32, 32, 1)), jnp.float32)
  params = module.init(jax.random.PRNGKey(0), rgb, comp, train=False)['params']
  assert set(params) == {'rgb_encoder', 'companion_encoder'}
  features = module.apply({'params': params}, rgb, comp, train=False)
  # Camera-aligned RGB readout of model.width channels (S3), plus the companion CLS.
  assert features.patches.shape == (2, 4, 4, 32) and features.cls.shape == (2, 32)
  assert features.companion_cls.shape == (2, 32)
  # The RGB patch readout does not depend on the companion input (not even through a gradient);
  # the companion CLS does.
  other = module.apply({'params': params}, rgb, comp * 3.0 + 1.0, train=False)
  np.testing.assert_array_equal(other.patches, features.patches)
  np.testing.assert_array_equal(other.cls, features.cls)
  assert not np.allclose(other.companion_cls, features.companion_cls)
  grad = jax.grad(lambda c: jnp.sum(module.apply({'params': params}, rgb, c,
                                                 train=False).patches ** 2))(comp)
  assert not np.any(np.asarray(grad))
  # It is late_fusion's RGB half with the same parameters.
  late = encoders.build_encoder(_tiny_model_cfg('late_fusion'))
  late_features = late.apply({'params': params}, rgb, comp, train=False)
  np.testing.assert_array_equal(late_features.patches[..., :32], features.patches)
  np.testing.assert_array_equal(late_features.cls[..., 32:], features.companion_cls)
  assert parts.Features(cls=features.cls, patches=features.patches).companion_cls is None


def _infonce_reference(z_rgb, z_comp, temperature):
  """float64 numpy: mean over views of (CE(rows) + CE(columns)) / 2 of the cosine logits."""
  z_rgb, z_comp = np.asarray(z_rgb, np.float64), np.asarray(z_comp, np.float64)
  losses = []
  for a, b in zip(z_rgb, z_comp):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    logits = a @ b.T / temperature
    def cross_entropy(x):  # label of row i is i
      shifted = x - x.max(axis=1, keepdims=True)
      log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
      return -np.mean(np.diag(log_probs))
    losses.append(0.5 * (cross_entropy(logits) + cross_entropy(logits.T)))
  return np.mean(losses)


def test_infonce_matches_float64_reference():
  rng = np.random.default_rng(4)
  z_rgb = rng.normal(size=(2, 8, 6)).astype(np.float32)
  z_comp = (0.5 * z_rgb + rng.normal(size=(2, 8, 6))).astype(np.float32)
  loss, metrics = infonce.infonce_loss(jnp.asarray(z_rgb), jnp.asarray(z_comp),
                                       temperature=0.07)
  np.testing.assert_allclose(loss, _infonce_reference(z_rgb, z_comp, 0.07), rtol=1e-5)
  np.testing.assert_allclose(metrics['infonce'], loss)
  # Symmetric: swapping the modalities gives the same loss; scale-invariant (L2-normalised).
  swapped, _ = infonce.infonce_loss(jnp.asarray(z_comp), jnp.asarray(3.0 * z_rgb))
  np.testing.assert_allclose(swapped, loss, rtol=1e-5)
  # Perfectly aligned, well separated pairs: loss near 0 and every pair retrieved.
  eye = np.tile(np.eye(8, dtype=np.float32)[None], (2, 1, 1))
  aligned, aligned_metrics = infonce.infonce_loss(jnp.asarray(eye), jnp.asarray(eye))
  # float32 lse - diagonal at logits ~14.3: absolute error ~ 14.3 * 2^-24.
  np.testing.assert_allclose(aligned, _infonce_reference(eye, eye, 0.07), atol=2e-6)
  assert aligned < 1e-4 and aligned_metrics['pair_accuracy'] == 1.0


def test_imagebind_model_and_objective():
  config = tiny_config('imagebind')
  assert config.views.num_local == 0
  model = pretrain.build_model(config)
  rng = np.random.default_rng(2)
  views = {'global_rgb': rng.normal(size=(2, 4, 32, 32, 3)),
           'global_companion': rng.normal(size=(2, 4, 32, 32, 1)),
           'local_rgb': np.zeros((0, 4, 16, 16, 3)), 'local_companion': np.zeros((0, 4, 16, 16, 1))}
  views = {k: jnp.asarray(v, jnp.float32) for k, v in views.items()}
  variables = model.init(jax.random.PRNGKey(0), views, train=False)
  # One projector per modality.
  assert {'encoder', 'projector', 'companion_projector'} == set(variables['params'])
  out = model.apply(variables, views, train=False)
  assert out['z_global'].shape == (2, 4, 8) and out['z_companion_global'].shape == (2, 4, 8)
  assert out['z_local'] is None and out['z_companion_local'] is None
  loss, metrics = pretrain.build_objective(config)(jax.random.PRNGKey(0), out)
  np.testing.assert_allclose(
      loss, _infonce_reference(out['z_global'], out['z_companion_global'], 0.07), rtol=1e-5)
  assert np.isfinite(metrics['pair_accuracy'])
  # Other families keep their parameter trees: no companion projector.
  lemumo = pretrain.build_model(tiny_config('lemumo'))
  assert 'companion_projector' not in lemumo.init(jax.random.PRNGKey(0), views,
                                                  train=False)['params']
  # The row's pieces go together.
  bad = tiny_config('imagebind')
  bad.views.num_local = 2
  with pytest.raises(ValueError, match='disables local crops'):
    pretrain.build_objective(bad)
  bad = tiny_config('imagebind')
  bad.objective.name = 'lejepa'
  with pytest.raises(ValueError, match="'infonce' and family 'dual'"):
    pretrain.build_objective(bad)
  bad = tiny_config('late_fusion')
  bad.objective.name = 'infonce'
  with pytest.raises(ValueError, match="'infonce' and family 'dual'"):
    pretrain.build_objective(bad)


def _three_pass_model_and_views():
  config = tiny_config('lemumo_3pass')
  model = pretrain.build_model(config)
  rng = np.random.default_rng(1)
  views = {'global_rgb': rng.normal(size=(2, 4, 32, 32, 3)),
           'global_companion': rng.normal(size=(2, 4, 32, 32, 1)),
           'local_rgb': rng.normal(size=(2, 4, 16, 16, 3)),
           'local_companion': rng.normal(size=(2, 4, 16, 16, 1))}
  views = {k: jnp.asarray(v, jnp.float32) for k, v in views.items()}
  variables = model.init(jax.random.PRNGKey(0), views, train=False)
  return config, model, variables, views


def test_three_pass_zeroes_one_modality_per_pass():
  _, model, variables, views = _three_pass_model_and_views()

  def pass_sum(name, rgb_scale, companion_scale):
    def f(scales):
      scaled = dict(views, global_rgb=views['global_rgb'] * scales[0],
                    local_rgb=views['local_rgb'] * scales[0],
                    global_companion=views['global_companion'] * scales[1],
                    local_companion=views['local_companion'] * scales[1])
      out = model.apply(variables, scaled, train=False)
      z = out if name == 'joint' else out['passes'][name]
      return jnp.sum(z['z_global'] ** 2) + jnp.sum(z['z_local'] ** 2)
    return jax.grad(f)(jnp.array([rgb_scale, companion_scale]))

  # The companion-only pass does not depend on RGB, the RGB-only pass not on the companion.
  grads = pass_sum('companion', 1.0, 1.0)
  assert grads[0] == 0.0 and grads[1] != 0.0
  grads = pass_sum('rgb', 1.0, 1.0)
  assert grads[1] == 0.0 and grads[0] != 0.0
  grads = pass_sum('joint', 1.0, 1.0)
  assert grads[0] != 0.0 and grads[1] != 0.0
  # Each zeroed pass is the joint pass on inputs with that modality zeroed.
  out = model.apply(variables, views, train=False)
  zeroed = dict(views, global_rgb=jnp.zeros_like(views['global_rgb']),
                local_rgb=jnp.zeros_like(views['local_rgb']))
  np.testing.assert_allclose(out['passes']['companion']['z_global'],
                             model.apply(variables, zeroed, train=False)['z_global'], atol=1e-6)


def test_three_pass_objective_averages_sigreg_and_keeps_joint_pass():
  config, model, variables, views = _three_pass_model_and_views()
  out = model.apply(variables, views, train=False)
  key = jax.random.PRNGKey(3)
  loss, metrics = pretrain.build_objective(config)(key, out)
  np.testing.assert_allclose(
      metrics['sigreg'],
      (metrics['sigreg_joint'] + metrics['sigreg_rgb'] + metrics['sigreg_companion']) / 3,
      rtol=1e-6)
  # The joint pass is the one-pass (lemumo) model's output with the same parameters, and its
  # SIGReg and invariance terms are the lemumo objective's.
  one_pass_config = tiny_config('lemumo')
  one_pass = pretrain.build_model(one_pass_config).apply(variables, views, train=False)
  np.testing.assert_array_equal(one_pass['z_global'], out['z_global'])
  assert 'passes' not in one_pass
  _, one_metrics = pretrain.build_objective(one_pass_config)(key, one_pass)
  np.testing.assert_allclose(one_metrics['sigreg'], metrics['sigreg_joint'], rtol=1e-6)
  np.testing.assert_allclose(one_metrics['invariance'], metrics['invariance'], rtol=1e-6)
  np.testing.assert_allclose(loss, 0.1 * metrics['sigreg'] + 0.9 * metrics['invariance'],
                             rtol=1e-6)


def test_bad_passes_and_vicreg_three_pass_are_errors():
  config = tiny_config('lemumo_3pass')
  config.objective.passes = ('rgb', 'joint')
  with pytest.raises(ValueError, match="must start with 'joint'"):
    pretrain.build_objective(config)
  config = tiny_config('lemumo_vicreg')
  config.objective.passes = ('joint', 'rgb')
  with pytest.raises(ValueError, match='SIGReg ablation'):
    pretrain.build_objective(config)


@pytest.mark.parametrize('row', common.method_names())
def test_every_row_pretrains_then_probes(tmp_path, row):
  """Every paper row of configs/common.py METHODS: a few steps of THE loop, then the probes."""
  config = tiny_config(row, num_steps=2)
  summary = pretrain.train(config, str(tmp_path))
  assert summary['final_step'] == 2
  assert all(np.isfinite(loss) for _, loss in summary['history'])
  _, _, model_cfg = state_lib.load_encoder(str(tmp_path / 'encoder'))
  assert model_cfg.family == config.model.family
  # The dense depth head alone: what is checked here is that each row's encoder feeds the
  # probe stage; every head is trained end to end in tests/test_probe.py.
  config.probe.update(num_steps=2, val_every=2, checkpoint_every=2, heads=('depth',))
  result = probe.run(config, str(tmp_path))
  report_path = tmp_path / 'probe' / 'report.json'
  assert report_path.exists()
  with open(report_path) as f:
    reported = json.load(f)
  depth_mae = reported['metrics']['depth_MAE']
  assert depth_mae is not None and np.isfinite(depth_mae), reported['metrics']
  np.testing.assert_allclose(depth_mae, result['metrics']['depth_MAE'], rtol=1e-6)
  # Every robustness condition has its entry, with metrics where the probed grid reads the
  # companion (every row but the RGB-only ones and imagebind's RGB readout), null elsewhere.
  assert reported['robustness'].keys() == set(robustness.CONDITIONS)
  reads = robustness.reads_companion(model_cfg)
  assert reads == (row not in ('lejepa_rgb', 'dinov3', 'imagebind'))
  for name, values in reported['robustness'].items():
    assert (np.isfinite(values['depth_MAE']) if reads else values is None), name
