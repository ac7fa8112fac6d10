"""Symmetric InfoNCE between paired modality embeddings: the ImageBind-style row (paper S1).

For each global view v (the RGB and companion crops of a view share one crop box), with
z_rgb [B, d] the projected RGB CLS and z_comp [B, d] the projected companion CLS of that view,
both L2-normalised:

  logits = z_rgb @ z_comp^T / temperature                     [B, B], temperature 0.07 (S1)
  L_v = (CE(logits, arange(B)) + CE(logits^T, arange(B))) / 2  (RGB -> companion, and back)
  L = mean over the global views of L_v

The negatives are the other samples of the global batch (the jitted step sees the global
array; XLA gathers across the 'data' mesh axis). The temperature is fixed, not learned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(z: jax.Array, eps: float = 1e-12) -> jax.Array:
  """z / max(||z||, eps) along the last axis (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(z), axis=-1, keepdims=True))
  return z / jnp.maximum(norm, eps)


def infonce_loss(z_rgb: jax.Array, z_companion: jax.Array, *, temperature: float = 0.07,
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """z_rgb, z_companion [V, B, d] (projected, paired by index) -> (loss, metrics)."""
  if z_rgb.shape != z_companion.shape or z_rgb.ndim != 3:
    raise ValueError(f'infonce: z_rgb {z_rgb.shape} and z_companion {z_companion.shape} must '
                     f'both be [V, B, d]')
  if temperature <= 0:
    raise ValueError(f'infonce: temperature must be > 0, got {temperature}')
  a = l2_normalize(z_rgb.astype(jnp.float32))
  b = l2_normalize(z_companion.astype(jnp.float32))
  logits = jnp.einsum('vid,vjd->vij', a, b) / temperature           # [V, B, B]
  batch = logits.shape[-1]
  diagonal = jnp.diagonal(logits, axis1=-2, axis2=-1)                # [V, B]
  rgb_to_comp = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - diagonal, axis=-1)
  comp_to_rgb = jnp.mean(jax.nn.logsumexp(logits, axis=-2) - diagonal, axis=-1)
  per_view = 0.5 * (rgb_to_comp + comp_to_rgb)                       # [V]
  loss = jnp.mean(per_view)
  labels = jnp.arange(batch)
  accuracy = 0.5 * (jnp.mean(jnp.argmax(logits, axis=-1) == labels)
                    + jnp.mean(jnp.argmax(logits, axis=-2) == labels))
  metrics = {'loss': loss, 'infonce': loss, 'infonce_rgb_to_companion': jnp.mean(rgb_to_comp),
             'infonce_companion_to_rgb': jnp.mean(comp_to_rgb), 'pair_accuracy': accuracy,
             'embedding_std': jnp.mean(jnp.std(z_rgb.astype(jnp.float32), axis=1))}
  return loss, metrics
