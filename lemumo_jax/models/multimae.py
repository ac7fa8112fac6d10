"""MultiMAE baselines (paper S1; Bachmann et al. 2022): the 'multimae' encoder family and the
masked-autoencoder pretraining model `MaeModel`.

Rows (configs/common.py): `multimae_ss` reconstructs the masked RGB and companion patches;
`multimae_mt` adds a semantic-segmentation output task on the view's labels. Paper settings
(S1): mask ratio 0.75, decoder depth 2, decoder width 256, local crops disabled
(`views.num_local=0`: the decoder expects the fixed global patch grid). Where the paper is
silent we follow MultiMAE's code (EPFL-VILAB/MultiMAE):

Encoder ('multimae' family, `MultiMaeEncoder`)
  - One linear patch embedding per modality ('patch_embed' for RGB, 'companion_embed'), plus
    fixed 2D sin-cos positional embeddings (MultiMAE's default, not learned), computed at the
    base grid of `model.img_size` and bilinearly resized to the input's grid like the other
    families' pos_embed, plus a learned modality embedding ('camera_type_embed',
    'companion_type_embed'; the brief's addition to MultiMAE, which tells modalities apart only
    by their patch embeddings). One learned global token 'cls_token' without position (MultiMAE
    appends it; we put it first, order is irrelevant without a causal mask).
  - The ViT blocks (model.width / depth / num_heads) run on [CLS, visible tokens] only.
  - Unmasked (probes, `__call__`): every RGB and companion token is encoded; Features.patches
    are the RGB tokens' outputs on the camera-aligned grid (S3 "camera-aligned RGB patch
    readout"), Features.cls the global token.

Masking (`sample_visible`)
  - V = round((1 - mask_ratio) * 2n) tokens stay visible out of the 2n of both modalities.
  - 'dirichlet' (default, MultiMAE): per (view, sample) the visible budget is split across the
    modalities by fractions ~ Dirichlet(alpha = 1); budgets are the differences of the rounded
    cumulative fractions (they sum to V exactly), each modality keeps a uniformly random subset
    of its budget; a budget above a modality's n (only when mask_ratio < 0.5) is filled from the
    other modality at random. 'uniform': V tokens uniformly at random over all 2n.
  - Masks are drawn from `make_rng('mask')` when train=True; with train=False (init, eval) a
    fixed key, so the eval loss is deterministic.

Decoders (`TaskDecoder`, one per task, MultiMAE's SpatialOutputAdapter with task queries)
  - Encoder tokens -> Dense(decoder_width). Context = the projected visible tokens + the
    decoder's own sin-cos position + a learned per-modality task embedding, and the projected
    global token.
  - Queries: for an input modality (rgb, companion), its full grid with the projected encoding at
    visible positions and a learned mask token at masked ones (+ position + task embedding); for
    seg (output only), mask token + position.
  - Cross-attention of the queries to the context, + MLP (MultiMAE's pre-norm layout, no residual
    around the cross-attention), then decoder_depth transformer blocks of decoder_width
    (decoder_heads heads), then a linear head to the patch: p*p*3 RGB pixels, p*p*C_comp
    companion values, (p/s)^2 * num_seg_classes logits at seg stride s.

Targets (the objective, objectives/mae.py, computes the losses; see there): the patchified
views the encoder saw, the masks, and the seg labels of the same crop (views.with_seg: nearest,
same box and flip, augment.make_views) subsampled at the seg stride.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lemumo_jax.models import parts
from lemumo_jax.models import vit

TASKS = ('rgb', 'companion', 'seg')
MASK_SAMPLING = ('dirichlet', 'uniform')


@dataclasses.dataclass(frozen=True)
class MaeConfig:
  """`config.multimae`: MultiMAE pretraining settings (encoder sizes come from config.model)."""
  tasks: tuple[str, ...] = ('rgb', 'companion')   # output tasks; 'seg' makes it MultiMAE-MT
  mask_ratio: float = 0.75
  mask_sampling: str = 'dirichlet'                # MASK_SAMPLING
  dirichlet_alpha: float = 1.0
  decoder_width: int = 256
  decoder_depth: int = 2
  decoder_heads: int = 8
  seg_stride: int = 4                             # seg labels every s pixels (MultiMAE: 4)
  num_seg_classes: int = 0                        # 0: len(seg_classes) of the dataset metadata

  def __post_init__(self):
    tasks = tuple(self.tasks)
    if not tasks or tasks[:2] != ('rgb', 'companion') or not set(tasks) <= set(TASKS) or len(
        set(tasks)) != len(tasks):
      raise ValueError(f"config.multimae.tasks must be ('rgb', 'companion') or ('rgb', "
                       f"'companion', 'seg'), got {list(tasks)}")
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f'config.multimae.mask_ratio must lie in [0, 1), got {self.mask_ratio}')
    if self.mask_sampling not in MASK_SAMPLING:
      raise ValueError(f'config.multimae.mask_sampling must be one of {list(MASK_SAMPLING)}, '
                       f'got {self.mask_sampling!r}')
    if self.decoder_width % self.decoder_heads or self.decoder_width % 4:
      raise ValueError(f'config.multimae.decoder_width={self.decoder_width} must be divisible by '
                       f'decoder_heads={self.decoder_heads} and by 4 (sin-cos positions)')

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], **overrides) -> MaeConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg.keys()) - fields)
    if unknown:
      raise ValueError(f'unknown config.multimae keys {unknown}; known: {sorted(fields)}')
    kwargs = {k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
              for k, v in cfg.items()}
    return cls(**{**kwargs, **overrides})


# ------------------------------------------------------------------------------- pure pieces


def sincos_pos_embed(grid: tuple[int, int], width: int, temperature: float = 10000.0) -> np.ndarray:
  """Fixed 2D sin-cos positions [1, h * w, width] (row-major grid; MultiMAE's layout:
  [sin(x), cos(x), sin(y), cos(y)], width / 4 frequencies each)."""
  if width % 4:
    raise ValueError(f'sin-cos positional embeddings need a width divisible by 4, got {width}')
  h, w = grid
  ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing='ij')
  omega = 1.0 / temperature ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  out_x = xs.reshape(-1)[:, None] * omega[None]
  out_y = ys.reshape(-1)[:, None] * omega[None]
  emb = np.concatenate([np.sin(out_x), np.cos(out_x), np.sin(out_y), np.cos(out_y)], axis=1)
  return emb[None].astype(np.float32)


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p) * (W/p), p * p * C] (row-major patches, (p1, p2, c) inside)."""
  b, height, width, c = images.shape
  if height % patch or width % patch:
    raise ValueError(f'patchify: image {images.shape} is not divisible by patch {patch}')
  h, w = height // patch, width // patch
  x = images.reshape(b, h, patch, w, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * w, patch * patch * c)


