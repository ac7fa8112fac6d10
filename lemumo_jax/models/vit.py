"""Flax ViT pieces named after timm's vision_transformer.py, so weights map across.

Parameter paths: patch_embed/proj/{kernel,bias}, cls_token, pos_embed,
blocks_{i}/{norm1,attn/qkv,attn/proj,norm2,mlp/fc1,mlp/fc2}, norm. (timm's `blocks.i.x`
becomes `blocks_i/x`; a Dense kernel is timm's Linear weight transposed, a Conv kernel
[p, p, C, D] is timm's [D, C, p, p] permuted.)

Precision: params are float32; `dtype` is the compute dtype (float32 or bfloat16); attention
logits and softmax run in float32.

How the blocks compute, not what (model.attention, model.remat; compute-only keys, changeable on
resume): `attention` picks jax.nn.dot_product_attention's implementation, 'xla' (the
reference, every backend), 'cudnn' (cuDNN flash attention, NVIDIA GPUs: no [T, T] logits in
memory) or 'auto' ('cudnn' on a GPU backend, else 'xla'); `remat` rematerialises each block in
the backward pass: 'none', 'full' (saves only the block's input) or 'dots' (also saves the
outputs of the matmuls without batch dimensions: qkv, proj, fc1, fc2).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lemumo_jax.models import routing

Dtype = Any

LAYER_NORM_EPS = 1e-6
token_init = nn.initializers.truncated_normal(stddev=0.02)
dense_init = nn.initializers.xavier_uniform()


def to_pair(size: int | Sequence[int]) -> tuple[int, int]:
  """224 -> (224, 224); (320, 480) stays."""
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  pair = tuple(int(s) for s in size)
  if len(pair) != 2:
    raise ValueError(f'image size must be an int or (height, width), got {size!r}')
  return pair


def base_grid(img_size: int | Sequence[int], patch_size: int) -> tuple[int, int]:
  """Patch grid (gh, gw) of the base resolution that pos_embed / fusion tokens are learned at."""
  height, width = to_pair(img_size)
  if height % patch_size or width % patch_size:
    raise ValueError(f'img_size {(height, width)} is not divisible by patch_size {patch_size}')
  return height // patch_size, width // patch_size


def resize_grid_tokens(tokens: jax.Array, grid: tuple[int, int],
                       new_grid: tuple[int, int]) -> jax.Array:
  """Bilinear resampling of grid-aligned tokens [1, gh * gw, D] -> [1, h * w, D].

  The identity at the base grid (no resampling error for global crops at img_size);
  antialiased when shrinking, as timm's resample_abs_pos_embed does.
  """
  if tuple(grid) == tuple(new_grid):
    return tokens
  width = tokens.shape[-1]
  image = tokens.reshape((1,) + tuple(grid) + (width,))
  image = jax.image.resize(image, (1,) + tuple(new_grid) + (width,), method='bilinear')
  return image.reshape(1, new_grid[0] * new_grid[1], width)


ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def attention_impl(name: str) -> str:
  """model.attention -> 'xla' or 'cudnn' ('auto': cuDNN on a GPU backend)."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(f'model.attention must be one of {list(ATTENTION_IMPLS)}, got {name!r}')
  if name == 'auto':
    return 'cudnn' if jax.default_backend() == 'gpu' else 'xla'
  return name


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None, implementation: str = 'xla',
                          length: int | None = None) -> jax.Array:
  """jax.nn.dot_product_attention over q [B, T, H, hd], k/v [B, S, H, hd]; mask bool
  [B or 1, H or 1, T, S] (True = may attend).

  'cudnn' needs sequence lengths that are multiples of 8 here (JAX 0.10's cuDNN path rejects odd
  lengths in training, a ViT's 1 + 196 tokens, and the kernels prefer aligned ones): with
  `length`, q, k, v (and mask) are already padded (pad_tokens) and the first `length` positions
  are the real ones; without it they are padded here and the padded query rows sliced off.
  Padded keys get no weight either way (cuDNN's padding mask from the true lengths).
  """
  implementation = attention_impl(implementation)
  if implementation == 'xla':
    if length is not None:
      raise ValueError('XLA attention runs on unpadded tokens; got length= (pad_tokens pads '
                       'only for cuDNN)')
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  t, s = q.shape[1], k.shape[1]
  t_pad, s_pad = (0, 0) if length is not None else (-t % 8, -s % 8)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))) if n else x
  if mask is not None and (t_pad or s_pad):
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, t_pad), (0, s_pad)))
  batch = q.shape[0]
  out = jax.nn.dot_product_attention(
      pad(q, t_pad), pad(k, s_pad), pad(v, s_pad), mask=mask, implementation='cudnn',
      query_seq_lengths=jnp.full((batch,), t if length is None else length, jnp.int32),
      key_value_seq_lengths=jnp.full((batch,), s if length is None else length, jnp.int32))
  return out if length is not None else out[:, :t]


