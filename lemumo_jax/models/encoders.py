"""Every encoder family behind one interface: encoder(rgb, companion, *, train) -> parts.Features.

rgb [B, H, W, 3] and companion [B, H, W, C_comp] are float, already normalised, same H and W
(divisible by patch_size). `build_encoder(cfg)` picks the family from `cfg.family`; a new
family is one builder function added to `_FAMILIES`, nothing else changes.

Families:
  'vit'    single-modality ViT over `cfg.inputs` ('rgb' or 'companion'): LeJEPA RGB-only and
           the LiDAR-only baseline.
  'fusion' the Le MuMo encoder (paper section 3.3): [CLS, F, C, M] with fusion tokens F, a
           layer-0 routing mask, then pruned (keep [CLS, F]) or persistent routing.
  'early_fusion'  Early Fusion RGBD (Table 2, S1 "a single encoder over stacked RGB and aligned
           depth channels"): one ViT whose patch embedding takes 3 + C_comp channels.
  'late_fusion'   Late Fusion (Table 2, S1 "separate modality encoders whose features are
           concatenated before probing"): an RGB ViT and a companion ViT of `model.width`
           each; CLS and patch grid are the channel concatenations (2 x model.width).
  'dual'   ImageBind-style dual encoder (S1 "paired RGB-depth encoders trained with a symmetric
           InfoNCE objective"): an RGB ViT and a companion ViT of `model.width` each, like
           late_fusion's branches, but nothing is concatenated: cls and patches are the RGB
           branch's (the camera-aligned RGB patch readout of S3 "Patch-readout protocol for
           dual-stream baselines"), and the companion branch's CLS is `companion_cls`, which
           only the pretraining objective reads.
  'multimae'  MultiMAE baselines (S1; models/multimae.py): per-modality patch embeddings, one
           ViT over the RGB and companion tokens (masked in pretraining); unmasked for the probes,
           cls is the global token and patches the RGB tokens' outputs (S3 readout).

parts.Features have `model.width` channels for every family but late_fusion (2 x model.width); the
probe stage reads the channel count off the encoder's output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lemumo_jax.models import parts
from lemumo_jax.models import multimae
from lemumo_jax.models import routing
from lemumo_jax.models import vit


class InputPatches(nn.Module):
  """No encoder: the probe view's own pixels, cut into the encoder's patch grid.

  patches [B, H/p, W/p, p*p*(3 + C + 1)]: each cell holds its p x p block of normalised RGB,
  the companion map and the 'has a return' channel of `companion_stem_input`, in row-major
  (row, col, channel) order; cls is the mean cell. probe.encoder='raw' probes this, the
  no-representation reference that bounds what a probe reads from the sensors alone. It has
  no parameters.
  """
  patch_size: int
  companion_channels: int = 1

  def __call__(self, rgb: jax.Array, companion: jax.Array, *, train: bool) -> parts.Features:
    del train
    parts.check_pair(rgb, companion, self.companion_channels)
    x = jnp.concatenate([rgb, parts.companion_stem_input(companion, True)], -1).astype(jnp.float32)
    b, h, w, c = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'raw input patches: the {h}x{w} view is not a multiple of the patch '
                       f'size {p}')
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = x.reshape(b, h // p, w // p, p * p * c)
    return parts.Features(cls=patches.mean((1, 2)), patches=patches)


class ViTEncoder(vit.ViT):
  """The 'vit' family: a ViT over one input (params at the top level, timm's layout)."""
  inputs: str = 'rgb'
  companion_channels: int = 1
  companion_valid: bool = False

  def __call__(self, rgb: jax.Array, companion: jax.Array, *, train: bool) -> parts.Features:
    del train  # no dropout / drop-path
    parts.check_pair(rgb, companion, self.companion_channels)
    if self.inputs not in parts.VIT_INPUTS:
      raise ValueError(f'model.inputs must be one of {list(parts.VIT_INPUTS)}, got {self.inputs!r}')
    cls, patches = self.encode(rgb if self.inputs == 'rgb' else
                               parts.companion_stem_input(companion, self.companion_valid))
    return parts.Features(cls=cls, patches=patches)


class EarlyFusionEncoder(vit.ViT):
  """The 'early_fusion' family: one ViT over [rgb | companion] stacked on channels (timm layout;
  patch_embed.proj takes 3 + companion_channels (+ 1 with companion_valid) input channels)."""
  companion_channels: int = 1
  companion_valid: bool = False

  def __call__(self, rgb: jax.Array, companion: jax.Array, *, train: bool) -> parts.Features:
    del train  # no dropout / drop-path
    parts.check_pair(rgb, companion, self.companion_channels)
    companion = parts.companion_stem_input(companion.astype(rgb.dtype), self.companion_valid)
    cls, patches = self.encode(jnp.concatenate([rgb, companion], axis=-1))
    return parts.Features(cls=cls, patches=patches)


class LateFusionEncoder(nn.Module):
  """The 'late_fusion' family: 'rgb_encoder' and 'companion_encoder', two ViTs of `width` (two
  ViT-S/16 at the paper config, hence Table 6's 2x Early Fusion FLOPs) that never exchange
  tokens; cls [B, 2 width] and patches [B, h, w, 2 width] are [rgb | companion]
  concatenations along channels (both grids are (H / p, W / p)), what the probes read."""
  img_size: int | Sequence[int]
  patch_size: int
  width: int                         # of each branch; the features have 2 * width channels
  depth: int
  num_heads: int                     # per branch
  mlp_ratio: float = 4.0
  companion_channels: int = 1
  companion_valid: bool = False
  dtype: Any = jnp.float32
  attention: str = 'xla'             # vit.ATTENTION_IMPLS
  remat: str = 'none'                # vit.REMAT_POLICIES
  family_name = 'late_fusion'        # class attribute (not a field): the name in errors

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f'{self.family_name}: model.width={self.width} must be divisible by '
                       f'model.num_heads={self.num_heads}')
    branch = dict(img_size=self.img_size, patch_size=self.patch_size, width=self.width,
                  depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                  dtype=self.dtype, attention=self.attention, remat=self.remat)
    self.rgb_encoder = vit.ViT(**branch)
    self.companion_encoder = vit.ViT(**branch)

  def __call__(self, rgb: jax.Array, companion: jax.Array, *, train: bool) -> parts.Features:
    del train  # no dropout / drop-path
    parts.check_pair(rgb, companion, self.companion_channels)
    rgb_cls, rgb_patches = self.rgb_encoder.encode(rgb)
    comp_cls, comp_patches = self.companion_encoder.encode(
        parts.companion_stem_input(companion, self.companion_valid))
    return parts.Features(cls=jnp.concatenate([rgb_cls, comp_cls], axis=-1),
                    patches=jnp.concatenate([rgb_patches, comp_patches], axis=-1))