def unpatchify(patches: jax.Array, grid: tuple[int, int], patch: int) -> jax.Array:
  """The inverse of `patchify`: [B, h * w, p * p * C] -> [B, h p, w p, C]."""
  b, n, dim = patches.shape
  h, w = grid
  c = dim // (patch * patch)
  if n != h * w or c * patch * patch != dim:
    raise ValueError(f'unpatchify: patches {patches.shape} do not fit grid {grid}, patch {patch}')
  x = patches.reshape(b, h, w, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * patch, w * patch, c)


def num_visible(num_tokens: int, mask_ratio: float) -> int:
  """Visible tokens out of `num_tokens` (at least 1)."""
  return max(1, int(round((1.0 - mask_ratio) * num_tokens)))


def modality_budgets(key: jax.Array, num_modalities: int, visible: int,
                     alpha: float = 1.0) -> jax.Array:
  """Visible tokens per modality [M] int32, summing to `visible`: fractions ~ Dirichlet(alpha),
  budgets = differences of the rounded cumulative fractions."""
  fractions = jax.random.dirichlet(key, jnp.full((num_modalities,), alpha, jnp.float32))
  cumulative = jnp.round(jnp.cumsum(fractions) * visible).astype(jnp.int32)
  cumulative = cumulative.at[-1].set(visible)
  return jnp.diff(cumulative, prepend=0)


