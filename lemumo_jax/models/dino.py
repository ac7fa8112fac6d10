"""The DINOv3-style RGB baseline's pretraining model (paper S1; the `dinov3` row).

A student and an EMA teacher of the same architecture: the 'vit' encoder of `config.model`
plus a DINO head on the CLS token and an iBOT head on the patch tokens. The student is this
module's `params`; the teacher is the same tree held in `TrainState.teacher_params` and run
through `DinoModel.teacher` (pretrain.py's step calls it outside the gradient and EMA-updates
it after the optimizer step).

Student (`__call__`, train=True): every global and local view; on the global views the
patch embeddings of the iBOT-masked positions are replaced by a learnable `mask_token`
before positional embeddings are added (DINOv2's `prepare_tokens_with_masks`). Its CLS from
the masked global views and the local views goes through the DINO head, its global patch
tokens through the iBOT head. Teacher (`teacher`): the global views only, unmasked.

Heads (DINO's DINOHead, `use_bn=False`): `head_layers` Dense layers, GELU between them
(hidden `hidden_dim`, last `bottleneck_dim`), L2 normalisation, then a weight-normalised
bias-free Dense to the prototypes whose norm (weight_g) is fixed at 1 (`norm_last_layer`),
so the logits are cosines in [-1, 1]. Dense layers: trunc-normal(0.02) weights, zero biases
(DINO's init); the last layer PyTorch's default Linear init. Computed in float32.

Running state (collection 'batch_stats', the place Flax keeps BatchNorm's averages):
'dino_centre' [K] and 'ibot_centre' [K_ibot], zeros at init. The teacher method returns the
centres it was called with (the loss centres with them) and stores
`centre <- m * centre + (1 - m) * mean(teacher logits)`, m = `centre_momentum`, the mean over
every global view and sample (DINO) and, for iBOT, over every patch token of them (iBOT's
`center2`; DINOv2 averages the masked patches only). Over a sharded batch the mean is global.

iBOT masks (`random_patch_masks`): each global-view image is masked with probability
`mask_sample_probability` (0.5, iBOT's `pred_prob`); a masked image hides round(r * N) of its
N patches, r ~ U(mask_ratio) = U(0.1, 0.5) (iBOT / DINOv2's ratio range), at uniformly random
positions (no block masking). At least one patch. Drawn from `make_rng('mask')`.

Choices where S1 is silent: the iBOT head is separate from the DINO head (DINOv3, and S1
lists two output dims); the mask token belongs to the pretraining model, not to the encoder, so
the exported encoder is a plain 'vit' encoder; the teacher keeps an (unused) copy of it so that
student and teacher are one tree. The heads run on every global patch token (static shapes);
the loss reads the masked positions only.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lemumo_jax.models import encoders
from lemumo_jax.models import heads
from lemumo_jax.models import parts
from lemumo_jax.models import vit


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def update_centre(centre: jax.Array, logits: jax.Array, momentum: float) -> jax.Array:
  """EMA of the teacher outputs' mean: centre [K], logits [..., K] -> new centre [K]."""
  batch_mean = jnp.mean(logits.reshape(-1, logits.shape[-1]).astype(jnp.float32), axis=0)
  return momentum * centre + (1.0 - momentum) * batch_mean


def random_patch_masks(key: jax.Array, shape: tuple[int, ...], num_patches: int,
                       sample_probability: float, ratio: tuple[float, float]) -> jax.Array:
  """bool [*shape, num_patches], True = masked; see the module docstring for the scheme."""
  low, high = (float(r) for r in ratio)
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(f'dino.mask_ratio={ratio} must satisfy 0 <= low <= high <= 1')
  if not 0.0 <= sample_probability <= 1.0:
    raise ValueError(f'dino.mask_sample_probability={sample_probability} must lie in [0, 1]')
  k_select, k_ratio, k_order = jax.random.split(key, 3)
  selected = jax.random.uniform(k_select, shape) < sample_probability
  r = jax.random.uniform(k_ratio, shape, minval=low, maxval=high)
  count = jnp.clip(jnp.round(r * num_patches), 1, num_patches)
  count = jnp.where(selected, count, 0)
  # The rank of an i.i.d. uniform score is a uniformly random permutation.
  scores = jax.random.uniform(k_order, shape + (num_patches,))
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  return ranks < count[..., None]