class DualEncoder(LateFusionEncoder):
  """The 'dual' family (ImageBind-style): the same two ViT branches as late_fusion
  ('rgb_encoder', 'companion_encoder', `width` each, never exchanging tokens), read out per
  modality: cls and patches [B, h, w, width] are the RGB branch's (the fixed camera-aligned
  readout the probes see, S3), companion_cls [B, width] the companion branch's CLS."""
  family_name = 'dual'

  def __call__(self, rgb: jax.Array, companion: jax.Array, *, train: bool) -> parts.Features:
    del train  # no dropout / drop-path
    parts.check_pair(rgb, companion, self.companion_channels)
    rgb_cls, rgb_patches = self.rgb_encoder.encode(rgb)
    comp_cls, _ = self.companion_encoder.encode(
        parts.companion_stem_input(companion, self.companion_valid))
    return parts.Features(cls=rgb_cls, patches=rgb_patches, companion_cls=comp_cls)


class FusionEncoder(nn.Module):
  """Le MuMo fusion-token encoder -> parts.Features(cls, patches = the n fusion tokens).

  Tokens: CLS + pos[0]; F_i = fusion_tokens_i + pos_i + fusion_type_embed;
  C_i = patch_embed(rgb)_i + pos_i + camera_type_embed; M_i = companion_embed(companion)_i +
  pos_i + companion_type_embed. fusion_tokens and pos_embed are learned at the base grid of
  img_size and resized to the input's grid.
  """
  img_size: int | Sequence[int]
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  companion_channels: int = 1
  companion_valid: bool = False
  fusion_mode: str = 'pruned'        # routing.FUSION_MODES
  # parts.LAYER0_IMPLS. Pruned mode only: persistent routing keeps the C/M outputs of layer 0, which
  # the structured computation never forms, so it always runs the masked reference.
  layer0_impl: str = 'structured'
  dtype: Any = jnp.float32
  attention: str = 'xla'             # vit.ATTENTION_IMPLS
  remat: str = 'none'                # vit.REMAT_POLICIES

  def setup(self):
    if self.fusion_mode not in routing.FUSION_MODES:
      raise ValueError(f'model.fusion_mode must be one of {list(routing.FUSION_MODES)}, '
                       f'got {self.fusion_mode!r}')
    if self.layer0_impl not in parts.LAYER0_IMPLS:
      raise ValueError(f'model.layer0_impl must be one of {list(parts.LAYER0_IMPLS)}, '
                       f'got {self.layer0_impl!r}')
    if self.depth < 1:
      raise ValueError(f'model.depth must be >= 1 for the fusion encoder, got {self.depth}')
    grid = vit.base_grid(self.img_size, self.patch_size)
    num_base = grid[0] * grid[1]
    self.patch_embed = vit.PatchEmbed(self.patch_size, self.width, dtype=self.dtype)
    self.companion_embed = vit.PatchEmbed(self.patch_size, self.width, dtype=self.dtype)
    self.cls_token = self.param('cls_token', vit.token_init, (1, 1, self.width))
    self.fusion_tokens = self.param('fusion_tokens', vit.token_init, (1, num_base, self.width))
    # One position per spatial location, shared by F_i, C_i, M_i; index 0 is CLS.
    self.pos_embed = self.param('pos_embed', vit.token_init, (1, 1 + num_base, self.width))
    self.fusion_type_embed = self.param('fusion_type_embed', vit.token_init, (1, 1, self.width))
    self.camera_type_embed = self.param('camera_type_embed', vit.token_init, (1, 1, self.width))
    self.companion_type_embed = self.param('companion_type_embed', vit.token_init,
                                           (1, 1, self.width))
    self.blocks = [vit.EncoderBlock(self.width, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                                    attention=self.attention)
                   for _ in range(self.depth)]
    self.norm = vit.layer_norm(jnp.float32)

  def tokens(self, rgb: jax.Array, companion: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """-> (sequence [B, 1 + 3n, D] in order [CLS, F, C, M] in the compute dtype, grid (h, w))."""
    parts.check_pair(rgb, companion, self.companion_channels)
    camera = self.patch_embed(rgb)
    batch, h, w, width = camera.shape
    n = h * w
    camera = camera.reshape(batch, n, width)
    modality = self.companion_embed(
        parts.companion_stem_input(companion, self.companion_valid)).reshape(batch, n, width)
    grid = vit.base_grid(self.img_size, self.patch_size)
    pos = vit.resize_grid_tokens(self.pos_embed[:, 1:], grid, (h, w))
    fusion = vit.resize_grid_tokens(self.fusion_tokens, grid, (h, w))
    cls = self.cls_token + self.pos_embed[:, :1]
    x = jnp.concatenate([
        jnp.broadcast_to(cls, (batch, 1, width)),
        jnp.broadcast_to(fusion + pos + self.fusion_type_embed, (batch, n, width)),
        camera + pos + self.camera_type_embed,
        modality + pos + self.companion_type_embed,
    ], axis=1)
    return x.astype(self.dtype), (h, w)

  def __call__(self, rgb: jax.Array, companion: jax.Array, *, train: bool) -> parts.Features:
    del train  # no dropout / drop-path
    x, (h, w) = self.tokens(rgb, companion)
    n = h * w
    attention, remat = self.attention, self.remat
    if self.fusion_mode == 'pruned':
      if self.layer0_impl == 'structured':
        x = vit.run_block(self.blocks[0], x, remat=remat, n=n)
      else:
        x = vit.run_blocks(self.blocks[:1], x, attention, remat,
                           [_as_mask(routing.layer0_mask(n))])[:, :1 + n]
      x = vit.run_blocks(self.blocks[1:], x, attention, remat)
    else:
      x = vit.run_blocks(self.blocks, x, attention, remat,
                         [_as_mask(routing.attention_mask(n, layer, 'persistent'))
                          for layer in range(len(self.blocks))])
    x = self.norm(x[:, :1 + n])
    return parts.Features(cls=x[:, 0], patches=x[:, 1:].reshape(x.shape[0], h, w, x.shape[-1]))


def _as_mask(mask) -> jax.Array:
  """bool [T, T] -> [1, 1, T, T], the broadcastable layout jax.nn.dot_product_attention takes."""
  return jnp.asarray(mask)[None, None]


# ---------------------------------------------------------------------------------- building


def _build_vit(cfg: Mapping[str, Any]) -> nn.Module:
  return ViTEncoder(inputs=parts.choice(cfg, 'inputs', parts.VIT_INPUTS, 'rgb'), **parts.companion_kwargs(cfg),
                    **parts.vit_kwargs(cfg))


def _build_fusion(cfg: Mapping[str, Any]) -> nn.Module:
  mode = parts.choice(cfg, 'fusion_mode', routing.FUSION_MODES, 'pruned')
  impl = parts.choice(cfg, 'layer0_impl', parts.LAYER0_IMPLS, 'structured')
  return FusionEncoder(fusion_mode=mode, layer0_impl=impl, **parts.companion_kwargs(cfg),
                       **parts.vit_kwargs(cfg))


def _build_early_fusion(cfg: Mapping[str, Any]) -> nn.Module:
  return EarlyFusionEncoder(**parts.companion_kwargs(cfg), **parts.vit_kwargs(cfg))


def _build_late_fusion(cfg: Mapping[str, Any]) -> nn.Module:
  return LateFusionEncoder(**parts.companion_kwargs(cfg), **parts.vit_kwargs(cfg))


def _build_dual(cfg: Mapping[str, Any]) -> nn.Module:
  return DualEncoder(**parts.companion_kwargs(cfg), **parts.vit_kwargs(cfg))


def _build_multimae(cfg: Mapping[str, Any]) -> nn.Module:
  return multimae.build_encoder(cfg)


_FAMILIES: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    'vit': _build_vit,
    'fusion': _build_fusion,
    'early_fusion': _build_early_fusion,
    'late_fusion': _build_late_fusion,
    'dual': _build_dual,
    'multimae': _build_multimae,
}


def families() -> list[str]:
  return sorted(_FAMILIES)


def build_encoder(cfg: Mapping[str, Any]) -> nn.Module:
  """cfg (ConfigDict or dict): family, inputs, fusion_mode, layer0_impl, img_size, patch_size,
  width, depth, num_heads, mlp_ratio, companion_channels, dtype -> encoder module."""
  family = cfg.get('family')
  if family not in _FAMILIES:
    raise ValueError(f'model.family must be one of {families()}, got {family!r}')
  return _FAMILIES[family](cfg)