def sample_visible(key: jax.Array, tokens_per_modality: Sequence[int], visible: int,
                   sampling: str = 'dirichlet', alpha: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """One sample's visible tokens over the concatenated modalities.

  Returns (keep [visible] int32 ascending indices into the T = sum(tokens_per_modality) tokens,
  budgets [M] int32, the per-modality budgets; 'uniform' reports the realised counts).
  """
  sizes = tuple(int(n) for n in tokens_per_modality)
  total = sum(sizes)
  if not 0 < visible <= total:
    raise ValueError(f'visible={visible} must lie in [1, {total}]')
  k_budget, k_noise = jax.random.split(key)
  noise = jax.random.uniform(k_noise, (total,))
  if sampling == 'uniform':
    score = noise
  elif sampling == 'dirichlet':
    budgets = modality_budgets(k_budget, len(sizes), visible, alpha)
    preferred, start = [], 0
    for m, size in enumerate(sizes):
      rank = jnp.argsort(jnp.argsort(noise[start:start + size]))
      preferred.append(rank < budgets[m])
      start += size
    # Budgeted tokens first; any shortfall (a budget above its modality's size) at random.
    score = noise + jnp.where(jnp.concatenate(preferred), 0.0, 1.0)
  else:
    raise ValueError(f'mask sampling must be one of {list(MASK_SAMPLING)}, got {sampling!r}')
  keep = jnp.sort(jnp.argsort(score)[:visible]).astype(jnp.int32)
  if sampling == 'uniform':
    bounds = np.cumsum((0,) + sizes)
    budgets = jnp.stack([jnp.sum((keep >= lo) & (keep < hi)) for lo, hi in
                         zip(bounds[:-1], bounds[1:])]).astype(jnp.int32)
  return keep, budgets


def keep_to_mask(keep: jax.Array, total: int) -> jax.Array:
  """keep [B, V] -> masked [B, total] bool (True = hidden from the encoder)."""
  return jax.vmap(lambda k: jnp.ones((total,), bool).at[k].set(False))(keep)


def _gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x [B, T, D], ids [B, V] -> [B, V, D]."""
  return jnp.take_along_axis(x, ids[..., None], axis=1)


# ------------------------------------------------------------------------------- encoder


class MultiMaeEncoder(nn.Module):
  """The 'multimae' family: per-modality patch embeddings + sin-cos positions + modality
  embeddings, a global token, one ViT over the (visible) tokens of both modalities."""
  img_size: int | Sequence[int]
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  companion_channels: int = 1
  companion_valid: bool = False      # the stem's extra 'has a return' channel (not a target)
  dtype: Any = jnp.float32
  attention: str = 'xla'             # vit.ATTENTION_IMPLS
  remat: str = 'none'                # vit.REMAT_POLICIES

  def setup(self):
    self.patch_embed = vit.PatchEmbed(self.patch_size, self.width, dtype=self.dtype)
    self.companion_embed = vit.PatchEmbed(self.patch_size, self.width, dtype=self.dtype)
    self.cls_token = self.param('cls_token', vit.token_init, (1, 1, self.width))
    self.camera_type_embed = self.param('camera_type_embed', vit.token_init, (1, 1, self.width))
    self.companion_type_embed = self.param('companion_type_embed', vit.token_init,
                                           (1, 1, self.width))
    self.blocks = [vit.EncoderBlock(self.width, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                                    attention=self.attention)
                   for _ in range(self.depth)]
    self.norm = vit.layer_norm(jnp.float32)

  def tokens(self, rgb: jax.Array, companion: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """-> (tokens [B, 2n, D] float32: the n RGB then the n companion tokens, grid (h, w))."""
    parts.check_pair(rgb, companion, self.companion_channels)  # pylint: disable=protected-access
    camera = self.patch_embed(rgb)
    batch, h, w, width = camera.shape
    camera = camera.reshape(batch, h * w, width).astype(jnp.float32)
    modality = self.companion_embed(parts.companion_stem_input(
        companion, self.companion_valid)).reshape(batch, h * w, width).astype(jnp.float32)
    grid = vit.base_grid(self.img_size, self.patch_size)
    pos = vit.resize_grid_tokens(jnp.asarray(sincos_pos_embed(grid, self.width)), grid, (h, w))
    x = jnp.concatenate([camera + pos + self.camera_type_embed,
                         modality + pos + self.companion_type_embed], axis=1)
    return x, (h, w)

  def encode_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T, D] -> [B, 1 + T, D] float32: [global token, tokens] through the ViT."""
    cls = jnp.broadcast_to(self.cls_token, (tokens.shape[0], 1, self.width))
    x = jnp.concatenate([cls, tokens], axis=1).astype(self.dtype)
    return self.norm(vit.run_blocks(self.blocks, x, self.attention, self.remat))

  def encode_visible(self, rgb: jax.Array, companion: jax.Array,
                     keep: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """keep [B, V] token indices into [RGB | companion] -> ([B, 1 + V, D], grid (h, w)); the
    blocks never see the other tokens."""
    tokens, grid = self.tokens(rgb, companion)
    return self.encode_tokens(_gather_tokens(tokens, keep)), grid

  def __call__(self, rgb: jax.Array, companion: jax.Array, *, train: bool) -> parts.Features:
    """Unmasked (probes): cls = the global token, patches = the RGB tokens [B, h, w, D]."""
    del train  # masking belongs to MaeModel's pretraining forward
    tokens, (h, w) = self.tokens(rgb, companion)
    x = self.encode_tokens(tokens)
    n = h * w
    return parts.Features(cls=x[:, 0], patches=x[:, 1:1 + n].reshape(x.shape[0], h, w, -1))


def build_encoder(cfg: Mapping[str, Any]) -> MultiMaeEncoder:
  return MultiMaeEncoder(**parts.companion_kwargs(cfg),
                         **parts.vit_kwargs(cfg))  # pylint: disable=protected-access


# ------------------------------------------------------------------------------- decoders


class CrossAttention(nn.Module):
  """Queries [B, Nq, D] attend to context [B, Nk, D] ('q', 'kv', 'proj', as MultiMAE)."""
  width: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array, context: jax.Array) -> jax.Array:
    kwargs = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=vit.dense_init,
                  bias_init=nn.initializers.zeros)
    heads, head_dim = self.num_heads, self.width // self.num_heads
    q = nn.Dense(self.width, name='q', **kwargs)(queries)
    k, v = jnp.split(nn.Dense(2 * self.width, name='kv', **kwargs)(context), 2, axis=-1)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, head_dim)
    out = jax.nn.dot_product_attention(split(q), split(k), split(v))
    return nn.Dense(self.width, name='proj', **kwargs)(out.reshape(queries.shape))


