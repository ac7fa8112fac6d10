"""What every encoder family shares: the output type, the input checks, the companion stem's
input and the config -> constructor fields (used by encoders.py and multimae.py alike)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from lemumo_jax.models import vit


class Features(flax.struct.PyTreeNode):
  """Encoder outputs: cls [B, D] (final-normed CLS), patches [B, h, w, D] (final-normed patch
  grid; the fusion tokens for 'fusion'), both float32. companion_cls [B, D]: only the 'dual'
  family's, the companion branch's CLS for its contrastive objective (None otherwise)."""
  cls: jax.Array
  patches: jax.Array
  companion_cls: jax.Array | None = None


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
VIT_INPUTS = ('rgb', 'companion')
LAYER0_IMPLS = ('structured', 'masked')


def check_pair(rgb: jax.Array, companion: jax.Array, companion_channels: int) -> None:
  if rgb.ndim != 4 or rgb.shape[-1] != 3:
    raise ValueError(f'rgb must be [B, H, W, 3], got shape {rgb.shape}')
  if companion.ndim != 4 or companion.shape[-1] != companion_channels:
    raise ValueError(f'companion must be [B, H, W, {companion_channels}] '
                     f'(model.companion_channels), got shape {companion.shape}')
  if rgb.shape[:3] != companion.shape[:3]:
    raise ValueError(f'rgb {rgb.shape} and companion {companion.shape} differ in [B, H, W]')


def companion_stem_input(companion: jax.Array, valid_channel: bool) -> jax.Array:
  """What a companion patch stem reads: the map [B, H, W, C] and, with valid_channel
  (model.companion_valid), one more channel that is 1 where any companion channel is non-zero
  (a LiDAR return) and 0 elsewhere. A linear stem sees a sparse depth patch as a weighted sum of
  its returns, so a few near returns and many far ones can look alike; with the count beside
  the sum the patch's mean depth becomes linearly readable. Crops resize the companion with
  'nearest' by default, which keeps the no-return zeros exact."""
  if not valid_channel:
    return companion
  valid = jnp.any(companion != 0, axis=-1, keepdims=True).astype(companion.dtype)
  return jnp.concatenate([companion, valid], axis=-1)


def get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
  value = cfg.get(key, default)
  if value is None:
    raise ValueError(f'model config is missing {key!r}')
  return value


def choice(cfg: Mapping[str, Any], key: str, allowed: Sequence[str], default: str) -> str:
  value = cfg.get(key, default)
  if value not in allowed:
    raise ValueError(f'model.{key} must be one of {list(allowed)}, got {value!r}')
  return value


def img_size(cfg: Mapping[str, Any]):
  size = get(cfg, 'img_size')
  return size if isinstance(size, int) else tuple(size)  # json round-trips tuples as lists


def companion_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The companion-input fields of every family that reads the companion."""
  return dict(companion_channels=int(cfg.get('companion_channels', 1)),
              companion_valid=bool(cfg.get('companion_valid', False)))


def vit_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The fields every transformer family shares."""
  return dict(img_size=img_size(cfg), patch_size=int(get(cfg, 'patch_size')),
              width=int(get(cfg, 'width')), depth=int(get(cfg, 'depth')),
              num_heads=int(get(cfg, 'num_heads')), mlp_ratio=float(cfg.get('mlp_ratio', 4.0)),
              dtype=DTYPES[choice(cfg, 'dtype', tuple(DTYPES), 'float32')],
              attention=choice(cfg, 'attention', vit.ATTENTION_IMPLS, 'xla'),
              remat=choice(cfg, 'remat', tuple(vit.REMAT_POLICIES), 'none'))
