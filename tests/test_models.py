"""ViT pieces, fusion routing masks, the two pruned layer-0 implementations, encoders, projector."""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lemumo_jax.models import encoders, heads, parts, routing, vit

jax.config.update('jax_default_matmul_precision', 'highest')

PATCH = 8
TINY = dict(family='fusion', fusion_mode='pruned', layer0_impl='structured', img_size=32,
            patch_size=PATCH, width=32, depth=2, num_heads=4, mlp_ratio=4.0,
            companion_channels=1, dtype='float32')


def make_inputs(size, batch=2, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return (jax.random.normal(k1, (batch, size, size, 3)),
          jax.random.normal(k2, (batch, size, size, 1)))


def init_params(cfg, size=32, seed=0):
  """Random encoder params in the model's tree (numpy, no compile): kernels ~ N(0, 1/fan_in),
  LayerNorm scales 1 + N(0, 0.1^2), biases / tokens / embeddings N(0, 0.1^2). Non-zero biases
  and non-unit scales, so a wrong slice or a dropped term cannot hide."""
  model = encoders.build_encoder(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *make_inputs(size),
                                             train=False))
  rng = np.random.default_rng(seed)

  def sample(path, leaf):
    name = jax.tree_util.keystr(path)
    noise = rng.normal(size=leaf.shape)
    if name.endswith("['kernel']"):
      return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])), jnp.float32)
    if name.endswith("['scale']"):
      return jnp.asarray(1 + 0.1 * noise, jnp.float32)
    return jnp.asarray(0.1 * noise, jnp.float32)

  return jax.tree_util.tree_map_with_path(sample, shapes)


def flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


# ------------------------------------------------------------------------------------- masks


def test_layer0_and_persistent_mask_rows():
  n = 4
  t = 1 + 3 * n
  cls, fus, cam, mod = 0, list(range(1, 1 + n)), list(range(1 + n, 1 + 2 * n)), list(
      range(1 + 2 * n, t))
  layer0, persistent = routing.layer0_mask(n), routing.persistent_mask(n)
  assert layer0.shape == persistent.shape == (t, t) and layer0.dtype == bool
  for q in range(t):
    if q in fus:
      i = q - 1
      allowed0 = {cls, fus[i], cam[i], mod[i]}
      allowed_p = {cls, cam[i], mod[i]} | set(fus)
    else:  # CLS, C and M rows: unrestricted
      allowed0 = allowed_p = set(range(t))
    for k in range(t):
      assert layer0[q, k] == (k in allowed0), (q, k)
      assert persistent[q, k] == (k in allowed_p), (q, k)
  assert layer0[fus[1]].sum() == 4 and persistent[fus[1]].sum() == 3 + n
  assert routing.attention_mask(n, 0, 'pruned').tolist() == layer0.tolist()
  assert routing.attention_mask(n, 0, 'persistent').tolist() == layer0.tolist()
  assert routing.attention_mask(n, 3, 'persistent').tolist() == persistent.tolist()
  assert routing.attention_mask(n, 1, 'pruned') is None
  with pytest.raises(ValueError, match='fusion_mode'):
    routing.attention_mask(n, 1, 'dense')


def test_structured_attention_matches_float64_masked_softmax():
  n, width, heads_ = 3, 8, 2
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 1 + 3 * n, width))
  kernel, bias = rng.normal(size=(width, 3 * width)), rng.normal(size=(3 * width,))
  got = routing.structured_layer0_attention(
      jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32),
      jnp.asarray(bias, jnp.float32), n=n, num_heads=heads_)
  # float64 reference: dense softmax per head over the keys the mask table allows.
  mask = routing.layer0_mask(n)
  qkv = x @ kernel + bias
  hd = width // heads_
  want = np.zeros((2, 1 + n, width))
  for b in range(2):
    for h in range(heads_):
      q = qkv[b, :, h * hd:(h + 1) * hd]
      k = qkv[b, :, width + h * hd:width + (h + 1) * hd]
      v = qkv[b, :, 2 * width + h * hd:2 * width + (h + 1) * hd]
      for row in range(1 + n):
        logits = np.where(mask[row], k @ q[row] / np.sqrt(hd), -np.inf)
        p = np.exp(logits - logits.max())
        want[b, row, h * hd:(h + 1) * hd] = (p / p.sum()) @ v
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_resize_grid_tokens():
  tokens = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(1, 6, 4)
  assert vit.resize_grid_tokens(tokens, (2, 3), (2, 3)) is tokens
  constant = jnp.full((1, 16, 4), 0.7)
  np.testing.assert_allclose(vit.resize_grid_tokens(constant, (4, 4), (2, 3)), 0.7, atol=1e-6)
  assert vit.resize_grid_tokens(tokens, (2, 3), (4, 5)).shape == (1, 20, 4)