def pad_tokens(x: jax.Array, implementation: str) -> tuple[jax.Array, int | None]:
  """x [B, T, D] -> (x padded to a multiple of 8 tokens, T) for 'cudnn' attention, so a stack
  of blocks pads once instead of in every attention call (each pad is a copy of q, k and v);
  (x, None) for 'xla'. The blocks' output is sliced back to [:, :T]."""
  if attention_impl(implementation) != 'cudnn':
    return x, None
  return jnp.pad(x, ((0, 0), (0, -x.shape[1] % 8), (0, 0))), x.shape[1]


def run_block(block: nn.Module, x: jax.Array, mask: jax.Array | None = None,
              remat: str = 'none', n: int | None = None, length: int | None = None) -> jax.Array:
  """block(x, mask, length), or block.fusion_layer0(x, n) when n is given, rematerialised in
  the backward pass by the REMAT_POLICIES entry `remat` (model.remat)."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat must be one of {list(REMAT_POLICIES)}, got {remat!r}')
  apply = ((lambda mdl, y, m: mdl(y, m, length)) if n is None
           else (lambda mdl, y, m: mdl.fusion_layer0(y, n)))
  if remat != 'none':
    apply = nn.remat(apply, policy=REMAT_POLICIES[remat])
  return apply(block, x, mask)


def run_blocks(blocks, x: jax.Array, attention: str, remat: str,
               masks=None) -> jax.Array:
  """x [B, T, D] through `blocks` (masks: None, or one bool [1, 1, T, T] per block), padded
  once for cuDNN attention (pad_tokens) -> [B, T, D]."""
  masks = [None] * len(blocks) if masks is None else list(masks)
  tokens = x.shape[1]
  x, length = pad_tokens(x, attention)
  extra = x.shape[1] - tokens
  for block, mask in zip(blocks, masks):
    if mask is not None and extra:
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, extra), (0, extra)))
    x = run_block(block, x, mask, remat, length=length)
  return x if length is None else x[:, :tokens]


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype: Dtype) -> jax.Array:
  """x @ kernel + bias in the compute dtype (what nn.Dense does)."""
  return jnp.dot(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


class PatchEmbed(nn.Module):
  """images [B, H, W, C] -> patch tokens [B, H/p, W/p, D] (timm 'patch_embed.proj')."""
  patch_size: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if (images.ndim != 4 or images.shape[1] % self.patch_size
        or images.shape[2] % self.patch_size):
      raise ValueError(f'{self.name}: images must be [B, H, W, C] with H and W divisible by '
                       f'patch_size {self.patch_size}, got shape {images.shape}')
    p = self.patch_size
    # Flax's default (lecun-normal) conv init: unit-variance tokens for any channel count.
    return nn.Conv(self.width, kernel_size=(p, p), strides=(p, p), padding='VALID',
                   dtype=self.dtype, param_dtype=jnp.float32, name='proj')(images)


class QKVParams(nn.Module):
  """The fused query/key/value projection's parameters (timm 'attn.qkv'): kernel [D, 3D]
  (columns [Q | K | V]) and bias [3D]. Returned rather than applied, so the structured fusion
  layer 0 can project only the K/V columns for tokens whose queries it does not need."""
  width: int

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = self.param('kernel', dense_init, (self.width, 3 * self.width), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (3 * self.width,), jnp.float32)
    return kernel, bias


class Attention(nn.Module):
  """Multi-head self-attention: 'qkv' -> dot_product_attention -> 'proj'."""
  width: int
  num_heads: int
  dtype: Dtype = jnp.float32
  attention: str = 'xla'            # ATTENTION_IMPLS

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}')
    self.qkv = QKVParams(self.width)
    self.proj = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                         kernel_init=dense_init, bias_init=nn.initializers.zeros)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               length: int | None = None) -> jax.Array:
    """x [B, T, D]; mask bool [B or 1, H or 1, T, T] (True = may attend); length: the real
    tokens of an x padded for cuDNN (pad_tokens) -> [B, T, D]."""
    batch, tokens, width = x.shape
    kernel, bias = self.qkv()
    split = lambda a: a.reshape(batch, tokens, self.num_heads, width // self.num_heads)
    if attention_impl(self.attention) == 'cudnn':
      # Three projections, each contiguous in [B, T, H, hd] as the kernel reads it: slicing one
      # fused [B, T, 3D] output would copy q, k and v.
      q, k, v = (split(dense(x, kernel[:, i * width:(i + 1) * width],
                             bias[i * width:(i + 1) * width], self.dtype)) for i in range(3))
    else:
      q, k, v = (split(a) for a in jnp.split(dense(x, kernel, bias, self.dtype), 3, axis=-1))
    out = dot_product_attention(q, k, v, mask=mask, implementation=self.attention,
                                length=length)
    return self.proj(out.reshape(batch, tokens, width))

  def fusion_layer0(self, x: jax.Array, n: int) -> jax.Array:
    """Pruned-fusion layer 0 (routing.structured_layer0_attention): x [B, 1 + 3n, D] ->
    outputs of the kept tokens [B, 1 + n, D]."""
    kernel, bias = self.qkv()
    out = routing.structured_layer0_attention(
        x, kernel, bias, n=n, num_heads=self.num_heads, dtype=self.dtype,
        attention=lambda q, k, v: dot_product_attention(q, k, v, implementation=self.attention))
    return self.proj(out)


class Mlp(nn.Module):
  """'fc1' -> exact GELU (timm's nn.GELU) -> 'fc2'."""
  width: int
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kwargs = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=dense_init,
                  bias_init=nn.initializers.zeros)
    x = nn.Dense(self.hidden_dim, name='fc1', **kwargs)(x)
    x = jax.nn.gelu(x, approximate=False)
    return nn.Dense(self.width, name='fc2', **kwargs)(x)


