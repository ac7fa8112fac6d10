"""DINO + iBOT losses of the DINOv3-style RGB baseline (paper S1; models/dino.py).

With student logits s (prototype cosines), teacher logits t, centre c, temperatures
tau_s = 0.1 and tau_t = 0.04 (S1; teacher warm-up start = 0.04 with zero warm-up epochs, so
tau_t is constant):

  P_t = softmax((t - c) / tau_t)          (teacher: centred and sharpened; no gradient)
  CE(P_t, s) = -sum_k P_t[k] * log_softmax(s / tau_s)[k]

DINO (cross-view): the teacher sees the Vg global views, the student all Vg + Vl views;
  L_dino = mean over the pairs (teacher view i, student view v), v != i, of mean_b CE
(DINO's DINOLoss: same-view global pairs are skipped; Vg * (Vg + Vl - 1) pairs).
iBOT (masked patches, global views only; the teacher saw them unmasked):
  L_ibot = mean over views v and samples b of
           sum_n m[v,b,n] CE(P_t[v,b,n], s[v,b,n]) / max(1, sum_n m[v,b,n])
(iBOT / DINOv2: the per-image mean over its masked patches; unmasked images count as 0).
  L = L_dino + ibot_weight * L_ibot,  ibot_weight = 1 (iBOT's lambda, DINOv2's loss_weight).

Centring with an EMA centre (momentum 0.9, S1) as in DINO and iBOT, not DINOv2/v3's
Sinkhorn-Knopp; no KoLeo term and no Gram anchoring (S1 lists neither).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def teacher_probs(logits: jax.Array, centre: jax.Array, temperature: float) -> jax.Array:
  """Centred, sharpened teacher distribution: logits [..., K], centre [K] -> [..., K]."""
  return jax.nn.softmax((logits.astype(jnp.float32) - centre) / temperature, axis=-1)


def cross_entropy(probs: jax.Array, student_logits: jax.Array, temperature: float) -> jax.Array:
  """-sum_k probs * log_softmax(student_logits / temperature) over the last axis."""
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.sum(probs * log_p, axis=-1)


def dino_loss(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
  """student [Vs, B, K] logits (the Vg global views first), teacher [Vg, B, K] probabilities
  -> the mean over cross-view pairs of the batch-mean cross entropy."""
  num_teacher, num_student = teacher.shape[0], student.shape[0]
  if num_student < num_teacher or num_student < 2:
    raise ValueError(f'dino_loss: student views {student.shape} must hold the {num_teacher} '
                     f'teacher (global) views first and at least 2 views in all')
  # ce[i, v] = mean_b CE(teacher view i, student view v).
  ce = jnp.mean(cross_entropy(teacher[:, None], student[None], temperature), axis=-1)
  same_view = jnp.eye(num_teacher, num_student, dtype=bool)
  return jnp.sum(jnp.where(same_view, 0.0, ce)) / (num_teacher * num_student - num_teacher)


def ibot_loss(student: jax.Array, teacher: jax.Array, masks: jax.Array,
              temperature: float) -> jax.Array:
  """student [Vg, B, N, K] logits, teacher [Vg, B, N, K] probabilities, masks bool
  [Vg, B, N] -> mean over images of the mean cross entropy over their masked patches."""
  ce = cross_entropy(teacher, student, temperature)                  # [Vg, B, N]
  m = masks.astype(jnp.float32)
  return jnp.mean(jnp.sum(ce * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0))


def dino_objective(outputs: dict[str, Any], *, student_temp: float = 0.1,
                   teacher_temp: float = 0.04, ibot_weight: float = 1.0,
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DinoModel student outputs with its teacher's under 'teacher' -> (loss, metrics)."""
  teacher = outputs['teacher']
  p_cls = teacher_probs(teacher['dino_global'], teacher['dino_centre'], teacher_temp)
  p_patch = teacher_probs(teacher['ibot'], teacher['ibot_centre'], teacher_temp)
  student = outputs['dino_global']
  if outputs.get('dino_local') is not None:
    student = jnp.concatenate([student, outputs['dino_local']], axis=0)
  dino = dino_loss(student, p_cls, student_temp)
  ibot = ibot_loss(outputs['ibot'], p_patch, outputs['masks'], student_temp)
  loss = dino + ibot_weight * ibot
  entropy = -jnp.sum(p_cls * jnp.log(jnp.maximum(p_cls, 1e-30)), axis=-1)
  metrics = {'loss': loss, 'dino': dino, 'ibot': ibot,
             'teacher_entropy': jnp.mean(entropy),
             'mask_fraction': jnp.mean(outputs['masks'].astype(jnp.float32))}
  return loss, metrics


def teacher_momentum(step: jax.Array, total_steps: int, base: float = 0.996,
                     final: float = 1.0) -> jax.Array:
  """DINO's cosine schedule of the teacher EMA momentum: base at step 0 -> final at the end
  (constant when final == base)."""
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(total_steps), 1), 0.0, 1.0)
  return final - (final - base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0
