"""The LeJEPA objective on projected CLS embeddings (paper eq. 1 and 3, S1, S2).

  L = lam * SIGReg(Z) + (1 - lam) * L_inv

L_inv: the centre is the mean of the global-view embeddings of a sample, and every view, global
and local, is pulled to it. Two conventions, selected by `invariance_reduction`:
  'mean' (default)  the mean over views, samples AND embedding dimensions of (z - centre)^2: the
                    LeJEPA reference code's `(z.mean(0) - z).square().mean()` and the main text's
                    "mean-squared invariance term" (eq. 3).
  'sum'             S1 read literally: ||z - centre||^2 summed over the d dimensions, then the
                    mean over views and samples; d times the 'mean' value (16x at the paper's
                    projection dim 16, an effective lambda of ~0.007 instead of 0.1 next to
                    SIGReg x N).
SIGReg (S2; objectives/sigreg.py, its `scale` chooses between the reference's x N and S2 as
printed) is computed per view over the global batch and averaged over views, as the LeJEPA
reference does for its [V, N, d] embeddings.

3-pass (paper eq. S3): with `extra_passes` (the RGB-only and companion-only passes' views),
the SIGReg term is the mean of SIGReg over the joint pass and each extra pass, all with the
step's one set of directions and the same two conventions; the invariance term stays on the
joint pass ("averages SIGReg over three forwards", section 3.4; "The joint pass is reused from
the main objective", S3).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lemumo_jax.objectives import sigreg as sigreg_lib

# config.objective.invariance_reduction values (module docstring).
INVARIANCE_REDUCTIONS = ('mean', 'sum')


def check_choice(value: str, choices: tuple[str, ...], key: str) -> str:
  """`value` if it is one of `choices`, else a ValueError naming config.<key>."""
  if value not in choices:
    raise ValueError(f'config.{key} must be one of {list(choices)}, got {value!r}')
  return value


def invariance_loss(z_global: jax.Array, z_local: jax.Array | None,
                    reduction: str = 'mean') -> jax.Array:
  """z_global [Vg, B, d], z_local [Vl, B, d] or None -> scalar (module docstring)."""
  check_choice(reduction, INVARIANCE_REDUCTIONS, 'objective.invariance_reduction')
  centre = jnp.mean(z_global, axis=0)
  views = z_global if z_local is None else jnp.concatenate([z_global, z_local], axis=0)
  squared = jnp.square(views - centre)
  return jnp.mean(squared) if reduction == 'mean' else jnp.mean(jnp.sum(squared, axis=-1))


def _all_views(z_global: jax.Array, z_local: jax.Array | None) -> jax.Array:
  z_global = z_global.astype(jnp.float32)
  return z_global if z_local is None else jnp.concatenate(
      [z_global, z_local.astype(jnp.float32)], axis=0)


def lejepa_loss(key: jax.Array, z_global: jax.Array, z_local: jax.Array | None, *,
                lam: float = 0.1, num_slices: int = 256, num_knots: int = 17,
                t_max: float = 3.0, invariance_reduction: str = 'mean',
                sigreg_scale: str = 'batch',
                extra_passes: Mapping[str, Mapping[str, jax.Array | None]] | None = None,
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (loss, metrics) for projected views z_global [Vg, B, d], z_local [Vl, B, d].

  invariance_reduction: 'mean' | 'sum'; sigreg_scale: 'batch' | 'none' (module docstring).
  extra_passes: {name: {'z_global', 'z_local'}} of the single-modality passes (S3), or None.
  """
  z_global = z_global.astype(jnp.float32)
  views = _all_views(z_global, z_local)
  extra_passes = extra_passes or {}
  directions = sigreg_lib.random_directions(key, views.shape[-1], num_slices)

  def view_mean_sigreg(v):
    return jnp.mean(sigreg_lib.sigreg(v, directions, num_knots, t_max, scale=sigreg_scale))

  sigreg = view_mean_sigreg(views)
  metrics = {}
  if extra_passes:
    per_pass = {'joint': sigreg}
    for name, z in extra_passes.items():
      per_pass[name] = view_mean_sigreg(_all_views(z['z_global'], z['z_local']))
    metrics.update({f'sigreg_{name}': value for name, value in per_pass.items()})
    sigreg = sum(per_pass.values()) / len(per_pass)
  invariance = invariance_loss(z_global, None if z_local is None else z_local.astype(jnp.float32),
                               invariance_reduction)
  loss = lam * sigreg + (1.0 - lam) * invariance
  metrics.update({'loss': loss, 'sigreg': sigreg, 'invariance': invariance,
                  'embedding_std': jnp.mean(jnp.std(views, axis=1))})
  return loss, metrics
