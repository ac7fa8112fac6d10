"""Multi-crop views, synchronised across RGB and the companion map (DESIGN.md sections 3, 5).

Runs on the device inside the jitted training step: pure jax.numpy, static shapes, random
choices made with `jnp.where` / `lax.switch` (no Python control flow on traced values), vmapped
over views and samples. The batch may be sharded on axis 0; each
(view, sample) draws from `fold_in(fold_in(view_set_key, view), sample_id)`, so a sample's views
do not depend on the batch size or on how the batch is split across devices.

Per view the crop box and the horizontal flip are drawn once and applied to both streams. RGB
is resampled bilinearly (with a triangle antialiasing filter when downscaling, like PIL and
torchvision's antialias=True), then receives the DINO/LeJEPA photometric stack in torchvision's
order: ColorJitter (its four ops in a random order per view, as torchvision does),
RandomGrayscale, GaussianBlur, RandomSolarize, then ImageNet normalisation. The companion map is
only cropped, resized and flipped: nearest neighbour by default (depth keeps only values that
exist in the source, sparse returns are never smeared), or 'linear' (e.g. thermal).

Coordinates: continuous pixel coordinates where pixel j spans [j, j + 1) (its centre is at
j + 0.5, the convention of geometry.project_points). A crop box is (top, left, height, width)
as fractions of the image height and width.

Resampling is separable: an [out, in] weight matrix per axis (bilinear) or an index vector per
axis (nearest), so a crop costs two small matmuls or two gathers instead of a per-pixel gather.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lemumo_jax.data import schema

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601 luma, the weights of torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
COMPANION_METHODS = ('nearest', 'linear')


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """Multi-crop and photometric settings (defaults: paper section 3.2, DINO/LeJEPA recipe).

  `global_blur_prob` / `global_solarize_prob` give one probability per global view; view v
  uses entry min(v, len - 1), so the pair also serves a single-view or V_g > 2 setting.
  """
  num_global: int = 2
  num_local: int = 8
  global_size: int = 224
  local_size: int = 96
  global_scale: tuple[float, float] = (0.4, 1.0)
  local_scale: tuple[float, float] = (0.05, 0.4)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  crop_attempts: int = 10
  flip_prob: float = 0.5
  antialias: bool = True
  companion_resize: str = 'nearest'
  photometric: bool = True
  # Also crop the seg labels [B, H, W] with each view's box and flip (nearest): the MultiMAE-MT
  # row's supervised output task. Off for every other row (their views and numerics unchanged).
  with_seg: bool = False
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_prob: float = 0.2
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  global_blur_prob: tuple[float, ...] = (1.0, 0.1)
  local_blur_prob: float = 0.5
  global_solarize_prob: tuple[float, ...] = (0.0, 0.2)
  local_solarize_prob: float = 0.0
  solarize_threshold: float = 0.5
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    if self.companion_resize not in COMPANION_METHODS:
      raise ValueError(f'ViewConfig.companion_resize={self.companion_resize!r}; '
                       f'expected one of {COMPANION_METHODS}')
    for name in ('global_scale', 'local_scale', 'ratio', 'blur_sigma'):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise ValueError(f'ViewConfig.{name}={(lo, hi)} must satisfy 0 < low <= high')
    for name in ('global_scale', 'local_scale'):
      if getattr(self, name)[1] > 1:
        raise ValueError(f'ViewConfig.{name}={getattr(self, name)}: area fractions exceed 1')
    probs = [getattr(self, n) for n in ('flip_prob', 'jitter_prob', 'grayscale_prob',
                                        'local_blur_prob', 'local_solarize_prob')]
    probs += list(self.global_blur_prob) + list(self.global_solarize_prob)
    if not all(0 <= p <= 1 for p in probs):
      raise ValueError(f'ViewConfig probabilities must lie in [0, 1], got {probs}')
    if not self.global_blur_prob or not self.global_solarize_prob:
      raise ValueError('ViewConfig.global_blur_prob / global_solarize_prob must be non-empty')
    if min(self.num_global, self.num_local) < 0 or self.crop_attempts < 1:
      raise ValueError('ViewConfig view counts must be >= 0 and crop_attempts >= 1')

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> ViewConfig:
    """Builds from an ml_collections ConfigDict (or dict) whose keys are field names."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg.keys()) - set(fields))
    if unknown:
      raise ValueError(f'unknown view config keys {unknown}; known: {sorted(fields)}')
    kwargs = {}
    for name in cfg.keys():
      value = cfg[name]
      kwargs[name] = tuple(value) if isinstance(value, Sequence) and not isinstance(
          value, str) else value
    return cls(**kwargs)

  @property
  def blur_radius(self) -> int:
    """Static kernel half-width: 3 sigma of the widest blur."""
    return max(1, math.ceil(3 * self.blur_sigma[1]))