class DinoHead(nn.Module):
  """DINO projection head: x [M, D] -> prototype logits [M, num_prototypes] (cosines)."""
  num_prototypes: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 2:
      raise ValueError(f'DinoHead expects [M, D] features, got shape {x.shape}')
    if self.num_layers < 1:
      raise ValueError(f'dino.head_layers must be >= 1, got {self.num_layers}')
    init = dict(kernel_init=nn.initializers.truncated_normal(0.02),
                bias_init=nn.initializers.zeros)
    x = x.astype(jnp.float32)
    for i in range(self.num_layers - 1):
      x = jax.nn.gelu(nn.Dense(self.hidden_dim, name=f'mlp_{i}', **init)(x), approximate=False)
    x = nn.Dense(self.bottleneck_dim, name=f'mlp_{self.num_layers - 1}', **init)(x)
    x = l2_normalize(x)
    # weight_norm with weight_g fixed at 1: each prototype column has unit norm.
    kernel = self.param('last_layer', heads.torch_linear_init,
                        (self.bottleneck_dim, self.num_prototypes), jnp.float32)
    return x @ l2_normalize(kernel.T).T


def masked_vit_encode(encoder: encoders.ViTEncoder, images: jax.Array, patch_mask: jax.Array,
                      mask_token: jax.Array) -> parts.Features:
  """`encoder.encode(images)` with the patch embeddings where patch_mask [B, h * w] is True
  replaced by mask_token [1, 1, D] before positional embeddings (an all-False mask gives
  exactly `encoder.encode`; a test checks it)."""
  patches = encoder.patch_embed(images)
  batch, h, w, width = patches.shape
  patches = patches.reshape(batch, h * w, width)
  if patch_mask.shape != (batch, h * w):
    raise ValueError(f'patch_mask must be [B, h * w] = {(batch, h * w)}, got {patch_mask.shape}')
  patches = jnp.where(patch_mask[..., None], mask_token.astype(patches.dtype), patches)
  pos = encoder.pos_embed
  pos_patches = vit.resize_grid_tokens(
      pos[:, 1:], vit.base_grid(encoder.img_size, encoder.patch_size), (h, w))
  cls = jnp.broadcast_to(encoder.cls_token + pos[:, :1], (batch, 1, width))
  x = jnp.concatenate([cls, patches + pos_patches], axis=1).astype(encoder.dtype)
  x = encoder.norm(vit.run_blocks(encoder.blocks, x, encoder.attention, encoder.remat))
  return parts.Features(cls=x[:, 0], patches=x[:, 1:].reshape(batch, h, w, width))


def _fold(x: jax.Array) -> jax.Array:
  """[V, B, ...] -> [V * B, ...]."""
  return x.reshape((-1,) + x.shape[2:])