# ------------------------------------------------------------------------- pruned layer 0


@pytest.mark.parametrize('size', [32, 16])  # base grid 4x4, and a "local crop" 2x2 grid
def test_structured_equals_masked_outputs_and_gradients(size):
  params = init_params(TINY)
  rgb, companion = make_inputs(size, seed=1)
  w_cls = jax.random.normal(jax.random.PRNGKey(2), (2, 32))
  w_patch = jax.random.normal(jax.random.PRNGKey(3), (2, size // PATCH, size // PATCH, 32))

  def run(impl):
    model = encoders.build_encoder(dict(TINY, layer0_impl=impl))

    def loss(p, r, c):
      feats = model.apply(p, r, c, train=False)
      return jnp.sum(feats.cls * w_cls) + jnp.sum(feats.patches * w_patch), feats

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, feats), grads = grad_fn(params, rgb, companion)
    return feats, grads

  feats_s, grads_s = run('structured')
  feats_m, grads_m = run('masked')
  assert feats_s.cls.shape == (2, 32)
  assert feats_s.patches.shape == (2, size // PATCH, size // PATCH, 32)
  np.testing.assert_allclose(feats_s.cls, feats_m.cls, atol=1e-5, rtol=0)
  np.testing.assert_allclose(feats_s.patches, feats_m.patches, atol=1e-5, rtol=0)
  flat_s = flax.traverse_util.flatten_dict(grads_s[0]['params'], sep='/')
  flat_m = flax.traverse_util.flatten_dict(grads_m[0]['params'], sep='/')
  assert flat_s.keys() == flat_m.keys()
  def assert_close(got, want, name):
    # 1e-5 relative to the leaf's gradient scale: leaves summed over many tokens reach ~30,
    # where float32 rounding of the two summation orders alone is ~1e-5.
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0, err_msg=name)

  for name in flat_s:
    assert_close(flat_s[name], flat_m[name], name)
  # The modality stems learn only through layer 0's F->C/M and CLS->C/M attention.
  assert np.abs(flat_s['companion_embed/proj/kernel']).max() > 1e-3
  for got, want, name in zip(grads_s[1:], grads_m[1:], ('rgb', 'companion')):
    assert_close(got, want, name)


@pytest.mark.parametrize('impl', ['structured', 'masked'])
def test_layer0_fusion_token_sees_only_its_own_patches(impl):
  cfg = dict(TINY, depth=1, layer0_impl=impl)  # output F_i = norm(F_i after layer 0)
  params = init_params(cfg)
  rgb, companion = make_inputs(32, batch=1)
  grid, i, j = 4, (1, 2), (3, 0)

  def bump(image, cell):
    rows, cols = slice(cell[0] * PATCH, (cell[0] + 1) * PATCH), slice(cell[1] * PATCH,
                                                                         (cell[1] + 1) * PATCH)
    return image.at[:, rows, cols].add(1.5)

  rgb_batch = jnp.concatenate([rgb, bump(rgb, j), rgb, bump(rgb, i), rgb])
  companion_batch = jnp.concatenate([companion, companion, bump(companion, j), companion,
                                     bump(companion, i)])
  model = encoders.build_encoder(cfg)
  patches = np.asarray(jax.jit(lambda p, r, c: model.apply(p, r, c, train=False).patches)(
      params, rgb_batch, companion_batch))
  assert patches.shape == (5, grid, grid, 32)
  base = patches[0]
  for changed in (1, 2):  # C_j or M_j changed: F_i is untouched, F_j moves
    np.testing.assert_allclose(patches[changed][i], base[i], atol=1e-6, rtol=0)
    assert np.abs(patches[changed][j] - base[j]).max() > 1e-3
    others = [(r, c) for r in range(grid) for c in range(grid) if (r, c) != j]
    for cell in others:
      np.testing.assert_allclose(patches[changed][cell], base[cell], atol=1e-6, rtol=0)
  for changed in (3, 4):  # C_i or M_i changed: F_i moves
    assert np.abs(patches[changed][i] - base[i]).max() > 1e-3


def test_persistent_differs_and_flop_budget():
  params = init_params(TINY)
  rgb, companion = make_inputs(32)
  outputs = {}
  for mode in ('pruned', 'persistent'):
    model = encoders.build_encoder(dict(TINY, fusion_mode=mode, layer0_impl='masked'))
    outputs[mode] = jax.jit(lambda p, r, c, m=model: m.apply(p, r, c, train=False))(
        params, rgb, companion)
  assert np.all(np.isfinite(outputs['persistent'].patches))
  assert outputs['persistent'].patches.shape == outputs['pruned'].patches.shape
  assert np.abs(outputs['persistent'].cls - outputs['pruned'].cls).max() > 1e-3

  # FLOPs at img 64 / patch 8 (n = 64): structured < masked, and fused ~ an RGB-only ViT.
  cfg = dict(TINY, img_size=64)
  rgb, companion = make_inputs(64, batch=1)
  cost = {}
  for name, model_cfg in [('structured', cfg), ('masked', dict(cfg, layer0_impl='masked')),
                          ('rgb_vit', dict(cfg, family='vit', inputs='rgb'))]:
    model = encoders.build_encoder(model_cfg)
    p = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), rgb, companion,
                                              train=False))
    cost[name] = flops(lambda p_, r, c, m=model: m.apply(p_, r, c, train=False).cls, p, rgb,
                       companion)
  assert cost['structured'] < 0.8 * cost['masked'], cost
  assert cost['structured'] < 1.3 * cost['rgb_vit'], cost