def layer_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""
  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention: str = 'xla'            # ATTENTION_IMPLS

  def setup(self):
    self.norm1 = layer_norm(self.dtype)
    self.attn = Attention(self.width, self.num_heads, dtype=self.dtype, attention=self.attention)
    self.norm2 = layer_norm(self.dtype)
    self.mlp = Mlp(self.width, int(self.width * self.mlp_ratio), dtype=self.dtype)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               length: int | None = None) -> jax.Array:
    """x [B, T, D], mask and length as in Attention -> [B, T, D]."""
    x = x + self.attn(self.norm1(x), mask, length)
    return x + self.mlp(self.norm2(x))

  def fusion_layer0(self, x: jax.Array, n: int) -> jax.Array:
    """x [B, 1 + 3n, D] -> [B, 1 + n, D]: equals `self(x, layer0_mask)[:, :1 + n]`, but the
    out-projection and MLP run only on the kept tokens."""
    x_kept = x[:, :1 + n] + self.attn.fusion_layer0(self.norm1(x), n)
    return x_kept + self.mlp(self.norm2(x_kept))


class ViT(nn.Module):
  """Single-modality ViT: images [B, H, W, C] -> (cls [B, D], patches [B, h, w, D]).

  pos_embed [1, 1 + gh * gw, D] is learned at the base grid of `img_size` and bilinearly
  resized to the input's grid (h, w) = (H / p, W / p), so one model takes global and local
  crops. Outputs pass the final 'norm' and are float32.
  """
  img_size: int | Sequence[int]
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention: str = 'xla'            # ATTENTION_IMPLS
  remat: str = 'none'               # REMAT_POLICIES

  def setup(self):
    grid = base_grid(self.img_size, self.patch_size)
    self.patch_embed = PatchEmbed(self.patch_size, self.width, dtype=self.dtype)
    self.cls_token = self.param('cls_token', token_init, (1, 1, self.width), jnp.float32)
    self.pos_embed = self.param('pos_embed', token_init, (1, 1 + grid[0] * grid[1], self.width),
                                jnp.float32)
    self.blocks = [EncoderBlock(self.width, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                                attention=self.attention)
                   for _ in range(self.depth)]
    # float32 so features leave the encoder in float32 whatever the compute dtype.
    self.norm = layer_norm(jnp.float32)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    patches = self.patch_embed(images)
    batch, h, w, width = patches.shape
    pos = self.pos_embed
    pos_patches = resize_grid_tokens(pos[:, 1:], base_grid(self.img_size, self.patch_size), (h, w))
    cls = jnp.broadcast_to(self.cls_token + pos[:, :1], (batch, 1, width))
    x = jnp.concatenate([cls, patches.reshape(batch, h * w, width) + pos_patches], axis=1)
    x = run_blocks(self.blocks, x.astype(self.dtype), self.attention, self.remat)
    x = self.norm(x)
    return x[:, 0], x[:, 1:].reshape(batch, h, w, width)

  def __call__(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    del train  # no dropout / drop-path in the paper's recipe: train and eval are the same
    return self.encode(images)
