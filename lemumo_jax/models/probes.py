"""Frozen-feature patch probe modules (paper S3). Every head reads the patch grid [B, h, w, D];
tasks/heads.py composes them (ProbeHeads) with their targets, losses and metrics.

  CenterNet3D   3x3 Conv(D, 256) + BN + ReLU, ConvTranspose 2x, 1x1 heads:
                heatmap C, offset 2, size 3 (log l, w, h), depth 1 (log z), yaw 2 (sin, cos)
  CenterNet2D   the same readout with heatmap, offset 2 and box size 2 (log w, h)
  SegProbe      strictly linear: 1x1 Conv to C r^2, PixelShuffle r=4, bilinear resize
  DepthProbe    1x1 Conv to 16 r^2, PixelShuffle r=4, 3x3 Conv refine, 1x1 depth head
  OccupancyProbe 1x1 projection + 1x1 skip, PixelShuffle r=2, two 3x3 GroupNorm+GELU blocks,
                1x1 head (per-class box-footprint occupancy plus an 'any object' channel)

PixelShuffle follows torch's channel order: input channel c * r^2 + i * r + j goes to output
channel c at sub-pixel (i, j).
"""

from __future__ import annotations

import flax.linen as nn
import jax


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
  """[B, h, w, C r^2] -> [B, h r, w r, C]."""
  b, h, w, c = x.shape
  if c % (r * r):
    raise ValueError(f'pixel_shuffle: {c} channels are not divisible by r^2 = {r * r}')
  x = x.reshape(b, h, w, c // (r * r), r, r)
  x = x.transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * r, w * r, c // (r * r))


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, h, w, C] -> [B, H, W, C] (half-pixel centres, like align_corners=False)."""
  if x.shape[1:3] == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), 'bilinear', antialias=False)


class CenterNet3D(nn.Module):
  num_classes: int
  hidden: int = 256
  head_bias_init: float = -2.19   # CenterNet: sigmoid(-2.19) = 0.1 initial heatmap

  @nn.compact
  def __call__(self, patches: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    x = nn.Conv(self.hidden, (3, 3), padding='SAME', name='adapter')(patches)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='adapter_bn')(x))
    x = nn.ConvTranspose(self.hidden, (4, 4), strides=(2, 2), padding='SAME', name='upsample')(x)
    x = nn.relu(x)
    return {
        'heatmap': nn.Conv(self.num_classes, (1, 1), name='heatmap',
                           bias_init=nn.initializers.constant(self.head_bias_init))(x),
        'offset': nn.Conv(2, (1, 1), name='offset')(x),
        'size': nn.Conv(3, (1, 1), name='size')(x),
        'depth': nn.Conv(1, (1, 1), name='depth')(x),
        'yaw': nn.Conv(2, (1, 1), name='yaw')(x),
    }


class CenterNet2D(nn.Module):
  num_classes: int
  hidden: int = 256
  head_bias_init: float = -2.19

  @nn.compact
  def __call__(self, patches: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    x = nn.Conv(self.hidden, (3, 3), padding='SAME', name='adapter')(patches)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='adapter_bn')(x))
    x = nn.ConvTranspose(self.hidden, (4, 4), strides=(2, 2), padding='SAME', name='upsample')(x)
    x = nn.relu(x)
    return {
        'heatmap': nn.Conv(self.num_classes, (1, 1), name='heatmap',
                           bias_init=nn.initializers.constant(self.head_bias_init))(x),
        'offset': nn.Conv(2, (1, 1), name='offset')(x),
        'wh': nn.Conv(2, (1, 1), name='wh')(x),
    }


class SegProbe(nn.Module):
  """Linear segmentation readout: logits [B, out_h, out_w, C]."""
  num_classes: int
  out_size: tuple[int, int]
  upscale: int = 4

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    x = nn.Conv(self.num_classes * self.upscale**2, (1, 1), name='proj')(patches)
    return resize_bilinear(pixel_shuffle(x, self.upscale), self.out_size)


class DepthProbe(nn.Module):
  """Dense depth in metres [B, h r, w r] (softplus keeps it positive)."""
  upscale: int = 4
  channels: int = 16

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    x = nn.Conv(self.channels * self.upscale**2, (1, 1), name='proj')(patches)
    x = pixel_shuffle(x, self.upscale)
    x = nn.gelu(nn.Conv(self.channels, (3, 3), padding='SAME', name='refine')(x))
    return nn.softplus(nn.Conv(1, (1, 1), name='head')(x))[..., 0] * 10.0


class OccupancyProbe(nn.Module):
  """Occupancy logits [B, h r, w r, num_channels]."""
  num_channels: int
  hidden: int = 64
  upscale: int = 2

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    r2 = self.upscale**2
    x = nn.Conv(self.hidden * r2, (1, 1), name='proj')(patches)
    x = x + nn.Conv(self.hidden * r2, (1, 1), name='skip')(patches)
    x = pixel_shuffle(x, self.upscale)
    for i in range(2):
      y = nn.Conv(self.hidden, (3, 3), padding='SAME', name=f'refine{i}')(x)
      x = x + nn.gelu(nn.GroupNorm(num_groups=8, name=f'refine{i}_norm')(y))
    return nn.Conv(self.num_channels, (1, 1), name='head')(x)
