"""Sketched Isotropic Gaussian Regularization (paper eq. S2, DESIGN.md section 3).

SIGReg projects embeddings on K random unit directions and compares the empirical
characteristic function of each 1-D projection with that of N(0, 1) at T knots:

  c[k, j] = mean_n cos(t_j w_k.z_n),   s[k, j] = mean_n sin(t_j w_k.z_n)
  stat[k] = S * sum_j weight_j [(c[k, j] - exp(-t_j^2 / 2))^2 + s[k, j]^2]
  loss    = mean_k stat[k]

The scale S (`scale`, config.objective.sigreg_scale): 'batch' (default) is S = N, the LeJEPA
reference code's `statistic = (err @ weights) * proj.size(-2)`, which makes the statistic's
expectation under N(0, I) independent of the batch (an Epps-Pulley test statistic); 'none' is
S = 1, S2 as the paper prints it, whose value shrinks as 1/N.

with the defaults of the LeJEPA reference code: K = 256 standard-normal directions scaled to
unit norm, T = 17 knots evenly spaced on [0, 3] (the characteristic function is symmetric so
only t >= 0 is integrated, with doubled trapezoid weights), each weight multiplied by the
Gaussian window exp(-t^2 / 2). N is the GLOBAL batch: under `jax.jit` with the batch sharded
over a device mesh the mean over n is a cross-device reduction that XLA inserts itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# config.objective.sigreg_scale values (module docstring).
SCALES = ('batch', 'none')


def knots_and_weights(num_knots: int = 17, t_max: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
  """Knots t [T] on [0, t_max] and integration weights [T] (trapezoid x2, x window)."""
  t = np.linspace(0.0, t_max, num_knots)
  dt = t_max / (num_knots - 1)
  weights = np.full((num_knots,), 2.0 * dt)
  weights[[0, -1]] = dt
  return t, weights * np.exp(-0.5 * t**2)


def random_directions(key: jax.Array, dim: int, num_slices: int) -> jax.Array:
  """[dim, num_slices] standard-normal columns scaled to unit norm."""
  directions = jax.random.normal(key, (dim, num_slices), jnp.float32)
  return directions / jnp.linalg.norm(directions, axis=0, keepdims=True)


def sigreg(z: jax.Array, directions: jax.Array, num_knots: int = 17,
           t_max: float = 3.0, scale: str = 'batch') -> jax.Array:
  """SIGReg statistic averaged over directions, for each leading index.

  Args:
    z: [..., N, d] embeddings; the statistic is computed over the N axis separately for every
      leading index (e.g. one value per view for z [V, N, d]).
    directions: [d, K] unit columns, shared by all leading indices.
    scale: 'batch' (x N, the reference) or 'none' (S2 as printed).
  Returns:
    [...] the statistic (a scalar for z [N, d]).
  """
  if scale not in SCALES:
    raise ValueError(f'config.objective.sigreg_scale must be one of {list(SCALES)}, got '
                     f'{scale!r}')
  t, weights = knots_and_weights(num_knots, t_max)
  target = jnp.asarray(np.exp(-0.5 * t**2), jnp.float32)
  z = z.astype(jnp.float32)
  n = z.shape[-2]
  projected = z @ directions                                   # [..., N, K]
  phase = projected[..., None] * jnp.asarray(t, jnp.float32)   # [..., N, K, T]
  cos_mean = jnp.mean(jnp.cos(phase), axis=-3)                 # [..., K, T]
  sin_mean = jnp.mean(jnp.sin(phase), axis=-3)
  error = jnp.square(cos_mean - target) + jnp.square(sin_mean)
  statistic = error @ jnp.asarray(weights, jnp.float32)       # [..., K]
  if scale == 'batch':
    statistic = statistic * n
  return jnp.mean(statistic, axis=-1)


def sigreg_loss(key: jax.Array, z: jax.Array, num_slices: int = 256, num_knots: int = 17,
                t_max: float = 3.0, scale: str = 'batch') -> jax.Array:
  """Mean SIGReg over the leading axes of z [..., N, d] with fresh directions from `key`.

  Derive `key` from the step (jax.random.fold_in(base, step)) so every device and every
  replay of a step draws the same directions.
  """
  directions = random_directions(key, z.shape[-1], num_slices)
  return jnp.mean(sigreg(z, directions, num_knots, t_max, scale))