# -------------------------------------------------------------------------------- encoders


def test_vit_family_shapes_and_timm_names():
  rgb, companion = make_inputs(32)
  for inputs, channels in (('rgb', 3), ('companion', 1)):
    model = encoders.build_encoder(dict(TINY, family='vit', inputs=inputs))
    # Shapes only: eval_shape traces without compiling.
    params = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), rgb, companion,
                                                   train=False))
    names = set(flax.traverse_util.flatten_dict(params['params'], sep='/'))
    for name in ('patch_embed/proj/kernel', 'cls_token', 'pos_embed', 'blocks_0/attn/qkv/kernel',
                 'blocks_0/attn/proj/kernel', 'blocks_1/mlp/fc1/kernel', 'blocks_1/norm2/scale',
                 'norm/scale'):
      assert name in names, (name, sorted(names))
    assert params['params']['patch_embed']['proj']['kernel'].shape == (PATCH, PATCH, channels, 32)
    assert params['params']['pos_embed'].shape == (1, 1 + 16, 32)
    for size in (32, 16):
      feats = jax.eval_shape(lambda p, r, c, m=model: m.apply(p, r, c, train=True), params,
                             *make_inputs(size))
      assert isinstance(feats, parts.Features)
      assert feats.cls.shape == (2, 32) and feats.patches.shape == (2, size // 8, size // 8, 32)
      assert feats.cls.dtype == feats.patches.dtype == jnp.float32
  # Numbers once: the companion ViT reads the companion, not the RGB image.
  model = encoders.build_encoder(dict(TINY, family='vit', inputs='companion'))
  params = init_params(dict(TINY, family='vit', inputs='companion'))
  apply = jax.jit(lambda p, r, c: model.apply(p, r, c, train=False).cls)
  np.testing.assert_array_equal(apply(params, rgb, companion), apply(params, rgb + 1, companion))
  assert np.abs(apply(params, rgb, companion) - apply(params, rgb, companion + 1)).max() > 1e-3


def test_bfloat16_compute_close_to_float32():
  cfg16 = dict(TINY, dtype='bfloat16')
  rgb, companion = make_inputs(32)
  params = init_params(TINY)
  params16 = jax.eval_shape(lambda: encoders.build_encoder(cfg16).init(
      jax.random.PRNGKey(0), rgb, companion, train=False))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params16))
  feats = {}
  for name, cfg in (('f32', TINY), ('bf16', cfg16)):
    model = encoders.build_encoder(cfg)
    feats[name] = jax.jit(lambda p, r, c, m=model: m.apply(p, r, c, train=False))(
        params, rgb, companion)
  assert feats['bf16'].cls.dtype == jnp.float32
  for field in ('cls', 'patches'):
    a, b = np.asarray(getattr(feats['f32'], field)), np.asarray(getattr(feats['bf16'], field))
    assert np.all(np.isfinite(b))
    # Outputs are LayerNormed (unit scale); bfloat16 keeps ~3 significant digits per op.
    assert np.abs(a - b).max() < 0.15 and np.abs(a - b).mean() < 0.03, np.abs(a - b).max()


def test_build_encoder_rejects_unknown_choices():
  for key, value in (('family', 'late'), ('fusion_mode', 'dense'), ('layer0_impl', 'fast'),
                     ('dtype', 'float16')):
    with pytest.raises(ValueError, match=key):
      encoders.build_encoder(dict(TINY, **{key: value}))
  with pytest.raises(ValueError, match='inputs'):
    encoders.build_encoder(dict(TINY, family='vit', inputs='thermal'))
  model = encoders.build_encoder(ml_collections.ConfigDict(TINY))  # what configs pass
  assert isinstance(model, encoders.FusionEncoder) and model.layer0_impl == 'structured'
  with pytest.raises(ValueError, match='companion'):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                      jnp.zeros((1, 32, 32, 2)), train=False))


# ------------------------------------------------------------------------------- projector