class TaskDecoder(nn.Module):
  """One task's decoder (MultiMAE SpatialOutputAdapter): encoded [B, 1 + V, D_enc] ->
  per-patch outputs [B, n, out_dim]."""
  width: int
  depth: int
  num_heads: int
  out_dim: int
  num_modalities: int = 2
  query_modality: int | None = None   # an input modality's own grid as queries; None: seg
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encoded: jax.Array, keep: jax.Array, grid: tuple[int, int],
               base_grid: tuple[int, int]) -> jax.Array:
    batch, n = encoded.shape[0], grid[0] * grid[1]
    total = self.num_modalities * n
    context = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=vit.dense_init, name='proj_context')(encoded)
    context = context.astype(jnp.float32)
    mask_token = self.param('mask_token', vit.token_init, (1, 1, self.width))
    task_embed = self.param('task_embed', vit.token_init, (self.num_modalities, self.width))
    pos = vit.resize_grid_tokens(jnp.asarray(sincos_pos_embed(base_grid, self.width)), base_grid,
                                 grid)[0]
    # Every token of every modality: its position + its modality's embedding.
    embed = (jnp.tile(pos, (self.num_modalities, 1))
             + jnp.repeat(task_embed, n, axis=0))[None]
    visible = context[:, 1:]
    full = jnp.broadcast_to(mask_token, (batch, total, self.width))
    full = jax.vmap(lambda f, k, v: f.at[k].set(v))(full, keep, visible) + embed
    context = jnp.concatenate([_gather_tokens(full, keep), context[:, :1]], axis=1)
    if self.query_modality is None:
      queries = jnp.broadcast_to(mask_token + pos[None], (batch, n, self.width))
    else:
      queries = full[:, self.query_modality * n:(self.query_modality + 1) * n]
    norm = lambda name: vit.layer_norm(self.dtype, name=name)
    x = CrossAttention(self.width, self.num_heads, dtype=self.dtype, name='cross_attn')(
        norm('query_norm')(queries.astype(self.dtype)),
        norm('context_norm')(context.astype(self.dtype)))
    x = x + vit.Mlp(self.width, int(self.width * self.mlp_ratio), dtype=self.dtype,
                    name='mlp')(norm('out_norm')(x))
    for i in range(self.depth):
      x = vit.EncoderBlock(self.width, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                           name=f'blocks_{i}')(x)
    out = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=vit.dense_init, name='out_proj')(x)
    return out.astype(jnp.float32)


