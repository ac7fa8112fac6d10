"""The DINOv3-style RGB baseline (`dinov3`, paper S1): losses against float64 numpy, the EMA
teacher and centres, the teacher-free gradient, the exported teacher backbone, and the state
trees of the other rows."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import synthetic, waymo
from tests.conftest import tiny_config
from lemumo_jax.data import augment
from lemumo_jax.models import dino as dino_model
from lemumo_jax.models import encoders
from lemumo_jax.objectives import dino
from lemumo_jax.training import pretrain
from lemumo_jax.training import state as state_lib


def _softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _ce(teacher_logits, centre, student_logits, tau_t, tau_s):
  """float64: -sum_k softmax((t - c) / tau_t) log_softmax(s / tau_s) for one vector pair."""
  p = _softmax((teacher_logits - centre) / tau_t)
  return -np.sum(p * _log_softmax(student_logits / tau_s))


def _dino_reference(student, teacher, centre, tau_s, tau_t):
  """DINO's DINOLoss loop: every (teacher view iq, student view v != iq), batch mean, mean."""
  total, terms = 0.0, 0
  for iq in range(teacher.shape[0]):
    for v in range(student.shape[0]):
      if v == iq:
        continue
      total += np.mean([_ce(teacher[iq, b], centre, student[v, b], tau_t, tau_s)
                        for b in range(student.shape[1])])
      terms += 1
  return total / terms


def _ibot_reference(student, teacher, centre, masks, tau_s, tau_t):
  """iBOT: per image, the mean CE over its masked patches (0 when none); mean over images."""
  per_image = []
  for v in range(student.shape[0]):
    for b in range(student.shape[1]):
      ces = [_ce(teacher[v, b, n], centre, student[v, b, n], tau_t, tau_s)
             for n in range(student.shape[2]) if masks[v, b, n]]
      per_image.append(np.mean(ces) if ces else 0.0)
  return np.mean(per_image)


def _random_outputs(rng, num_global=2, num_local=3, batch=4, patches=6, k=7, k_ibot=5):
  masks = rng.random((num_global, batch, patches)) < 0.4
  masks[0, 0] = False           # an unmasked image counts as 0
  masks[1, 1] = True            # a fully masked one
  outputs = {
      'dino_global': rng.uniform(-1, 1, (num_global, batch, k)),
      'dino_local': rng.uniform(-1, 1, (num_local, batch, k)),
      'ibot': rng.uniform(-1, 1, (num_global, batch, patches, k_ibot)),
      'masks': masks,
      'teacher': {'dino_global': rng.uniform(-1, 1, (num_global, batch, k)),
                  'ibot': rng.uniform(-1, 1, (num_global, batch, patches, k_ibot)),
                  'dino_centre': rng.normal(0, 0.3, (k,)),
                  'ibot_centre': rng.normal(0, 0.3, (k_ibot,))}}
  return outputs


def _as_jax(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.bool_ if x.dtype == bool else jnp.float32),
                      tree)


def test_dino_and_ibot_losses_match_float64_reference():
  rng = np.random.default_rng(0)
  out = _random_outputs(rng)
  t = out['teacher']
  tau_s, tau_t, weight = 0.1, 0.04, 0.7
  loss, metrics = dino.dino_objective(_as_jax(out), student_temp=tau_s, teacher_temp=tau_t,
                                      ibot_weight=weight)
  student = np.concatenate([out['dino_global'], out['dino_local']], axis=0)
  want_dino = _dino_reference(student, t['dino_global'], t['dino_centre'], tau_s, tau_t)
  want_ibot = _ibot_reference(out['ibot'], t['ibot'], t['ibot_centre'], out['masks'], tau_s,
                              tau_t)
  np.testing.assert_allclose(metrics['dino'], want_dino, rtol=1e-5)
  np.testing.assert_allclose(metrics['ibot'], want_ibot, rtol=1e-5)
  np.testing.assert_allclose(loss, want_dino + weight * want_ibot, rtol=1e-5)
  np.testing.assert_allclose(metrics['mask_fraction'], out['masks'].mean(), rtol=1e-6)
  # Without local crops the pairs are the two global views crossed.
  no_local = dict(out, dino_local=None)
  _, metrics = dino.dino_objective(_as_jax(no_local), student_temp=tau_s, teacher_temp=tau_t)
  np.testing.assert_allclose(
      metrics['dino'], _dino_reference(out['dino_global'], t['dino_global'], t['dino_centre'],
                                       tau_s, tau_t), rtol=1e-5)
  # Same-view pairs are excluded: changing student view 0 leaves the loss of teacher view 0
  # alone (only teacher view 1 reads it).
  teacher = dino.teacher_probs(jnp.asarray(t['dino_global'][:1]), 0.0, tau_t)
  moved = student.copy()
  moved[0] += 5.0 * rng.normal(size=moved[0].shape)
  np.testing.assert_allclose(dino.dino_loss(jnp.asarray(moved), teacher, tau_s),
                             dino.dino_loss(jnp.asarray(student), teacher, tau_s), rtol=1e-6)
  with pytest.raises(ValueError, match='at least 2 views'):
    dino.dino_loss(jnp.zeros((1, 4, 7)), jnp.ones((1, 4, 7)) / 7, 0.1)