# ----------------------------------------------------------------------------- crop sampling


def sample_crop_box(key: jax.Array, image_hw: tuple[int, int], scale: tuple[float, float],
                    ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    attempts: int = 10) -> jax.Array:
  """RandomResizedCrop box for one image -> [4] float32 (top, left, height, width) fractions.

  Area fraction ~ U(scale), aspect (width / height in pixels) log-uniform in `ratio`. As in
  torchvision, `attempts` candidates are drawn and the first one that fits inside the image is
  kept (vectorised: all are drawn, the first fitting one selected); if none fits, the largest
  centred box with the aspect clamped to `ratio`. Positions are continuous (sub-pixel).
  """
  height, width = float(image_hw[0]), float(image_hw[1])
  # One draw for everything: each jax.random call is a separate hash in the compiled graph.
  u = jax.random.uniform(key, (2 * attempts + 2,))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:attempts])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[attempts:2 * attempts])
  box_w = jnp.sqrt(area * aspect)
  box_h = jnp.sqrt(area / aspect)
  fits = (box_w <= width) & (box_h <= height)
  first = jnp.argmax(fits)
  u_top, u_left = u[2 * attempts], u[2 * attempts + 1]
  h, w = box_h[first], box_w[first]
  chosen = jnp.stack([u_top * (height - h), u_left * (width - w), h, w])

  in_ratio = width / height
  if in_ratio < ratio[0]:
    fb_w, fb_h = width, width / ratio[0]
  elif in_ratio > ratio[1]:
    fb_w, fb_h = height * ratio[1], height
  else:
    fb_w, fb_h = width, height
  fallback = jnp.array([(height - fb_h) / 2, (width - fb_w) / 2, fb_h, fb_w])
  box = jnp.where(jnp.any(fits), chosen, fallback)
  return (box / jnp.array([height, width, height, width])).astype(jnp.float32)


# ----------------------------------------------------------------------------- resampling


def _sample_centres(start: jax.Array, length: jax.Array, out_size: int) -> jax.Array:
  """Continuous source coordinates of the out_size output pixel centres -> [out]."""
  return start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * (length / out_size)


def _linear_weights(start, length, in_size: int, out_size: int, antialias: bool) -> jax.Array:
  """Triangle-filter weights [out, in]; the filter widens by the downscale factor if antialias.

  Rows are renormalised over in-image taps, which equals clamp-to-edge for plain bilinear.
  """
  centres = _sample_centres(start, length, out_size)
  width = jnp.maximum(length / out_size, 1.0) if antialias else 1.0
  dist = (centres[:, None] - (jnp.arange(in_size, dtype=jnp.float32) + 0.5)[None, :]) / width
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(dist))
  return weights / jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1e-12)


def _nearest_indices(start, length, in_size: int, out_size: int) -> jax.Array:
  """Index of the source pixel containing each output centre -> [out] int32."""
  centres = _sample_centres(start, length, out_size)
  return jnp.clip(jnp.floor(centres), 0, in_size - 1).astype(jnp.int32)