# ------------------------------------------------------------------------------- model


def _fold_views(x: jax.Array) -> jax.Array:
  """[V, B, ...] -> [V * B, ...]."""
  return x.reshape((-1,) + x.shape[2:])


class MaeModel(nn.Module):
  """MultiMAE pretraining model: masks the global views, encodes the visible tokens, decodes
  every task. views: 'global_rgb' [Vg, B, G, G, 3], 'global_companion' [Vg, B, G, G, C],
  'global_seg' [Vg, B, G, G] int (MT only); local views must be empty."""
  encoder_cfg: Any
  mae: MaeConfig
  num_seg_classes: int = 0

  def setup(self):
    if 'seg' in self.mae.tasks and self.num_seg_classes < 1:
      raise ValueError('MultiMAE-MT (multimae.tasks with seg) needs num_seg_classes >= 1')
    self.encoder = build_encoder(self.encoder_cfg)
    patch = int(self.encoder_cfg['patch_size'])
    channels = int(self.encoder_cfg.get('companion_channels', 1))
    dtype = parts.DTYPES[self.encoder_cfg.get('dtype', 'float32')]
    common = dict(width=self.mae.decoder_width, depth=self.mae.decoder_depth,
                  num_heads=self.mae.decoder_heads, dtype=dtype)
    self.rgb_decoder = TaskDecoder(out_dim=patch * patch * 3, query_modality=0, **common)
    self.companion_decoder = TaskDecoder(out_dim=patch * patch * channels, query_modality=1,
                                         **common)
    if 'seg' in self.mae.tasks:
      cells = patch // self.mae.seg_stride
      self.seg_decoder = TaskDecoder(out_dim=cells * cells * self.num_seg_classes,
                                     query_modality=None, **common)

  def __call__(self, views: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
    """-> {'rgb_pred', 'rgb_target' [N, n, p*p*3], 'companion_pred', 'companion_target'
    [N, n, p*p*C], 'rgb_mask', 'companion_mask' [N, n] bool (True = masked), 'budgets' [N, 2]
    visible tokens per modality; MT adds 'seg_logits' [N, h s', w s', classes], 'seg_labels'
    [N, h s', w s'] int32 (s' = p / seg_stride)}, N = Vg * B views."""
    if 'local_rgb' in views and views['local_rgb'].shape[0] > 0:
      raise ValueError('MultiMAE disables local crops (S1: the decoder expects the fixed global '
                       'patch grid); set config.views.num_local=0')
    rgb, companion = _fold_views(views['global_rgb']), _fold_views(views['global_companion'])
    patch = int(self.encoder_cfg['patch_size'])
    base_grid = vit.base_grid(parts.img_size(self.encoder_cfg), patch)  # pylint: disable=protected-access
    grid = (rgb.shape[1] // patch, rgb.shape[2] // patch)
    n = grid[0] * grid[1]
    visible = num_visible(2 * n, self.mae.mask_ratio)
    key = self.make_rng('mask') if train else jax.random.PRNGKey(0)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(rgb.shape[0]))
    keep, budgets = jax.vmap(lambda k: sample_visible(
        k, (n, n), visible, self.mae.mask_sampling, self.mae.dirichlet_alpha))(keys)
    encoded, grid = self.encoder.encode_visible(rgb, companion, keep)
    masked = keep_to_mask(keep, 2 * n)
    outputs = {
        'rgb_pred': self.rgb_decoder(encoded, keep, grid, base_grid),
        'rgb_target': patchify(rgb.astype(jnp.float32), patch),
        'rgb_mask': masked[:, :n],
        'companion_pred': self.companion_decoder(encoded, keep, grid, base_grid),
        'companion_target': patchify(companion.astype(jnp.float32), patch),
        'companion_mask': masked[:, n:],
        'budgets': budgets,
    }
    if 'seg' in self.mae.tasks:
      if 'global_seg' not in views:
        raise ValueError("MultiMAE-MT needs the views' seg labels: set config.views.with_seg=True")
      stride, cells = self.mae.seg_stride, patch // self.mae.seg_stride
      labels = _fold_views(views['global_seg'])[:, stride // 2::stride, stride // 2::stride]
      logits = self.seg_decoder(encoded, keep, grid, base_grid)
      outputs['seg_logits'] = unpatchify(logits, grid, cells)
      outputs['seg_labels'] = labels.astype(jnp.int32)
    return outputs


def build_model(config) -> MaeModel:
  """MaeModel from the config (model, multimae, data); num_seg_classes 0 reads the dataset's
  seg_classes for the seg task."""
  mae = MaeConfig.from_config(config.multimae)
  patch = int(config.model.patch_size)
  if patch % mae.seg_stride:
    raise ValueError(f'config.multimae.seg_stride={mae.seg_stride} must divide '
                     f'config.model.patch_size={patch}')
  num_classes = 0
  if 'seg' in mae.tasks:
    num_classes = int(mae.num_seg_classes)
    if num_classes <= 0:
      from lemumo_jax.data import sources  # pylint: disable=g-import-not-at-top
      try:
        num_classes = len(sources.dataset_metadata(config.data).get('seg_classes', ()))
      except (FileNotFoundError, ValueError) as e:
        raise ValueError(f'MultiMAE-MT needs the number of seg classes: set config.data.data_dir '
                         f'or config.multimae.num_seg_classes ({e})') from e
      if num_classes == 0:
        raise ValueError(f'MultiMAE-MT needs segmentation labels, but the dataset '
                         f'({config.data.name} {config.data.data_dir}) lists no seg_classes '
                         f'(FLIR has none; use multimae_ss)')
    if not config.views.get('with_seg', False):
      raise ValueError('MultiMAE-MT needs the seg labels cropped with the views: set '
                       'config.views.with_seg=True')
  return MaeModel(encoder_cfg=config.model, mae=mae, num_seg_classes=num_classes)
