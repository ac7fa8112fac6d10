"""Pretraining models: an encoder plus the heads its objective needs, applied to all views.

`JepaModel` encodes the global and the local views with the ONE shared encoder (the two
resolutions are separate calls; parameters are shared), projects every CLS embedding with one
projector call (so BatchNorm sees all views), and returns the projected embeddings per view.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lemumo_jax.models import encoders
from lemumo_jax.models import heads


def _fold_views(x: jax.Array) -> jax.Array:
  """[V, B, ...] -> [V * B, ...]."""
  return x.reshape((-1,) + x.shape[2:])


class JepaModel(nn.Module):
  """Encoder + projector. views: 'global_rgb' [Vg, B, G, G, 3], 'global_companion'
  [Vg, B, G, G, 1], and optionally 'local_rgb' / 'local_companion' [Vl, B, L, L, .]."""
  encoder_cfg: Any
  projector_cfg: Any

  def setup(self):
    self.encoder = encoders.build_encoder(self.encoder_cfg)
    self.projector = heads.Projector(hidden_dim=self.projector_cfg.hidden_dim,
                                     num_hidden_layers=self.projector_cfg.num_hidden_layers,
                                     out_dim=self.projector_cfg.out_dim)

  def __call__(self, views: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
    num_global, batch = views['global_rgb'].shape[:2]
    cls = [self.encoder(_fold_views(views['global_rgb']),
                        _fold_views(views['global_companion']), train=train).cls]
    has_local = 'local_rgb' in views and views['local_rgb'].shape[0] > 0
    if has_local:
      cls.append(self.encoder(_fold_views(views['local_rgb']),
                              _fold_views(views['local_companion']), train=train).cls)
    z = self.projector(jnp.concatenate(cls, axis=0).astype(jnp.float32), train=train)
    z = z.reshape((-1, batch, z.shape[-1]))
    return {'z_global': z[:num_global], 'z_local': z[num_global:] if has_local else None}

  def encode(self, rgb: jax.Array, companion: jax.Array) -> encoders.Features:
    """Frozen-encoder features of clean views (probes)."""
    return self.encoder(rgb, companion, train=False)