def test_centre_and_ema_updates_match_numpy():
  rng = np.random.default_rng(1)
  centre = rng.normal(size=(5,))
  logits = rng.normal(size=(2, 3, 4, 5))
  want = 0.9 * centre + 0.1 * logits.reshape(-1, 5).mean(axis=0)
  np.testing.assert_allclose(dino_model.update_centre(jnp.asarray(centre, jnp.float32),
                                                      jnp.asarray(logits, jnp.float32), 0.9),
                             want, rtol=1e-6, atol=1e-7)
  teacher = {'a': rng.normal(size=(3, 2)), 'b': {'c': rng.normal(size=(4,))}}
  student = jax.tree.map(lambda x: x + rng.normal(size=x.shape), teacher)
  new = state_lib.ema_update(_as_jax(teacher), _as_jax(student), 0.996)
  for got, t, s in zip(jax.tree.leaves(new), jax.tree.leaves(teacher), jax.tree.leaves(student)):
    np.testing.assert_allclose(got, 0.996 * t + 0.004 * s, rtol=1e-6, atol=1e-7)
  # DINO's cosine momentum schedule: 0.996 -> 1.
  m = [float(dino.teacher_momentum(s, 100, 0.996, 1.0)) for s in (0, 50, 100)]
  np.testing.assert_allclose(m, [0.996, 0.998, 1.0], rtol=1e-7)


def test_random_patch_masks_scheme():
  masks = np.asarray(dino_model.random_patch_masks(jax.random.PRNGKey(0), (2, 500), 20, 0.5,
                                                   (0.1, 0.5)))
  counts = masks.sum(-1)
  masked = counts > 0
  assert 0.4 < masked.mean() < 0.6
  assert counts[masked].min() >= 2 and counts[masked].max() <= 10   # round(r * 20), r in [.1, .5]
  assert 4 < counts[masked].mean() < 8
  # Positions are uniform: every patch index is masked about equally often.
  per_position = masks[masked].mean(0)
  assert per_position.min() > 0.2 and per_position.max() < 0.5
  with pytest.raises(ValueError, match='mask_ratio'):
    dino_model.random_patch_masks(jax.random.PRNGKey(0), (2,), 4, 0.5, (0.6, 0.5))


def test_dino_head_is_a_cosine_to_unit_prototypes():
  head = dino_model.DinoHead(num_prototypes=11, hidden_dim=16, bottleneck_dim=8, num_layers=3)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 12)), jnp.float32)
  params = head.init(jax.random.PRNGKey(0), x)['params']
  assert set(params) == {'mlp_0', 'mlp_1', 'mlp_2', 'last_layer'}
  assert params['last_layer'].shape == (8, 11)   # bias-free, no weight_g
  logits = head.apply({'params': params}, x)
  assert logits.shape == (5, 11) and np.all(np.abs(logits) <= 1 + 1e-6)
  # weight_g fixed at 1: scaling a prototype's weights changes nothing.
  scaled = dict(params, last_layer=params['last_layer'] * jnp.arange(1.0, 12.0))
  np.testing.assert_allclose(head.apply({'params': scaled}, x), logits, rtol=1e-5, atol=1e-6)


def _model_and_views(config, batch=3, seed=3):
  model = pretrain.build_model(config)
  rng = np.random.default_rng(seed)
  v = config.views
  views = {'global_rgb': rng.normal(size=(v.num_global, batch, v.global_size, v.global_size, 3)),
           'global_companion': rng.normal(size=(v.num_global, batch, v.global_size,
                                                v.global_size, 1)),
           'local_rgb': rng.normal(size=(v.num_local, batch, v.local_size, v.local_size, 3)),
           'local_companion': rng.normal(size=(v.num_local, batch, v.local_size,
                                               v.local_size, 1))}
  views = {k: jnp.asarray(x, jnp.float32) for k, x in views.items()}
  return model, model.init(jax.random.PRNGKey(0), views, train=False), views