def _nearest_selection(start, length, in_size: int, out_size: int) -> jax.Array:
  """One-hot [out, in] float32: row o picks the source pixel containing output centre o."""
  indices = _nearest_indices(start, length, in_size, out_size)
  return (indices[:, None] == jnp.arange(in_size)[None, :]).astype(jnp.float32)


def crop_and_resize(image: jax.Array, box: jax.Array, out_hw: tuple[int, int],
                    method: str = 'linear', antialias: bool = True,
                    flip: jax.Array | bool = False) -> jax.Array:
  """Crops one image to `box` and resamples it to `out_hw`, optionally mirrored left-right.

  image [H, W, C] (any real dtype); box [4] = (top, left, height, width) as fractions of H
  and W (continuous coordinates, may be traced); method 'linear' (bilinear, antialiased when
  downscaling if `antialias`) or 'nearest' (output values are source values). flip is a
  (traced) bool. Returns [out_h, out_w, C] float32 in the input's units.
  """
  if image.ndim != 3:
    raise ValueError(f'crop_and_resize expects image [H, W, C], got shape {image.shape}')
  in_h, in_w = image.shape[:2]
  out_h, out_w = out_hw
  top, left = box[0] * in_h, box[1] * in_w
  box_h, box_w = box[2] * in_h, box[3] * in_w
  if method == 'nearest':
    # One-hot selection matrices: a matmul (the MXU on a TPU) instead of per-element gathers,
    # which the TPU compiler prices at ~30x their bytes. Exact: each output is one source value
    # times 1 plus zeros (HIGHEST keeps float32 on TPU/GPU matrix units).
    row_w = _nearest_selection(top, box_h, in_h, out_h)
    col_w = _nearest_selection(left, box_w, in_w, out_w)
    precision = jax.lax.Precision.HIGHEST
  elif method == 'linear':
    row_w = _linear_weights(top, box_h, in_h, out_h, antialias)
    col_w = _linear_weights(left, box_w, in_w, out_w, antialias)
    precision = None
  else:
    raise ValueError(f'crop_and_resize method={method!r}; expected nearest or linear')
  col_w = jnp.where(flip, col_w[::-1], col_w)
  x = image.astype(jnp.float32)
  # Contract the axis whose intermediate is smaller first (shapes are static).
  if out_h * in_w <= in_h * out_w:
    return jnp.einsum('pw,owc->opc', col_w,
                      jnp.einsum('oh,hwc->owc', row_w, x, precision=precision),
                      precision=precision)
  return jnp.einsum('oh,hpc->opc', row_w,
                    jnp.einsum('pw,hwc->hpc', col_w, x, precision=precision),
                    precision=precision)


# ----------------------------------------------------------------------------- photometric ops
# All act on one RGB image [h, w, 3] float32 in [0, 1], with torchvision's formulas.


def rgb_to_grayscale(img: jax.Array) -> jax.Array:
  """[h, w, 3] -> [h, w, 3] luma replicated to three channels."""
  luma = img @ jnp.asarray(_LUMA, img.dtype)
  return jnp.repeat(luma[..., None], 3, axis=-1)


