"""Tests for lemumo_jax.data.augment: crops against PIL / numpy / jax.image, synchronisation."""

import colorsys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from lemumo_jax.data import augment

B, H, W = 4, 32, 32
BASE = dict(global_size=16, local_size=8, num_local=4)
CFG_ON = augment.ViewConfig(**BASE)
CFG_OFF = augment.ViewConfig(**BASE, photometric=False)
CFG_OFF_LINEAR = augment.ViewConfig(**BASE, photometric=False, companion_resize='linear')
# One compiled function per config for the whole module (compiles dominate the runtime).
_make_views = jax.jit(augment.make_views, static_argnums=3)
# Eager jax dispatch compiles every primitive separately; jitted helpers compile once.
_crop = jax.jit(augment.crop_and_resize, static_argnums=(2, 3, 4))
_blur = jax.jit(augment.gaussian_blur, static_argnums=2)
_clean = jax.jit(augment.clean_view, static_argnums=2)
VIEW_KEYS = ('global_rgb', 'global_companion', 'local_rgb', 'local_companion')


@pytest.fixture(scope='module')
def batch():
  """rgb [B, H, W, 3] uint8 whose red channel rises along x; companions derived from it."""
  rs = np.random.RandomState(0)
  rgb = rs.randint(0, 256, (B, H, W, 3)).astype(np.uint8)
  rgb[..., 0] = (4 + 7 * np.arange(W))[None, None, :]
  red = (rgb[..., 0] / 255.0).astype(np.float32)
  sparse = (rs.rand(B, H, W) * (rs.rand(B, H, W) < 0.1)).astype(np.float32)
  return {'rgb': jnp.asarray(rgb), 'red': jnp.asarray(red), 'sparse': jnp.asarray(sparse)}


@pytest.fixture(scope='module')
def views_on(batch):
  # sample_ids passed explicitly everywhere for CFG_ON so that jit traces it once.
  return _make_views(jax.random.key(0), batch['rgb'], batch['sparse'], CFG_ON, jnp.arange(B))


def _red_of(rgb_view, cfg):
  return np.asarray(rgb_view[..., 0]) * cfg.std[0] + cfg.mean[0]


def test_shapes_dtypes_and_determinism(batch, views_on):
  expected = {'global_rgb': (2, B, 16, 16, 3), 'global_companion': (2, B, 16, 16, 1),
              'local_rgb': (4, B, 8, 8, 3), 'local_companion': (4, B, 8, 8, 1)}
  for name in VIEW_KEYS:
    assert views_on[name].shape == expected[name], name
    assert views_on[name].dtype == jnp.float32, name
    assert np.all(np.isfinite(views_on[name])), name
  again = _make_views(jax.random.key(0), batch['rgb'], batch['sparse'], CFG_ON, jnp.arange(B))
  other = _make_views(jax.random.key(1), batch['rgb'], batch['sparse'], CFG_ON, jnp.arange(B))
  for name in VIEW_KEYS:
    np.testing.assert_array_equal(views_on[name], again[name])
    assert not np.allclose(views_on[name], other[name]), name
  # Views of one sample differ from each other.
  assert not np.allclose(views_on['global_rgb'][0], views_on['global_rgb'][1])


def test_views_follow_sample_ids_not_batch_position(batch, views_on):
  """What makes the result independent of how the batch is sharded."""
  rev = slice(None, None, -1)
  flipped = _make_views(jax.random.key(0), batch['rgb'][rev], batch['sparse'][rev], CFG_ON,
                        jnp.arange(B)[rev])
  for name in VIEW_KEYS:
    np.testing.assert_allclose(flipped[name], views_on[name][:, rev], atol=1e-6)


def test_rgb_and_companion_crops_match_exactly_with_linear_companion(batch):
  views = _make_views(jax.random.key(3), batch['rgb'], batch['red'], CFG_OFF_LINEAR)
  directions = []
  for kind in ('global', 'local'):
    red = _red_of(views[f'{kind}_rgb'], CFG_OFF_LINEAR)
    comp = np.asarray(views[f'{kind}_companion'][..., 0])
    np.testing.assert_allclose(red, comp, atol=2e-5)
    directions += list(np.sign(np.mean(np.diff(comp, axis=-1), axis=(-2, -1))).ravel())
  # The red ramp rises along x, so flipped views fall: both must occur among 24 views.
  assert set(directions) == {-1.0, 1.0}