def test_model_masks_only_the_student_and_keeps_a_plain_vit_encoder():
  config = tiny_config('dinov3')
  model, variables, views = _model_and_views(config)
  # The encoder subtree is exactly the 'vit' family's: the probes load it as such.
  plain = encoders.build_encoder(config.model).init(
      jax.random.PRNGKey(0), views['global_rgb'][0], views['global_companion'][0], train=False)
  assert (jax.tree.map(np.shape, variables['params']['encoder'])
          == jax.tree.map(np.shape, plain['params']))
  assert set(variables['params']) == {'encoder', 'dino_head', 'ibot_head', 'mask_token'}
  assert jax.tree.map(np.shape, variables['batch_stats']) == {'dino_centre': (64,),
                                                              'ibot_centre': (64,)}
  # The masked encode with no masks is the encoder's own forward.
  params = jax.tree.map(lambda x: x + 0.1, variables['params'])  # a non-zero mask token
  images = views['global_rgb'][0]
  enc = encoders.build_encoder(config.model)
  cls, patches = enc.apply({'params': params['encoder']}, images, method='encode')
  def masked(mask):
    return enc.apply({'params': params['encoder']}, images, mask, params['mask_token'],
                     method=lambda m, *a: dino_model.masked_vit_encode(m, *a))
  none = masked(jnp.zeros((3, 16), bool))
  np.testing.assert_array_equal(none.cls, cls)
  np.testing.assert_array_equal(none.patches, patches)
  some = masked(jnp.zeros((3, 16), bool).at[1, 5].set(True))
  np.testing.assert_array_equal(some.cls[0], cls[0])
  assert not np.allclose(some.cls[1], cls[1])
  # Student outputs; train=True draws masks from the 'mask' stream.
  out = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, views,
                    train=True, rngs={'mask': jax.random.PRNGKey(1)})
  assert out['dino_global'].shape == (2, 3, 64) and out['dino_local'].shape == (2, 3, 64)
  assert out['ibot'].shape == (2, 3, 16, 64) and out['masks'].shape == (2, 3, 16)
  # The teacher sees the global views unmasked and returns the centres it was called with.
  teacher, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                 views, method='teacher', mutable=['batch_stats'])
  np.testing.assert_array_equal(teacher['dino_centre'], np.zeros(64))
  unmasked = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, views,
                         train=False)
  np.testing.assert_allclose(teacher['dino_global'], unmasked['dino_global'], atol=1e-6)
  np.testing.assert_allclose(teacher['ibot'], unmasked['ibot'], atol=1e-6)
  np.testing.assert_allclose(
      updates['batch_stats']['dino_centre'],
      0.1 * np.asarray(teacher['dino_global']).reshape(-1, 64).mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
      updates['batch_stats']['ibot_centre'],
      0.1 * np.asarray(teacher['ibot']).reshape(-1, 64).mean(0), rtol=1e-5, atol=1e-7)


def _step_setup(config):
  view_cfg = augment.ViewConfig.from_config(config.views)
  model = pretrain.build_model(config)
  tx = optax.adamw(1e-3)   # no warm-up: the first step moves the params
  schedule = state_lib.learning_rate_schedule(config.optim, 10)
  state = pretrain.make_init_state(model, tx, view_cfg, 1)(jax.random.PRNGKey(0))
  rng = np.random.default_rng(5)
  batch = {'rgb': jnp.asarray(rng.integers(0, 256, (4, 48, 64, 3)), jnp.uint8),
           'companion': jnp.asarray(rng.random((4, 48, 64)), jnp.float32)}
  step = pretrain.make_train_step(model, pretrain.build_objective(config), tx, view_cfg,
                                  schedule, pretrain.build_teacher_momentum(config, 10))
  return model, view_cfg, state, batch, step