def test_projector_batchnorm_train_and_eval():
  proj = heads.Projector(hidden_dim=16, num_hidden_layers=2, out_dim=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 5)) * 3.0 + 1.0
  variables = proj.init(jax.random.PRNGKey(1), x, train=False)
  p = variables['params']
  # Non-trivial BN affine so scale/bias handling is checked too.
  p = jax.tree_util.tree_map(lambda a: a + 0.3, p)
  variables = {'params': p, 'batch_stats': variables['batch_stats']}

  def numpy_forward(x, stats):
    """float64; stats: per layer (mean, var) or None for batch statistics."""
    h = np.asarray(x, np.float64)
    used = []
    for i in range(2):
      # Pre-BN layers carry no bias (BN's shift replaces it).
      assert 'bias' not in p[f'dense_{i}']
      h = h @ np.asarray(p[f'dense_{i}']['kernel'], np.float64)
      mean, var = (h.mean(0), h.var(0)) if stats is None else stats[i]
      used.append((mean, var))
      h = (h - mean) / np.sqrt(var + 1e-5) * np.asarray(p[f'bn_{i}']['scale']) + np.asarray(
          p[f'bn_{i}']['bias'])
      h = np.maximum(h, 0)
    return h @ np.asarray(p['dense_2']['kernel']) + np.asarray(p['dense_2']['bias']), used

  z_train, updates = proj.apply(variables, x, train=True, mutable=['batch_stats'])
  assert z_train.shape == (6, 8)
  want_train, batch_stats = numpy_forward(x, None)
  np.testing.assert_allclose(z_train, want_train, atol=1e-4, rtol=1e-4)
  # Running averages: 0.9 * old (mean 0, var 1) + 0.1 * batch.
  for i, (mean, var) in enumerate(batch_stats):
    np.testing.assert_allclose(updates['batch_stats'][f'bn_{i}']['mean'], 0.1 * mean, atol=1e-4,
                               rtol=1e-4)
    np.testing.assert_allclose(updates['batch_stats'][f'bn_{i}']['var'], 0.9 + 0.1 * var,
                               atol=1e-4, rtol=1e-4)
  new_vars = {'params': p, 'batch_stats': updates['batch_stats']}
  z_eval = proj.apply(new_vars, x, train=False)
  running = [(np.asarray(updates['batch_stats'][f'bn_{i}']['mean'], np.float64),
              np.asarray(updates['batch_stats'][f'bn_{i}']['var'], np.float64)) for i in range(2)]
  np.testing.assert_allclose(z_eval, numpy_forward(x, running)[0], atol=1e-4, rtol=1e-4)
  assert np.abs(np.asarray(z_eval) - np.asarray(z_train)).max() > 1e-2
  # Eval does not depend on the rest of the batch; train does.
  np.testing.assert_allclose(proj.apply(new_vars, x[:2], train=False), z_eval[:2], atol=1e-5)
  z_train_2 = proj.apply(new_vars, x[:2], train=True, mutable=['batch_stats'])[0]
  assert np.abs(np.asarray(z_train_2) - np.asarray(z_train[:2])).max() > 1e-2


@pytest.mark.parametrize('family', [dict(family='fusion'), dict(family='vit', inputs='companion'),
                                    dict(family='early_fusion'), dict(family='late_fusion'),
                                    dict(family='dual'), dict(family='multimae')],
                         ids=lambda f: '_'.join(f.values()))
def test_companion_valid_channel_is_what_the_stem_reads(family):
  # model.companion_valid: every family's companion stem reads [companion, companion != 0].
  # The same params through a plain two-channel model fed that stack by hand must agree.
  cfg = dict(TINY, **family)
  with_valid = dict(cfg, companion_valid=True)
  params = init_params(with_valid)
  rgb, companion = make_inputs(32)
  sparse = jnp.where(jax.random.uniform(jax.random.PRNGKey(3), companion.shape) < 0.7, 0.0,
                     jnp.abs(companion))
  stacked = jnp.concatenate([sparse, (sparse != 0).astype(sparse.dtype)], axis=-1)
  apply = lambda c, r, comp: encoders.build_encoder(c).apply(params, r, comp, train=False)
  got = apply(with_valid, rgb, sparse)
  want = apply(dict(cfg, companion_channels=2), rgb, stacked)
  flat = lambda f: np.concatenate([np.ravel(x) for x in jax.tree.leaves(f)])
  np.testing.assert_allclose(flat(got), flat(want), atol=1e-6, rtol=0)
  # And the valid channel reaches the output (the companion CLS for 'dual', whose patches are
  # the RGB branch's): a zero second channel gives something else.
  without = apply(dict(cfg, companion_channels=2), rgb, jnp.concatenate(
      [sparse, jnp.zeros_like(sparse)], axis=-1))
  assert np.abs(flat(got) - flat(without)).max() > 1e-3
  np.testing.assert_array_equal(parts.companion_stem_input(sparse, False), sparse)