def adjust_brightness(img: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(img * factor, 0.0, 1.0)


def adjust_contrast(img: jax.Array, factor: jax.Array) -> jax.Array:
  """Blends with the image's mean luma."""
  mean = jnp.mean(img @ jnp.asarray(_LUMA, img.dtype))
  return jnp.clip(factor * img + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(img: jax.Array, factor: jax.Array) -> jax.Array:
  """Blends with the per-pixel luma."""
  return jnp.clip(factor * img + (1.0 - factor) * rgb_to_grayscale(img), 0.0, 1.0)


def _rgb_to_hsv(img: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  # The sector is the argmax channel and maxc is read from that channel, never compared with
  # `==` to a separately computed max: XLA may compute the same pixel's channel twice in
  # different fusions (1 vs 4 devices), and an exact-equality test can then match no sector.
  # Hue is continuous across sector boundaries, so a near-tie may pick either side.
  sector = jnp.argmax(img, axis=-1)
  # A select, not take_along_axis: the same value, without a gather per pixel.
  maxc = jnp.where(sector == 0, r, jnp.where(sector == 1, g, b))
  delta = maxc - jnp.min(img, axis=-1)
  sat = delta / jnp.where(maxc > 0, maxc, 1.0)
  safe = jnp.where(delta > 0, delta, 1.0)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  hue = jnp.where(sector == 0, bc - gc, jnp.where(sector == 1, 2.0 + rc - bc, 4.0 + gc - rc))
  hue = jnp.where(delta > 0, jnp.mod(hue / 6.0, 1.0), 0.0)
  return hue, sat, maxc


def _hsv_to_rgb(hue: jax.Array, sat: jax.Array, val: jax.Array) -> jax.Array:
  # Closed form of the six-sector table: channel n (R=5, G=3, B=1) at k = (n + 6 hue) mod 6
  # is v - v s clip(min(k, 4 - k), 0, 1).
  k = jnp.mod(jnp.array([5.0, 3.0, 1.0]) + 6.0 * hue[..., None], 6.0)
  ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
  return val[..., None] * (1.0 - sat[..., None] * ramp)


def adjust_hue(img: jax.Array, shift: jax.Array) -> jax.Array:
  """Rotates the HSV hue by `shift` (fraction of a turn, torchvision's hue_factor)."""
  hue, sat, val = _rgb_to_hsv(img)
  return _hsv_to_rgb(jnp.mod(hue + shift, 1.0), sat, val)


def gaussian_blur(img: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Separable Gaussian blur, kernel truncated at `radius` (static), reflect padding."""
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  taps = 2 * radius + 1
  for axis in (0, 1):
    pad = [(0, 0)] * img.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(img, pad, mode='reflect')
    size = img.shape[axis]
    img = sum(kernel[t] * jax.lax.slice_in_dim(padded, t, t + size, axis=axis)
              for t in range(taps))
  return img


def solarize(img: jax.Array, threshold: float) -> jax.Array:
  return jnp.where(img >= threshold, 1.0 - img, img)


def color_jitter(key: jax.Array, img: jax.Array, cfg: ViewConfig) -> jax.Array:
  """torchvision ColorJitter: four factors and a random order of the four ops per call."""
  u = jax.random.uniform(key, (8,))
  strengths = (cfg.brightness, cfg.contrast, cfg.saturation)
  factors = [max(0.0, 1.0 - s) + (1.0 + s - max(0.0, 1.0 - s)) * u[i]
             for i, s in enumerate(strengths)]
  factors.append(cfg.hue * (2.0 * u[3] - 1.0))
  ops = [lambda x, f=f, op=op: op(x, f) for f, op in zip(
      factors, (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue))]
  order = jnp.argsort(u[4:])  # a uniformly random permutation of the four ops
  for stage in range(4):
    img = jax.lax.switch(order[stage], ops, img)
  return img


def apply_photometric(key: jax.Array, img: jax.Array, blur_prob: jax.Array,
                      solarize_prob: jax.Array, cfg: ViewConfig) -> jax.Array:
  """RandomApply(ColorJitter), RandomGrayscale, GaussianBlur, RandomSolarize on [h, w, 3]."""
  k_draw, k_jitter = jax.random.split(key)
  u = jax.random.uniform(k_draw, (5,))
  img = jnp.where(u[0] < cfg.jitter_prob, color_jitter(k_jitter, img, cfg), img)
  img = jnp.where(u[1] < cfg.grayscale_prob, rgb_to_grayscale(img), img)
  sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[2]
  img = jnp.where(u[3] < blur_prob, gaussian_blur(img, sigma, cfg.blur_radius), img)
  return jnp.where(u[4] < solarize_prob, solarize(img, cfg.solarize_threshold), img)


def normalize(img: jax.Array, cfg: ViewConfig | None = None) -> jax.Array:
  """[..., 3] in [0, 1] -> (x - mean) / std, ImageNet statistics by default."""
  mean, std = (cfg.mean, cfg.std) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
  return (img - jnp.asarray(mean, img.dtype)) / jnp.asarray(std, img.dtype)


# ----------------------------------------------------------------------------- views


def _one_view(key, rgb, companion, size, scale, blur_prob, solarize_prob, cfg: ViewConfig,
              seg=None):
  """One (view, sample): rgb [H, W, 3] uint8, companion [H, W, 1] -> ([S, S, 3], [S, S, 1]),
  plus seg [S, S] int32 (nearest, the same box and flip) when seg [H, W, 1] is given."""
  # Separate streams for geometry and colour keep the crops identical whether or not the
  # photometric stack is enabled.
  k_box, k_flip, k_photo = jax.random.split(key, 3)
  box = sample_crop_box(k_box, rgb.shape[:2], scale, cfg.ratio, cfg.crop_attempts)
  flip = jax.random.bernoulli(k_flip, cfg.flip_prob)
  rgb_view = crop_and_resize(rgb, box, (size, size), 'linear', cfg.antialias, flip) / 255.0
  comp_view = crop_and_resize(companion, box, (size, size), cfg.companion_resize,
                              cfg.antialias, flip)
  if cfg.photometric:
    rgb_view = apply_photometric(k_photo, rgb_view, blur_prob, solarize_prob, cfg)
  if seg is None:
    return normalize(rgb_view, cfg), comp_view
  seg_view = crop_and_resize(seg, box, (size, size), 'nearest', flip=flip)[..., 0]
  return normalize(rgb_view, cfg), comp_view, seg_view.astype(jnp.int32)


def _view_set(key, rgb, companion, sample_ids, num_views, size, scale, blur_probs,
              solarize_probs, cfg, seg=None):
  """num_views views of every sample -> ([V, B, S, S, 3], [V, B, S, S, 1]) (+ seg
  [V, B, S, S] int32 when seg [B, H, W, 1] is given)."""
  batch = rgb.shape[0]
  if num_views == 0:
    empty = (jnp.zeros((0, batch, size, size, 3), jnp.float32),
             jnp.zeros((0, batch, size, size, 1), jnp.float32))
    return empty if seg is None else empty + (jnp.zeros((0, batch, size, size), jnp.int32),)
  view_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(num_views))

  def per_view(view_key, blur_prob, solarize_prob):
    keys = jax.vmap(jax.random.fold_in, (None, 0))(view_key, sample_ids)
    if seg is not None:
      one_seg = lambda k, x, c, s: _one_view(k, x, c, size, scale, blur_prob, solarize_prob, cfg,
                                             seg=s)
      return jax.vmap(one_seg)(keys, rgb, companion, seg)
    one = lambda k, x, c: _one_view(k, x, c, size, scale, blur_prob, solarize_prob, cfg)
    return jax.vmap(one)(keys, rgb, companion)

  return jax.vmap(per_view)(view_keys, jnp.asarray(blur_probs, jnp.float32),
                            jnp.asarray(solarize_probs, jnp.float32))


def _check_inputs(rgb_u8, companion):
  if rgb_u8.ndim != 4 or rgb_u8.shape[-1] != 3:
    raise ValueError(f'rgb must be [B, H, W, 3], got shape {rgb_u8.shape}')
  if companion.ndim == 4 and companion.shape[-1] == 1:
    companion = companion[..., 0]
  if companion.shape != rgb_u8.shape[:3]:
    raise ValueError(f'companion must be [B, H, W] = {rgb_u8.shape[:3]} like rgb, '
                     f'got shape {companion.shape}')
  if companion.dtype == jnp.uint16:  # stored codes (builder companion_format 'uint16')
    companion = schema.companion_from_uint16(companion)
  return companion[..., None]


def make_views(key: jax.Array, rgb_u8: jax.Array, companion: jax.Array, cfg: ViewConfig,
               sample_ids: jax.Array | None = None,
               seg: jax.Array | None = None) -> dict[str, jax.Array]:
  """Multi-crop views of a batch, synchronised across RGB and companion.

  rgb_u8 [B, H, W, 3] uint8; companion [B, H, W] (or [B, H, W, 1]) float32, or uint16 codes
  (schema.companion_from_uint16). sample_ids [B]
  int (default arange(B), the global batch position) seeds each sample's views; pass dataset
  indices or global positions when calling per shard (shard_map). Returns
    global_rgb [Vg, B, G, G, 3] float32 normalised, global_companion [Vg, B, G, G, 1],
    local_rgb [Vl, B, L, L, 3], local_companion [Vl, B, L, L, 1].
  With cfg.with_seg, seg [B, H, W] (uint8 labels) is cropped with each view's box and flip
  (nearest) into global_seg [Vg, B, G, G] and local_seg [Vl, B, L, L] int32.
  """
  comp = _check_inputs(rgb_u8, companion)
  if cfg.with_seg != (seg is not None):
    raise ValueError(f'make_views: ViewConfig.with_seg={cfg.with_seg} but seg is '
                     f'{"missing" if seg is None else "given"}; views.with_seg and the batch\'s '
                     f"'seg' go together")
  if seg is not None:
    if seg.shape != rgb_u8.shape[:3]:
      raise ValueError(f'seg must be [B, H, W] = {rgb_u8.shape[:3]} like rgb, got {seg.shape}')
    seg = seg[..., None]
  if sample_ids is None:
    sample_ids = jnp.arange(rgb_u8.shape[0])
  k_global, k_local = jax.random.split(key)
  pick = lambda probs, v: probs[min(v, len(probs) - 1)]
  g_blur = [pick(cfg.global_blur_prob, v) for v in range(cfg.num_global)]
  g_sol = [pick(cfg.global_solarize_prob, v) for v in range(cfg.num_global)]
  global_views = _view_set(k_global, rgb_u8, comp, sample_ids, cfg.num_global,
                           cfg.global_size, cfg.global_scale, g_blur, g_sol, cfg, seg=seg)
  local_views = _view_set(k_local, rgb_u8, comp, sample_ids, cfg.num_local,
                          cfg.local_size, cfg.local_scale,
                          [cfg.local_blur_prob] * cfg.num_local,
                          [cfg.local_solarize_prob] * cfg.num_local, cfg, seg=seg)
  views = {'global_rgb': global_views[0], 'global_companion': global_views[1],
           'local_rgb': local_views[0], 'local_companion': local_views[1]}
  if seg is not None:
    views.update(global_seg=global_views[2], local_seg=local_views[2])
  return views


def clean_view(rgb_u8: jax.Array, companion: jax.Array, size_hw: tuple[int, int],
               companion_resize: str = 'nearest', antialias: bool = True,
               cfg: ViewConfig | None = None) -> tuple[jax.Array, jax.Array]:
  """Deterministic whole-frame resize for probe/eval views (no crop, flip or colour).

  rgb_u8 [B, H, W, 3] uint8, companion [B, H, W] -> (rgb [B, h, w, 3] normalised with cfg's
  (default ImageNet) statistics, companion [B, h, w, 1]).
  """
  comp = _check_inputs(rgb_u8, companion)
  full = jnp.array([0.0, 0.0, 1.0, 1.0])
  rgb = jax.vmap(lambda x: crop_and_resize(x, full, size_hw, 'linear', antialias))(rgb_u8)
  comp = jax.vmap(lambda c: crop_and_resize(c, full, size_hw, companion_resize, antialias))(comp)
  return normalize(rgb / 255.0, cfg), comp