def test_rgb_and_nearest_companion_crops_match(batch):
  views = _make_views(jax.random.key(4), batch['rgb'], batch['red'], CFG_OFF)
  for kind in ('global', 'local'):
    red = _red_of(views[f'{kind}_rgb'], CFG_OFF)
    comp = np.asarray(views[f'{kind}_companion'][..., 0])
    # Nearest vs bilinear on a ramp of 7/255 per pixel: at most ~1 source pixel apart; a
    # mismatched crop or flip would be off by up to 0.8.
    assert np.max(np.abs(red - comp)) < 1.5 * 7 / 255
    np.testing.assert_array_equal(np.sign(np.diff(red.mean(-2), axis=-1)).mean(-1).round(),
                                  np.sign(np.diff(comp.mean(-2), axis=-1)).mean(-1).round())


def test_nearest_companion_keeps_only_source_values(batch, views_on):
  sparse = np.asarray(batch['sparse'])
  for kind in ('global', 'local'):
    comp = np.asarray(views_on[f'{kind}_companion'][..., 0])
    for b in range(B):
      assert np.all(np.isin(comp[:, b], sparse[b])), (kind, b)
    assert np.mean(comp == 0) > 0.7  # 90% of the source has no return; still sparse


def test_photometric_touches_rgb_only(batch, views_on):
  plain = _make_views(jax.random.key(0), batch['rgb'], batch['sparse'], CFG_OFF)
  for kind in ('global', 'local'):
    np.testing.assert_array_equal(views_on[f'{kind}_companion'], plain[f'{kind}_companion'])
    assert not np.allclose(views_on[f'{kind}_rgb'], plain[f'{kind}_rgb'])


def test_clean_view(batch):
  rgb, comp = _clean(batch['rgb'], batch['sparse'], (H, W))
  np.testing.assert_allclose(rgb, augment.normalize(batch['rgb'] / 255.0), atol=1e-5)
  np.testing.assert_array_equal(comp[..., 0], batch['sparse'])
  rgb, comp = _clean(batch['rgb'], batch['sparse'], (8, 12))
  assert rgb.shape == (B, 8, 12, 3) and comp.shape == (B, 8, 12, 1)
  full = augment.crop_and_resize(batch['rgb'][1], jnp.array([0., 0., 1., 1.]), (8, 12))
  np.testing.assert_allclose(rgb[1], augment.normalize(full / 255.0), atol=1e-5)
  with pytest.raises(ValueError, match='companion must be'):
    augment.clean_view(batch['rgb'], batch['sparse'][:, :-1], (8, 8))


# ----------------------------------------------------------------------------- crop_and_resize


def _random_case(seed, in_hw=(29, 37), channels=3):
  rs = np.random.RandomState(seed)
  image = rs.rand(*in_hw, channels).astype(np.float32)
  top, left = rs.uniform(0, 0.4, 2)
  box = np.array([top, left, rs.uniform(0.2, 1 - top), rs.uniform(0.2, 1 - left)])
  return image, box


def _bilinear_reference(image, box, out_hw):
  """Plain bilinear (no antialias), clamp-to-edge, pixel centres at j + 0.5; float64."""
  image = image.astype(np.float64)
  in_h, in_w = image.shape[:2]

  def taps(start, length, in_size, out_size):
    pos = start + (np.arange(out_size) + 0.5) * length / out_size - 0.5
    pos = np.clip(pos, 0, in_size - 1)
    lo = np.minimum(np.floor(pos).astype(int), in_size - 2)
    return lo, pos - lo

  r0, fr = taps(box[0] * in_h, box[2] * in_h, in_h, out_hw[0])
  c0, fc = taps(box[1] * in_w, box[3] * in_w, in_w, out_hw[1])
  rows = image[r0] * (1 - fr)[:, None, None] + image[r0 + 1] * fr[:, None, None]
  return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c0 + 1] * fc[None, :, None]


