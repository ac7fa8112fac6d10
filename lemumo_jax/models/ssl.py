"""Pretraining models: an encoder plus the heads its objective needs, applied to all views.

`JepaModel` encodes the global and the local views with the ONE shared encoder (the two
resolutions are separate calls; parameters are shared), projects every CLS embedding with one
projector call (so BatchNorm sees all views), and returns the projected embeddings per view.

`passes` adds forwards of the same views with one modality zeroed (the FT-Pruned + SIGReg
(3-pass) row, paper S3): 'rgb' is the RGB-only pass (companion zeroed), 'companion' the
companion-only pass (RGB zeroed). Inputs are normalised, so zero is the dataset mean. Each pass
has its own projector call, so BatchNorm normalises the joint embeddings exactly as the
one-pass model does.

An encoder whose Features carry `companion_cls` (the 'dual' family, the ImageBind-style row)
also gets the companion CLS embeddings projected, by a second projector of the same shape
('companion_projector', so each modality has its own head and BatchNorm statistics, as
ImageBind's modality-specific heads), returned as 'z_companion_global' / 'z_companion_local'.
Other families never call that projector, so it holds no parameters for them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lemumo_jax.models import encoders
from lemumo_jax.models import heads
from lemumo_jax.models import parts


PASSES = ('joint', 'rgb', 'companion')


def check_passes(passes) -> tuple[str, ...]:
  """config.objective.passes -> tuple; 'joint' first, each of PASSES at most once."""
  passes = tuple(passes)
  if (not passes or passes[0] != 'joint' or len(set(passes)) != len(passes)
      or not set(passes) <= set(PASSES)):
    raise ValueError(f"config.objective.passes must start with 'joint' and name each of "
                     f'{list(PASSES)} at most once, got {list(passes)}')
  return passes


def _fold_views(x: jax.Array) -> jax.Array:
  """[V, B, ...] -> [V * B, ...]."""
  return x.reshape((-1,) + x.shape[2:])


class JepaModel(nn.Module):
  """Encoder + projector. views: 'global_rgb' [Vg, B, G, G, 3], 'global_companion'
  [Vg, B, G, G, 1], and optionally 'local_rgb' / 'local_companion' [Vl, B, L, L, .]."""
  encoder_cfg: Any
  projector_cfg: Any
  passes: tuple[str, ...] = ('joint',)

  def setup(self):
    check_passes(self.passes)
    self.encoder = encoders.build_encoder(self.encoder_cfg)
    projector = dict(hidden_dim=self.projector_cfg.hidden_dim,
                     num_hidden_layers=self.projector_cfg.num_hidden_layers,
                     out_dim=self.projector_cfg.out_dim)
    self.projector = heads.Projector(**projector)
    # Only the 'dual' family calls it (setup submodules create parameters when first called).
    self.companion_projector = heads.Projector(**projector)

  def __call__(self, views: dict[str, jax.Array], *, train: bool) -> dict[str, Any]:
    """-> {'z_global' [Vg, B, d], 'z_local' [Vl, B, d] or None} of the joint pass, plus
    'passes': {name: {'z_global', 'z_local'}} for every other pass in `self.passes`. With a
    'dual' encoder each of these also has 'z_companion_global' / 'z_companion_local' (the
    companion branch's projected CLS); 'z_global' / 'z_local' are then the RGB branch's."""
    outputs = self._project_pass(views, 'joint', train)
    others = {name: self._project_pass(views, name, train) for name in self.passes[1:]}
    if others:
      outputs['passes'] = others
    return outputs

  def _project_pass(self, views: dict[str, jax.Array], name: str,
                    train: bool) -> dict[str, jax.Array | None]:
    num_global, batch = views['global_rgb'].shape[:2]
    has_local = 'local_rgb' in views and views['local_rgb'].shape[0] > 0
    scales = ['global'] + (['local'] if has_local else [])
    cls, companion_cls = [], []
    for scale in scales:
      rgb = _fold_views(views[f'{scale}_rgb'])
      companion = _fold_views(views[f'{scale}_companion'])
      if name == 'rgb':
        companion = jnp.zeros_like(companion)
      elif name == 'companion':
        rgb = jnp.zeros_like(rgb)
      features = self.encoder(rgb, companion, train=train)
      cls.append(features.cls)
      if features.companion_cls is not None:
        companion_cls.append(features.companion_cls)

    def project(projector, embeddings, prefix):
      z = projector(jnp.concatenate(embeddings, axis=0).astype(jnp.float32), train=train)
      z = z.reshape((-1, batch, z.shape[-1]))
      return {f'{prefix}global': z[:num_global],
              f'{prefix}local': z[num_global:] if has_local else None}

    outputs = project(self.projector, cls, 'z_')
    if companion_cls:
      outputs.update(project(self.companion_projector, companion_cls, 'z_companion_'))
    return outputs

  def encode(self, rgb: jax.Array, companion: jax.Array) -> parts.Features:
    """Frozen-encoder features of clean views (probes)."""
    return self.encoder(rgb, companion, train=False)