class DinoModel(nn.Module):
  """Student/teacher model of the `dinov3` row. views as ssl.JepaModel's."""
  encoder_cfg: Any
  dino_cfg: Any
  has_teacher = True   # class attribute: pretrain.py keeps an EMA teacher for this model

  def setup(self):
    if self.encoder_cfg.get('family') != 'vit':
      raise ValueError(f"the DINO objective needs model.family='vit' (a single ViT whose patch "
                       f"tokens can be masked), got {self.encoder_cfg.get('family')!r}")
    self.encoder = encoders.build_encoder(self.encoder_cfg)
    cfg = self.dino_cfg
    head = dict(hidden_dim=int(cfg.hidden_dim), bottleneck_dim=int(cfg.bottleneck_dim),
                num_layers=int(cfg.head_layers))
    self.dino_head = DinoHead(int(cfg.num_prototypes), **head)
    self.ibot_head = DinoHead(int(cfg.ibot_num_prototypes), **head)
    self.mask_token = self.param('mask_token', nn.initializers.zeros,
                                 (1, 1, int(self.encoder_cfg.width)), jnp.float32)
    self.dino_centre = self.variable('batch_stats', 'dino_centre', jnp.zeros,
                                     (int(cfg.num_prototypes),), jnp.float32)
    self.ibot_centre = self.variable('batch_stats', 'ibot_centre', jnp.zeros,
                                     (int(cfg.ibot_num_prototypes),), jnp.float32)

  def _input(self, views: dict[str, jax.Array], scale: str) -> jax.Array:
    return _fold(views[f'{scale}_{self.encoder.inputs}'])

  def _patch_logits(self, patches: jax.Array, num_global: int, batch: int) -> jax.Array:
    """patches [Vg * B, h, w, D] -> iBOT logits [Vg, B, h * w, K_ibot]."""
    n = patches.shape[1] * patches.shape[2]
    logits = self.ibot_head(patches.reshape(-1, patches.shape[-1]))
    return logits.reshape(num_global, batch, n, -1)

  def __call__(self, views: dict[str, jax.Array], *, train: bool) -> dict[str, Any]:
    """Student forward -> 'dino_global' [Vg, B, K], 'dino_local' [Vl, B, K] or None,
    'ibot' [Vg, B, N, K_ibot] (global patch logits), 'masks' bool [Vg, B, N] (no masks
    unless `train`)."""
    num_global, batch = views['global_rgb'].shape[:2]
    images = self._input(views, 'global')
    p = self.encoder.patch_size
    n = (images.shape[1] // p) * (images.shape[2] // p)
    if train:
      masks = random_patch_masks(self.make_rng('mask'), (num_global, batch), n,
                                 float(self.dino_cfg.mask_sample_probability),
                                 tuple(self.dino_cfg.mask_ratio))
    else:
      masks = jnp.zeros((num_global, batch, n), bool)
    global_features = masked_vit_encode(self.encoder, images, _fold(masks), self.mask_token)
    cls = [global_features.cls]
    has_local = 'local_rgb' in views and views['local_rgb'].shape[0] > 0
    if has_local:
      local = self._input(views, 'local')
      cls.append(self.encoder.encode(local)[0])
    logits = self.dino_head(jnp.concatenate(cls, axis=0)).reshape(-1, batch,
                                                                  self.dino_cfg.num_prototypes)
    return {'dino_global': logits[:num_global],
            'dino_local': logits[num_global:] if has_local else None,
            'ibot': self._patch_logits(global_features.patches, num_global, batch),
            'masks': masks}

  def teacher(self, views: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Teacher forward (global views, unmasked) -> 'dino_global' [Vg, B, K], 'ibot'
    [Vg, B, N, K_ibot], and the centres the loss uses, 'dino_centre' [K], 'ibot_centre'
    [K_ibot]; stores the updated centres when 'batch_stats' is mutable."""
    num_global, batch = views['global_rgb'].shape[:2]
    cls, patches = self.encoder.encode(self._input(views, 'global'))
    outputs = {'dino_global': self.dino_head(cls).reshape(num_global, batch, -1),
               'ibot': self._patch_logits(patches, num_global, batch),
               'dino_centre': self.dino_centre.value, 'ibot_centre': self.ibot_centre.value}
    if self.is_mutable_collection('batch_stats') and not self.is_initializing():
      momentum = float(self.dino_cfg.centre_momentum)
      self.dino_centre.value = update_centre(self.dino_centre.value, outputs['dino_global'],
                                             momentum)
      self.ibot_centre.value = update_centre(self.ibot_centre.value, outputs['ibot'], momentum)
    return outputs