def test_step_ema_teacher_gets_no_gradient_and_centres_update():
  config = tiny_config('dinov3')
  config.views.photometric = False   # a smaller graph to differentiate twice
  model, view_cfg, state, batch, step = _step_setup(config)
  assert isinstance(state, state_lib.TeacherTrainState)
  for t, s in zip(jax.tree.leaves(state.teacher_params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(t, s)
  state = state.replace(step=jnp.ones((), jnp.int32))
  momentum = float(dino.teacher_momentum(1, 10, 0.996, 1.0))
  key = jax.random.PRNGKey(7)
  # The loss does not depend on the teacher's params through any gradient path: its derivative
  # along a random direction of them is exactly 0 (forward mode: a fraction of the compile time
  # of differentiating the whole step in reverse), and along the student's params it is not.
  def derivative(field):
    params = getattr(state, field)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    tangent = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                           for k, x in zip(keys, leaves)])
    loss = lambda p: step(state.replace(**{field: p}), batch, key)[1]['loss']
    return float(jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,))[1])(params, tangent))

  assert derivative('teacher_params') == 0.0
  assert derivative('params') != 0.0
  new, metrics = jax.jit(step)(state, batch, key)
  assert np.isfinite(metrics['loss']) and metrics['dino'] > 0 and metrics['ibot'] >= 0
  np.testing.assert_allclose(metrics['teacher_momentum'], momentum, rtol=1e-7)
  # teacher <- m teacher + (1 - m) (params after the optimizer step).
  for t_new, t_old, p_new in zip(*(jax.tree.leaves(x) for x in (
      new.teacher_params, state.teacher_params, new.params))):
    np.testing.assert_allclose(
        t_new, momentum * np.asarray(t_old) + (1 - momentum) * np.asarray(p_new), rtol=1e-5,
        atol=1e-7)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new.params),
                                                   jax.tree.leaves(state.params)))
  # The centres moved to 0.1 x the mean of the teacher's logits on this step's global views.
  view_key = jax.random.split(jax.random.fold_in(key, 1), 3)[0]
  views = augment.make_views(view_key, batch['rgb'], batch['companion'], view_cfg)
  teacher, _ = model.apply({'params': state.teacher_params, 'batch_stats': state.batch_stats},
                           views, method='teacher', mutable=['batch_stats'])
  np.testing.assert_allclose(new.batch_stats['dino_centre'],
                             0.1 * np.asarray(teacher['dino_global']).reshape(-1, 64).mean(0),
                             rtol=1e-4, atol=1e-6)
  # A teacher state needs the momentum schedule.
  bad = pretrain.make_train_step(model, pretrain.build_objective(config),
                                 state_lib.make_optimizer(config.optim, 10), view_cfg,
                                 state_lib.learning_rate_schedule(config.optim, 10))
  with pytest.raises(ValueError, match='teacher_momentum'):
    jax.eval_shape(bad, state, batch, key)


def test_dinov3_trains_and_exports_the_teacher_backbone(tmp_path):
  config = tiny_config('dinov3', num_steps=3)
  summary = pretrain.train(config, str(tmp_path))
  losses = [loss for _, loss in summary['history']]
  assert len(losses) == 3 and np.all(np.isfinite(losses)) and len(set(losses)) > 1
  state = summary['state']
  _, exported, model_cfg = state_lib.load_encoder(str(tmp_path / 'encoder'))
  assert model_cfg.family == 'vit' and model_cfg.inputs == 'rgb'
  teacher, student = state.teacher_params['encoder'], state.params['encoder']
  for path_e, leaf in jax.tree_util.tree_leaves_with_path(exported):
    np.testing.assert_array_equal(leaf, _at(teacher, path_e))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(teacher),
                                                      jax.tree.leaves(student)))


def _at(tree, path):
  for entry in path:
    tree = tree[entry.key]
  return tree


def test_row_config_and_other_rows_unchanged():
  for module in (synthetic, waymo):
    c = module.get_config('dinov3')
    assert (c.method, c.model.family, c.model.inputs, c.objective.name) == (
        'dinov3', 'vit', 'rgb', 'dino')
    assert (c.optim.lr, c.optim.b1, c.optim.b2) == (5e-4, 0.9, 0.95)
    d = c.dino
    assert (d.num_prototypes, d.ibot_num_prototypes, d.student_temp, d.teacher_temp) == (
        1024, 1024, 0.1, 0.04)
    assert (d.teacher_momentum, d.centre_momentum, tuple(d.mask_ratio)) == (0.996, 0.9,
                                                                          (0.1, 0.5))
  assert (waymo.get_config('dinov3').dino.hidden_dim,
          waymo.get_config('dinov3').dino.bottleneck_dim) == (2048, 256)
  lemumo = waymo.get_config('lemumo')
  assert (lemumo.optim.lr, lemumo.optim.b2) == (1e-4, 0.999)
  # Other rows: plain TrainState (no teacher leaves, checkpoints as before), no momentum.
  config = tiny_config('lemumo')
  assert pretrain.build_teacher_momentum(config, 10) is None
  view_cfg = augment.ViewConfig.from_config(config.views)
  model = pretrain.build_model(config)
  tx = state_lib.make_optimizer(config.optim, 10)
  abstract = jax.eval_shape(pretrain.make_init_state(model, tx, view_cfg, 1),
                            jax.random.PRNGKey(0))
  assert type(abstract) is state_lib.TrainState and state_lib.teacher_of(abstract) is None
  assert [f.name for f in dataclasses.fields(abstract)] == [
      'step', 'params', 'batch_stats', 'opt_state', 'nonfinite_step']
  assert not getattr(model, 'has_teacher', False)
  # The row's pieces go together.
  bad = tiny_config('dinov3')
  bad.model.family = 'fusion'
  with pytest.raises(ValueError, match="needs the single-ViT family 'vit'"):
    pretrain.build_objective(bad)
  bad = tiny_config('dinov3')
  bad.views.update(num_global=1, num_local=0)
  with pytest.raises(ValueError, match='>= 2 views'):
    pretrain.build_objective(bad)