def _pil_reference(image, box, out_hw, resample):
  """PIL resize of each float channel with a crop box (PIL's BILINEAR is antialiased)."""
  in_h, in_w = image.shape[:2]
  pil_box = (box[1] * in_w, box[0] * in_h, (box[1] + box[3]) * in_w, (box[0] + box[2]) * in_h)
  return np.stack([np.asarray(Image.fromarray(image[..., c], 'F').resize(
      (out_hw[1], out_hw[0]), resample, box=pil_box)) for c in range(image.shape[-1])], -1)


@pytest.mark.parametrize('seed,out_hw', [(0, (12, 9)), (1, (40, 31))])
def test_crop_and_resize_matches_references(seed, out_hw):
  image, box = _random_case(seed)
  jbox = jnp.asarray(box, jnp.float32)
  plain = _crop(jnp.asarray(image), jbox, out_hw, 'linear', False)
  np.testing.assert_allclose(plain, _bilinear_reference(image, box, out_hw), atol=2e-5)
  smooth = _crop(jnp.asarray(image), jbox, out_hw, 'linear', True)
  np.testing.assert_allclose(smooth, _pil_reference(image, box, out_hw, Image.BILINEAR),
                             atol=2e-5)
  nearest = _crop(jnp.asarray(image), jbox, out_hw, 'nearest', True)
  np.testing.assert_array_equal(nearest, _pil_reference(image, box, out_hw, Image.NEAREST))
  # jax.image.scale_and_translate as a second reference for both linear modes.
  scale = np.array(out_hw) / (box[2:] * image.shape[:2])
  translation = -box[:2] * image.shape[:2] * scale
  for antialias, ours in ((False, plain), (True, smooth)):
    ref = jax.image.scale_and_translate(jnp.asarray(image, jnp.float32), out_hw + (3,), (0, 1),
                                        jnp.asarray(scale, jnp.float32),
                                        jnp.asarray(translation, jnp.float32), 'linear',
                                        antialias=antialias)
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_crop_and_resize_flip_and_dtype():
  image, box = _random_case(5)
  u8 = jnp.asarray(image * 255, jnp.uint8)
  for method in ('linear', 'nearest'):
    base = augment.crop_and_resize(u8, jnp.asarray(box), (10, 11), method)
    flipped = augment.crop_and_resize(u8, jnp.asarray(box), (10, 11), method, flip=True)
    assert base.dtype == jnp.float32
    np.testing.assert_allclose(flipped, base[:, ::-1], atol=1e-4)
  with pytest.raises(ValueError, match='method'):
    augment.crop_and_resize(u8, jnp.asarray(box), (4, 4), 'cubic')


# ----------------------------------------------------------------------------- crop sampling


@pytest.mark.parametrize('image_hw', [(32, 32), (30, 90), (90, 30)])
@pytest.mark.parametrize('scale', [(0.4, 1.0), (0.05, 0.4)])
def test_sampled_boxes_respect_scale_ratio_and_image(image_hw, scale):
  keys = jax.random.split(jax.random.key(7), 2000)
  boxes = np.asarray(jax.vmap(lambda k: augment.sample_crop_box(k, image_hw, scale))(keys))
  top, left, h, w = boxes.T
  area = h * w
  assert np.all(area >= scale[0] - 1e-5) and np.all(area <= scale[1] + 1e-5)
  aspect = (w * image_hw[1]) / (h * image_hw[0])
  assert np.all(aspect >= 3 / 4 - 1e-4) and np.all(aspect <= 4 / 3 + 1e-4)
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= 1 + 1e-5) and np.all(left + w <= 1 + 1e-5)
  if image_hw[0] == image_hw[1]:  # no fallback needed: the whole range is reached
    assert area.min() < scale[0] + 0.02 and area.max() > scale[1] - 0.05


# ----------------------------------------------------------------------------- photometric ops


@pytest.fixture(scope='module')
def colour_image():
  return np.random.RandomState(11).rand(6, 7, 3).astype(np.float32)


