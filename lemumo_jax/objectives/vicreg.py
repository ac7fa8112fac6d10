"""VICReg (Bardes et al., ICLR 2022) on projected CLS embeddings: the FT-Pruned + VICReg row.

  L = sim_coeff * L_inv + std_coeff * L_var + cov_coeff * L_cov     (25, 25, 1 by default)

The weights and the variance/covariance terms are the VICReg reference code's defaults (the
Le MuMo paper gives none of its own):
- L_var: per view, std_j = sqrt(Var_n z[n, j] + eps) over the global batch (unbiased, N - 1),
  eps = 1e-4; mean over dimensions of relu(1 - std_j).
- L_cov: per view, C = (z - mean)^T (z - mean) / (N - 1); sum of the squared off-diagonal
  entries of C divided by d.
Both are averaged over views (VICReg's code averages its two branches' variance terms and sums
their covariance terms; with more than two views a sum would scale the covariance weight with
the crop count, so both are averaged here, as SIGReg is averaged over views in lejepa.py).
- L_inv: the mean squared error (over samples, views and dimensions, VICReg's F.mse_loss) of
  every view, global and local, to the centre = the mean of the global views, the anchor of
  the paper's S1 invariance term. The paper reads this row as the SIGReg row with the
  regulariser swapped ("the isotropic Gaussian target is also a better regularizing anchor for
  the joint multimodal CLS embedding than variance-and-covariance matching alone", section
  4.5), so the invariance keeps the LeJEPA centre rather than VICReg's two-view pairing. For two
  global views and no local views it is 1/4 of VICReg's pairwise MSE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def invariance_mse(z_global: jax.Array, z_local: jax.Array | None) -> jax.Array:
  """z_global [Vg, B, d], z_local [Vl, B, d] or None -> mean of (z - centre)^2."""
  centre = jnp.mean(z_global, axis=0)
  views = z_global if z_local is None else jnp.concatenate([z_global, z_local], axis=0)
  return jnp.mean(jnp.square(views - centre))


def variance_loss(z: jax.Array, eps: float = 1e-4) -> jax.Array:
  """z [..., N, d] -> [...]: mean_j relu(1 - sqrt(unbiased var_j + eps))."""
  std = jnp.sqrt(jnp.var(z, axis=-2, ddof=1) + eps)
  return jnp.mean(jax.nn.relu(1.0 - std), axis=-1)


def covariance_loss(z: jax.Array) -> jax.Array:
  """z [..., N, d] -> [...]: sum of squared off-diagonal covariances / d."""
  n, d = z.shape[-2:]
  centred = z - jnp.mean(z, axis=-2, keepdims=True)
  cov = jnp.einsum('...ni,...nj->...ij', centred, centred) / (n - 1)
  off_diagonal = jnp.sum(jnp.square(cov), axis=(-2, -1)) - jnp.sum(
      jnp.square(jnp.diagonal(cov, axis1=-2, axis2=-1)), axis=-1)
  return off_diagonal / d


def vicreg_loss(z_global: jax.Array, z_local: jax.Array | None, *, sim_coeff: float = 25.0,
                std_coeff: float = 25.0, cov_coeff: float = 1.0,
                eps: float = 1e-4) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Returns (loss, metrics) for projected views z_global [Vg, B, d], z_local [Vl, B, d]."""
  z_global = z_global.astype(jnp.float32)
  z_local = None if z_local is None else z_local.astype(jnp.float32)
  views = z_global if z_local is None else jnp.concatenate([z_global, z_local], axis=0)
  invariance = invariance_mse(z_global, z_local)
  variance = jnp.mean(variance_loss(views, eps))
  covariance = jnp.mean(covariance_loss(views))
  loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
  metrics = {'loss': loss, 'invariance': invariance, 'variance': variance,
             'covariance': covariance, 'embedding_std': jnp.mean(jnp.std(views, axis=1))}
  return loss, metrics
