"""MultiMAE losses (paper S1; Bachmann et al. 2022): the multimae_ss and multimae_mt rows.

On the outputs of models/multimae.py MaeModel, per view (N = Vg * B views, n patches each):

  RGB        MSE between the prediction and the per-patch normalised pixels of the view the
             encoder saw (MAE's norm_pix_loss, MultiMAE's 'norm_rgb' target): each patch's
             p*p*3 values minus their mean, over sqrt(variance + 1e-6).
  companion  L1 between the prediction and the view's companion map standardised per view
             (mean / sqrt(variance + 1e-6) over all its pixels: MultiMAE's standardize_depth,
             without its 10 % trimming), so depth and thermal weigh like RGB.
  Both: a patch's loss is the mean over its values; only masked patches count (MultiMAE's
  loss_on_unmasked=False), averaged per view, then over the views (MultiMAE's per-sample mean).
  seg (MT)   softmax cross-entropy of the per-pixel logits against the labels of the same crop
             (every position: seg is an output task only), averaged over the labelled pixels of
             the batch; IGNORE_LABEL (255) and any label >= num_classes are skipped.

The loss is the sum of the task losses (MultiMAE's default, no task weighting).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lemumo_jax.data.schema import IGNORE_LABEL

EPS = 1e-6


def normalize_patches(patches: jax.Array, eps: float = EPS) -> jax.Array:
  """[..., D] -> each patch standardised over its D values (population variance)."""
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.var(patches, axis=-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + eps)


def standardize_views(patches: jax.Array, eps: float = EPS) -> jax.Array:
  """[N, n, D] -> each view standardised over all of its n * D values."""
  mean = jnp.mean(patches, axis=(1, 2), keepdims=True)
  var = jnp.var(patches, axis=(1, 2), keepdims=True)
  return (patches - mean) / jnp.sqrt(var + eps)


def masked_patch_mean(per_patch: jax.Array, mask: jax.Array) -> jax.Array:
  """per_patch [N, n], mask [N, n] (True = masked) -> mean over views of each view's mean over
  its masked patches (a view without masked patches contributes 0)."""
  mask = mask.astype(jnp.float32)
  per_view = jnp.sum(per_patch * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  return jnp.mean(per_view)


def rgb_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """pred, target [N, n, p*p*3] (target: the view's pixels), mask [N, n] -> masked MSE."""
  per_patch = jnp.mean(jnp.square(pred - normalize_patches(target)), axis=-1)
  return masked_patch_mean(per_patch, mask)


def companion_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """pred, target [N, n, p*p*C] (target: the view's companion map), mask [N, n] -> masked L1."""
  per_patch = jnp.mean(jnp.abs(pred - standardize_views(target)), axis=-1)
  return masked_patch_mean(per_patch, mask)


def seg_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """logits [N, H, W, C], labels [N, H, W] int -> mean CE over the labelled pixels."""
  labels = labels.astype(jnp.int32)
  valid = (labels != IGNORE_LABEL) & (labels >= 0) & (labels < logits.shape[-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       jnp.where(valid, labels, 0))
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def mae_loss(outputs: dict[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MaeModel outputs -> (loss, metrics: the task losses and the masked fractions)."""
  metrics = {
      'recon_rgb': rgb_loss(outputs['rgb_pred'], outputs['rgb_target'], outputs['rgb_mask']),
      'recon_companion': companion_loss(outputs['companion_pred'], outputs['companion_target'],
                                        outputs['companion_mask']),
  }
  if 'seg_logits' in outputs:
    metrics['seg_ce'] = seg_loss(outputs['seg_logits'], outputs['seg_labels'])
  loss = sum(metrics.values())
  metrics['masked_rgb'] = jnp.mean(outputs['rgb_mask'].astype(jnp.float32))
  metrics['masked_companion'] = jnp.mean(outputs['companion_mask'].astype(jnp.float32))
  return loss, dict(metrics, loss=loss)


def build_objective(config):
  """objective(key, outputs) -> (loss, metrics) for the MultiMAE rows; checks the row's pieces
  go together (objective 'mae' with model family 'multimae', no local crops)."""
  if (config.objective.name == 'mae') != (config.model.family == 'multimae'):
    raise ValueError(f"config.objective.name={config.objective.name!r} with config.model.family="
                     f"{config.model.family!r}: objective 'mae' and family 'multimae' (the "
                     f"MultiMAE rows) go together")
  if config.views.num_local:
    raise ValueError(f'config.views.num_local={config.views.num_local}: MultiMAE disables local '
                     f'crops (S1: the decoder expects the fixed global patch grid); set '
                     f'config.views.num_local=0')
  if tuple(config.objective.passes) != ('joint',):
    raise ValueError(f"config.objective.passes={list(config.objective.passes)}: the "
                     f"single-modality passes are a SIGReg ablation (S3); use ('joint',) with "
                     f"objective.name='mae'")

  def objective(key, outputs):
    del key  # deterministic given the outputs (the masks are drawn by the model)
    return mae_loss(outputs)

  return objective