def test_hue_matches_colorsys(colour_image):
  for shift in (-0.1, 0.03, 0.5):
    got = np.asarray(augment.adjust_hue(jnp.asarray(colour_image), shift))
    ref = np.empty_like(colour_image, dtype=np.float64)
    for idx in np.ndindex(colour_image.shape[:2]):
      h, s, v = colorsys.rgb_to_hsv(*colour_image[idx].astype(np.float64))
      ref[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_blend_ops_match_numpy(colour_image):
  x = colour_image.astype(np.float64)
  luma = x @ np.array([0.299, 0.587, 0.114])
  img = jnp.asarray(colour_image)
  np.testing.assert_allclose(augment.adjust_brightness(img, 1.3), np.clip(1.3 * x, 0, 1),
                             atol=1e-6)
  np.testing.assert_allclose(augment.adjust_contrast(img, 0.7),
                             np.clip(0.7 * x + 0.3 * luma.mean(), 0, 1), atol=1e-6)
  np.testing.assert_allclose(augment.adjust_saturation(img, 1.2),
                             np.clip(1.2 * x - 0.2 * luma[..., None], 0, 1), atol=1e-6)
  gray = np.asarray(augment.rgb_to_grayscale(img))
  np.testing.assert_allclose(gray, np.repeat(luma[..., None], 3, -1), atol=1e-6)
  np.testing.assert_allclose(augment.normalize(img),
                             (x - augment.IMAGENET_MEAN) / augment.IMAGENET_STD, atol=1e-5)


def test_solarize_threshold():
  x = jnp.array([0.0, 0.3, 0.4999, 0.5, 0.8, 1.0])
  np.testing.assert_allclose(augment.solarize(x, 0.5), [0.0, 0.3, 0.4999, 0.5, 0.2, 0.0],
                             atol=1e-6)


def test_gaussian_blur(colour_image):
  img = jnp.asarray(colour_image)
  np.testing.assert_allclose(_blur(img, 0.1, 6), colour_image, atol=1e-6)
  sigma, radius = 1.3, 4
  ref = colour_image.astype(np.float64)
  for axis in (0, 1):  # jnp 'reflect' padding == scipy 'mirror'
    ref = scipy.ndimage.gaussian_filter1d(ref, sigma, axis=axis, mode='mirror',
                                          truncate=radius / sigma)
  np.testing.assert_allclose(_blur(img, sigma, radius), ref, atol=1e-5)


def test_color_jitter_and_photometric_stack(colour_image):
  img = jnp.asarray(colour_image)
  key = jax.random.key(2)
  still = augment.ViewConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
  np.testing.assert_allclose(augment.color_jitter(key, img, still), img, atol=1e-5)
  assert not np.allclose(augment.color_jitter(key, img, augment.ViewConfig()), img)
  only = dict(jitter_prob=0.0, grayscale_prob=0.0)
  gray = augment.apply_photometric(key, img, 0.0, 0.0, augment.ViewConfig(
      **{**only, 'grayscale_prob': 1.0}))
  np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-6)
  sol = augment.apply_photometric(key, img, 0.0, 1.0, augment.ViewConfig(**only))
  np.testing.assert_allclose(sol, augment.solarize(img, 0.5), atol=1e-6)
  untouched = augment.apply_photometric(key, img, 0.0, 0.0, augment.ViewConfig(**only))
  np.testing.assert_array_equal(untouched, img)


# ----------------------------------------------------------------------------- config


def test_from_config():
  cfg = ml_collections.ConfigDict({'num_local': 6, 'global_scale': [0.5, 1.0],
                                   'companion_resize': 'linear'})
  views = augment.ViewConfig.from_config(cfg)
  assert views.num_local == 6 and views.global_scale == (0.5, 1.0)
  assert views.companion_resize == 'linear' and views.global_size == 224
  with pytest.raises(ValueError, match='num_locals'):
    augment.ViewConfig.from_config({'num_locals': 3})
  with pytest.raises(ValueError, match='companion_resize'):
    augment.ViewConfig(companion_resize='bicubic')
  with pytest.raises(ValueError, match='local_scale'):
    augment.ViewConfig(local_scale=(0.5, 0.1))
