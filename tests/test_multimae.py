"""MultiMAE baselines (multimae_ss, multimae_mt): masking, losses against float64 numpy, the
encoder's visible-only forward, the seg crop, and the rows through THE train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, synthetic, waymo
from tests.conftest import tiny_config
from lemumo_jax import profiling
from lemumo_jax.data import augment, pipeline
from lemumo_jax.models import encoders, multimae
from lemumo_jax.objectives import mae
from lemumo_jax.training import pretrain

ROWS = ('multimae_ss', 'multimae_mt')


# ----------------------------------------------------------------------------- config


def test_rows_follow_the_paper():
  for row in ROWS:
    c = waymo.get_config(row)
    assert (c.model.family, c.objective.name, c.views.num_local) == ('multimae', 'mae', 0)
    assert (c.multimae.mask_ratio, c.multimae.decoder_depth, c.multimae.decoder_width) == (
        0.75, 2, 256)
    assert c.views.with_seg == (row == 'multimae_mt')
    assert ('seg' in c.multimae.tasks) == (row == 'multimae_mt')
  # Other rows keep their views and model sections (no seg, no new model keys).
  for row in ('lemumo', 'imagebind', 'lejepa_rgb'):
    c = synthetic.get_config(row)
    assert not c.views.with_seg and 'seg' not in c.multimae.tasks
    assert set(c.model) == set(common.base_config().model)


def test_build_errors_name_the_key():
  bad = tiny_config('multimae_ss')
  bad.views.num_local = 2
  with pytest.raises(ValueError, match='num_local=0'):
    pretrain.build_objective(bad)
  bad = tiny_config('multimae_ss')
  bad.objective.name = 'lejepa'
  with pytest.raises(ValueError, match="'mae' and family 'multimae'"):
    pretrain.build_objective(bad)
  bad = tiny_config('multimae_mt')
  bad.views.with_seg = False
  with pytest.raises(ValueError, match='with_seg'):
    pretrain.build_model(bad)
  bad = tiny_config('multimae_ss')
  bad.multimae.tasks = ('rgb', 'seg')
  with pytest.raises(ValueError, match='multimae.tasks'):
    pretrain.build_model(bad)
  bad = tiny_config('multimae_ss')
  bad.multimae.seg_stride = 3
  with pytest.raises(ValueError, match='seg_stride'):
    pretrain.build_model(bad)
  # MT reads the class count from the dataset; an explicit count overrides it.
  assert pretrain.build_model(tiny_config('multimae_mt')).num_seg_classes == 10
  c = tiny_config('multimae_mt')
  c.multimae.num_seg_classes = 3
  assert pretrain.build_model(c).num_seg_classes == 3


# ----------------------------------------------------------------------------- masking


def _sample(keys, sizes, visible, sampling='dirichlet'):
  fn = jax.jit(jax.vmap(lambda k: multimae.sample_visible(k, sizes, visible, sampling)))
  keep, budgets = fn(keys)
  return np.asarray(keep), np.asarray(budgets)


@pytest.mark.parametrize('sampling', ['dirichlet', 'uniform'])
def test_masking_counts_budgets_and_determinism(sampling):
  n = 16
  visible = multimae.num_visible(2 * n, 0.75)
  assert visible == 8  # 25 % of both modalities' tokens
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  keep, budgets = _sample(keys, (n, n), visible, sampling)
  assert keep.shape == (200, visible) and budgets.shape == (200, 2)
  for row, budget in zip(keep, budgets):
    assert len(set(row.tolist())) == visible and np.all(np.diff(row) > 0)
    assert 0 <= row.min() and row.max() < 2 * n
    # The visible tokens per modality are the budgets, which sum to the visible count.
    np.testing.assert_array_equal([np.sum(row < n), np.sum(row >= n)], budget)
  assert np.all(budgets.sum(1) == visible)
  # Deterministic per key, different across keys.
  again, _ = _sample(keys, (n, n), visible, sampling)
  np.testing.assert_array_equal(again, keep)
  assert len({tuple(r) for r in keep.tolist()}) > 190
  if sampling == 'dirichlet':
    # Dirichlet(1) over two modalities: the RGB share is uniform, so every split 0..8 occurs,
    # each about 1/9 of the time (the end points half as often after rounding).
    counts = np.bincount(budgets[:, 0], minlength=visible + 1)
    assert np.all(counts > 0) and counts[1:-1].min() > 8
  mask = np.asarray(multimae.keep_to_mask(jnp.asarray(keep), 2 * n))
  assert np.all(mask.sum(1) == 2 * n - visible)
  assert not np.any(np.take_along_axis(mask, keep, axis=1))


def test_budgets_sum_exactly_and_overflow_is_filled():
  keys = jax.random.split(jax.random.PRNGKey(1), 500)
  budgets = np.asarray(jax.vmap(lambda k: multimae.modality_budgets(k, 3, 7))(keys))
  assert np.all(budgets.sum(1) == 7) and budgets.min() >= 0
  # mask_ratio < 0.5: a budget can exceed its modality's tokens; the rest comes from the other.
  keep, _ = _sample(keys[:100], (4, 4), 6)
  per_modality = np.stack([(keep < 4).sum(1), (keep >= 4).sum(1)], 1)
  assert np.all(per_modality.sum(1) == 6) and per_modality.max() <= 4


# ----------------------------------------------------------------------------- pure pieces


def test_patchify_round_trip_and_layout():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 16, 24, 3)).astype(np.float32)
  patches = np.asarray(multimae.patchify(jnp.asarray(images), 8))
  assert patches.shape == (2, 6, 8 * 8 * 3)
  # Patch (row 1, col 2) is token 1 * 3 + 2, its pixels in (p1, p2, c) order.
  np.testing.assert_array_equal(patches[:, 5], images[:, 8:16, 16:24].reshape(2, -1))
  back = multimae.unpatchify(jnp.asarray(patches), (2, 3), 8)
  np.testing.assert_array_equal(back, images)
  with pytest.raises(ValueError, match='not divisible'):
    multimae.patchify(jnp.zeros((1, 10, 16, 1)), 8)


def test_sincos_positions():
  emb = multimae.sincos_pos_embed((2, 3), 8)
  assert emb.shape == (1, 6, 8)
  # Token (y, x) = (1, 2): x-frequencies first, then y; the first frequency is 1.
  np.testing.assert_allclose(emb[0, 5, [0, 2, 4, 6]], [np.sin(2), np.cos(2), np.sin(1),
                                                       np.cos(1)], rtol=1e-6)
  with pytest.raises(ValueError, match='divisible by 4'):
    multimae.sincos_pos_embed((2, 2), 6)


def _np_losses(out):
  """float64 numpy re-derivation of objectives/mae.py."""
  f = lambda k: np.asarray(out[k], np.float64)
  mask_rgb, mask_comp = np.asarray(out['rgb_mask']), np.asarray(out['companion_mask'])
  t = f('rgb_target')
  t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
  per_patch = ((f('rgb_pred') - t) ** 2).mean(-1)
  rgb = np.mean([per_patch[v][mask_rgb[v]].mean() for v in range(len(t))])
  c = f('companion_target')
  c = (c - c.mean((1, 2), keepdims=True)) / np.sqrt(c.var((1, 2), keepdims=True) + 1e-6)
  per_patch = np.abs(f('companion_pred') - c).mean(-1)
  comp = np.mean([per_patch[v][mask_comp[v]].mean() for v in range(len(c))])
  logits, labels = f('seg_logits'), np.asarray(out['seg_labels'])
  valid = (labels != 255) & (labels < logits.shape[-1])
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  seg = ce[valid].mean()
  return rgb, comp, seg


def test_losses_match_float64_reference():
  rng = np.random.default_rng(3)
  views, n, classes = 4, 6, 5
  out = {'rgb_pred': rng.normal(size=(views, n, 12)), 'rgb_target': rng.normal(size=(views, n, 12)),
         'companion_pred': rng.normal(size=(views, n, 4)),
         'companion_target': rng.random((views, n, 4)) * (rng.random((views, n, 4)) < 0.3),
         'rgb_mask': rng.random((views, n)) < 0.75, 'companion_mask': rng.random((views, n)) < 0.75,
         'seg_logits': 3 * rng.normal(size=(views, 4, 4, classes)),
         'seg_labels': rng.integers(0, classes, (views, 4, 4))}
  out['rgb_mask'][:, 0] = out['companion_mask'][:, 0] = True  # every view has a masked patch
  out['seg_labels'][0, :2] = 255                               # ignored
  out['seg_labels'][1, 0, 0] = 7                               # beyond the classes: ignored
  out = {k: jnp.asarray(v, jnp.float32) if v.dtype.kind == 'f' else jnp.asarray(v)
         for k, v in out.items()}
  rgb, comp, seg = _np_losses(out)
  loss, metrics = mae.mae_loss(out)
  np.testing.assert_allclose(metrics['recon_rgb'], rgb, rtol=1e-5)
  np.testing.assert_allclose(metrics['recon_companion'], comp, rtol=1e-5)
  np.testing.assert_allclose(metrics['seg_ce'], seg, rtol=1e-5)
  np.testing.assert_allclose(loss, rgb + comp + seg, rtol=1e-5)
  # Only masked patches count: changing a visible patch's prediction changes nothing.
  visible = ~np.asarray(out['rgb_mask'])
  moved = jnp.where(visible[..., None], out['rgb_pred'] + 5.0, out['rgb_pred'])
  np.testing.assert_allclose(mae.rgb_loss(moved, out['rgb_target'], out['rgb_mask']),
                             metrics['recon_rgb'], rtol=1e-6)
  # SS: no seg term.
  ss = {k: v for k, v in out.items() if not k.startswith('seg')}
  np.testing.assert_allclose(mae.mae_loss(ss)[0], rgb + comp, rtol=1e-5)


# ----------------------------------------------------------------------------- model


def _model_and_views(row, batch=3, seed=0):
  config = tiny_config(row)
  model = pretrain.build_model(config)
  rng = np.random.default_rng(seed)
  g = config.views.global_size
  views = {'global_rgb': rng.normal(size=(2, batch, g, g, 3)),
           'global_companion': rng.random((2, batch, g, g, 1)),
           'local_rgb': np.zeros((0, batch, 16, 16, 3)),
           'local_companion': np.zeros((0, batch, 16, 16, 1))}
  views = {k: jnp.asarray(v, jnp.float32) for k, v in views.items()}
  if config.views.with_seg:
    views['global_seg'] = jnp.asarray(rng.integers(0, 10, (2, batch, g, g)), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), views, train=False)
  return config, model, variables, views


def test_decoders_see_only_visible_patches():
  config, model, variables, views = _model_and_views('multimae_mt')
  rngs = {'mask': jax.random.PRNGKey(5)}
  apply = jax.jit(lambda v: model.apply(variables, v, train=True, rngs=rngs))
  out = apply(views)
  p, g = config.model.patch_size, config.views.global_size
  grid = (g // p, g // p)

  def scatter(mask, per_patch_noise, channels):
    noise = np.where(np.asarray(mask)[..., None], per_patch_noise, 0.0)
    return multimae.unpatchify(jnp.asarray(noise, jnp.float32), grid, p).reshape(
        2, -1, g, g, channels)

  rng = np.random.default_rng(1)
  noisy = dict(views,
               global_rgb=views['global_rgb'] + scatter(
                   out['rgb_mask'], rng.normal(size=out['rgb_target'].shape), 3),
               global_companion=views['global_companion'] + scatter(
                   out['companion_mask'], rng.normal(size=out['companion_target'].shape), 1))
  changed = apply(noisy)
  # The masks and every prediction ignore the content of masked patches ...
  np.testing.assert_array_equal(changed['rgb_mask'], out['rgb_mask'])
  for name in ('rgb_pred', 'companion_pred', 'seg_logits'):
    np.testing.assert_allclose(changed[name], out[name], atol=1e-5, err_msg=name)
  assert not np.allclose(changed['rgb_target'], out['rgb_target'])
  # ... but not the content of visible ones.
  visible = dict(views, global_rgb=views['global_rgb'] + scatter(
      ~np.asarray(out['rgb_mask']), rng.normal(size=out['rgb_target'].shape), 3))
  assert not np.allclose(apply(visible)['rgb_pred'], out['rgb_pred'], atol=1e-3)
  # 25 % visible per view; masks come from the 'mask' stream when training, a fixed key in eval.
  assert np.all(out['budgets'].sum(1) == multimae.num_visible(2 * grid[0] * grid[1], 0.75))
  other = model.apply(variables, views, train=True, rngs={'mask': jax.random.PRNGKey(6)})
  assert not np.array_equal(other['rgb_mask'], out['rgb_mask'])
  eval_a = model.apply(variables, views, train=False)
  eval_b = model.apply(variables, views, train=False)
  np.testing.assert_array_equal(eval_a['rgb_mask'], eval_b['rgb_mask'])
  assert out['seg_logits'].shape == (6, g // 4, g // 4, 10)
  np.testing.assert_array_equal(out['seg_labels'],
                                np.asarray(views['global_seg']).reshape(6, g, g)[:, 2::4, 2::4])


def test_probe_readout_is_the_unmasked_rgb_tokens():
  config, _, variables, views = _model_and_views('multimae_ss')
  encoder = encoders.build_encoder(config.model)
  params = variables['params']['encoder']
  rgb, comp = views['global_rgb'][0], views['global_companion'][0]
  features = encoder.apply({'params': params}, rgb, comp, train=False)
  assert features.patches.shape == (3, 4, 4, 32) and features.cls.shape == (3, 32)
  # The pretraining path with every token visible gives the same tokens: [CLS, RGB, companion].
  keep = jnp.tile(jnp.arange(32)[None], (3, 1))
  encoded, grid = encoder.apply({'params': params}, rgb, comp, keep,
                                method=multimae.MultiMaeEncoder.encode_visible)
  assert grid == (4, 4)
  np.testing.assert_allclose(features.patches.reshape(3, 16, 32), encoded[:, 1:17], atol=1e-5)
  np.testing.assert_allclose(features.cls, encoded[:, 0], atol=1e-5)
  # One joint encoder: the RGB readout also sees the companion; it takes any probe resolution.
  other = encoder.apply({'params': params}, rgb, comp + 1.0, train=False)
  assert not np.allclose(other.patches, features.patches)
  big = encoder.apply({'params': params}, jnp.zeros((1, 48, 64, 3)), jnp.zeros((1, 48, 64, 1)),
                      train=False)
  assert big.patches.shape == (1, 6, 8, 32)


# ----------------------------------------------------------------------------- data


def test_seg_crop_uses_the_views_box_and_flip():
  rng = np.random.default_rng(0)
  b, h, w = 4, 32, 48
  # Labels constant on 8 x 8 blocks; the companion is the label / 255 and RGB's red channel
  # encodes it too, so each crop of seg must equal a function of the cropped pixels.
  blocks = rng.integers(0, 20, (b, h // 8, w // 8))
  seg = np.repeat(np.repeat(blocks, 8, 1), 8, 2).astype(np.uint8)
  seg[:, :2, :3] = 255
  rgb = rng.integers(0, 256, (b, h, w, 3)).astype(np.uint8)
  rgb[..., 0] = np.minimum(seg * 12, 255)
  cfg = augment.ViewConfig(global_size=16, local_size=8, num_local=2, photometric=False,
                           with_seg=True)
  make = jax.jit(augment.make_views, static_argnums=3)
  views = make(
      jax.random.PRNGKey(3), jnp.asarray(rgb), jnp.asarray(seg / 255.0, jnp.float32), cfg,
      None, jnp.asarray(seg))
  assert views['global_seg'].shape == (2, b, 16, 16) and views['local_seg'].shape == (2, b, 8, 8)
  assert views['global_seg'].dtype == jnp.int32
  for scale in ('global', 'local'):
    comp = np.rint(np.asarray(views[f'{scale}_companion'][..., 0]) * 255).astype(int)
    np.testing.assert_array_equal(views[f'{scale}_seg'], comp)
  # RGB (bilinear, antialiased) agrees inside the label regions, and not with mirrored labels.
  red = np.asarray(views['global_rgb'][..., 0]) * cfg.std[0] + cfg.mean[0]
  labels = np.asarray(views['global_seg'])
  padded = np.pad(labels, [(0, 0), (0, 0), (1, 1), (1, 1)], mode='edge')
  interior = np.all([padded[..., 1 + dy:17 + dy, 1 + dx:17 + dx] == labels
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
  agree = lambda lab: np.abs(red * 255 - np.minimum(lab * 12, 255))[interior] < 1.0
  assert interior.mean() > 0.2 and agree(labels).mean() > 0.95
  assert agree(labels[..., ::-1]).mean() < 0.7
  without = make(jax.random.PRNGKey(3), jnp.asarray(rgb), jnp.asarray(seg / 255.0, jnp.float32),
                 augment.ViewConfig(global_size=16, local_size=8, num_local=2, photometric=False))
  # The flag adds seg and changes nothing else; without it the views dict is the usual four.
  assert set(without) == {'global_rgb', 'global_companion', 'local_rgb', 'local_companion'}
  for name in without:
    np.testing.assert_array_equal(views[name], without[name])
  with pytest.raises(ValueError, match='with_seg'):
    augment.make_views(jax.random.PRNGKey(3), jnp.asarray(rgb), jnp.asarray(seg, jnp.float32),
                       augment.ViewConfig(global_size=16, num_local=0), seg=jnp.asarray(seg))
  with pytest.raises(ValueError, match='with_seg'):
    augment.make_views(jax.random.PRNGKey(3), jnp.asarray(rgb), jnp.asarray(seg, jnp.float32), cfg)


def test_pretrain_loader_ships_seg_only_when_asked():
  config = tiny_config('multimae_mt')
  loader = pipeline.pretrain_loader(config.data, 8, seed=0, start_step=0, num_steps=1,
                                    with_seg=True)
  batch = next(iter(loader))
  assert batch['seg'].shape == (8, 48, 64) and batch['seg'].dtype == np.uint8
  plain = next(iter(pipeline.pretrain_loader(config.data, 8, seed=0, start_step=0, num_steps=1)))
  assert set(plain) == {'rgb', 'companion'}
  np.testing.assert_array_equal(plain['rgb'], batch['rgb'])


# ----------------------------------------------------------------------------- THE step


@pytest.mark.parametrize('row', ROWS)
def test_rows_train_through_the_step(row):
  """Profiling's setup_step builds THE jitted step as the loop does (mode=profile)."""
  config = tiny_config(row)
  config.optim.update(lr=3e-3, warmup_fraction=0.0)
  setup = profiling.setup_step(config, total_steps=6)
  assert ('seg' in setup.batch) == (row == 'multimae_mt')
  state, losses = setup.state, []
  step = setup.compiled()
  for _ in range(6):
    state, metrics = step(state, setup.batch, setup.key)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert ('seg_ce' in metrics) == (row == 'multimae_mt')
  # Every parameter trains: the encoder, both decoders (and the seg decoder for MT).
  assert set(state.params) == {'encoder', 'rgb_decoder', 'companion_decoder'} | (
      {'seg_decoder'} if row == 'multimae_mt' else set())
