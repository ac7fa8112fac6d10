"""Fusion-token routing (paper section 3.3, DESIGN.md section 2) as pure functions.

Token order everywhere: [CLS(1), F(n), C(n), M(n)], T = 1 + 3n, where F_i, C_i and M_i sit at
the same spatial position i. A mask entry [q, k] = True means query q may attend to key k.

| layer            | query    | may attend to                      |
|------------------|----------|------------------------------------|
| 0 (both modes)   | F_i      | CLS, F_i, C_i, M_i                 |
| >= 1 persistent  | F_i      | CLS, all F, C_i, M_i               |
| >= 1 pruned      | -        | no mask over the 1 + n kept tokens |
| any              | CLS, C, M| every token (the paper leaves them unrestricted) |

`structured_layer0_attention` computes the pruned layer 0 without the [T, T] mask: only the
1 + n kept queries (CLS, F) are formed, and F_i's softmax runs over its 4 keys directly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FUSION_MODES = ('pruned', 'persistent')


def num_tokens(n: int) -> int:
  """T = 1 + 3n for n patch positions."""
  return 1 + 3 * n


def _check_n(n: int) -> None:
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f'number of patch positions n must be a positive int, got {n!r}')


def layer0_mask(n: int) -> np.ndarray:
  """bool [T, T]: F_i sees only {CLS, F_i, C_i, M_i}; CLS, C and M rows see every token."""
  _check_n(n)
  mask = np.ones((num_tokens(n), num_tokens(n)), bool)
  i = np.arange(n)
  fusion_rows = 1 + i
  mask[fusion_rows] = False
  mask[fusion_rows, 0] = True
  mask[fusion_rows, 1 + i] = True
  mask[fusion_rows, 1 + n + i] = True
  mask[fusion_rows, 1 + 2 * n + i] = True
  return mask


def persistent_mask(n: int) -> np.ndarray:
  """bool [T, T] for layers >= 1 in persistent mode: F_i sees CLS, every F, C_i and M_i."""
  mask = layer0_mask(n)
  mask[1:1 + n, 1:1 + n] = True
  return mask


def attention_mask(n: int, layer: int, mode: str) -> np.ndarray | None:
  """The mask of `layer` in fusion `mode`; None where attention is unmasked (pruned, layer >= 1,
  whose sequence is only the 1 + n kept tokens)."""
  if mode not in FUSION_MODES:
    raise ValueError(f'fusion_mode must be one of {list(FUSION_MODES)}, got {mode!r}')
  if layer < 0:
    raise ValueError(f'layer must be >= 0, got {layer}')
  if layer == 0:
    return layer0_mask(n)
  return persistent_mask(n) if mode == 'persistent' else None


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, L, D] -> [B, L, H, D / H]."""
  return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def structured_layer0_attention(x: jax.Array, qkv_kernel: jax.Array, qkv_bias: jax.Array, *,
                                n: int, num_heads: int, dtype: Any = jnp.float32,
                                attention=jax.nn.dot_product_attention) -> jax.Array:
  """Layer-0 attention outputs of the kept queries (CLS, F) under `layer0_mask(n)`.

  Args:
    x: normed tokens [B, T, D], T = 1 + 3n, order [CLS, F, C, M].
    qkv_kernel: [D, 3D], columns [Q | K | V] (the 'qkv' Dense kernel); qkv_bias: [3D].
    n: patch positions; num_heads: H (D divisible by H); dtype: compute dtype.
    attention: (q, k, v) -> out, the dense attention CLS's query runs through
      (jax.nn.dot_product_attention's signature; vit.dot_product_attention picks the kernel).

  Returns:
    [B, 1 + n, D]: heads merged, before the out-projection. Row 0 is CLS, rows 1.. are F.

  Cost: Q for the 1 + n kept tokens and K/V for all T (the 2n modality tokens' queries would
  be dropped after layer 0), CLS's dense softmax over T keys, and for each F_i a 4-way
  softmax from elementwise products with its 4 keys: O(n * D), no [n, T] logits.
  """
  batch, tokens, width = x.shape
  if tokens != num_tokens(n):
    raise ValueError(f'x has {tokens} tokens but n={n} needs 1 + 3n = {num_tokens(n)}')
  if qkv_kernel.shape != (width, 3 * width) or qkv_bias.shape != (3 * width,):
    raise ValueError(f'qkv kernel/bias shapes {qkv_kernel.shape}/{qkv_bias.shape} do not fit '
                     f'width {width}: expected ({width}, {3 * width})/({3 * width},)')
  if width % num_heads:
    raise ValueError(f'width {width} is not divisible by num_heads {num_heads}')
  x = x.astype(dtype)
  kernel = qkv_kernel.astype(dtype)
  bias = qkv_bias.astype(dtype)

  q_kept = _split_heads(jnp.dot(x[:, :1 + n], kernel[:, :width]) + bias[:width],
                        num_heads)                                       # [B, 1+n, H, hd]
  # K/V of all T tokens in one product: CLS's attention reads them whole, no concatenation.
  kv_all = jnp.dot(x, kernel[:, width:]) + bias[width:]                  # [B, T, 2D]
  k_all, v_all = (_split_heads(a, num_heads) for a in jnp.split(kv_all, 2, axis=-1))
  k_kept, k_mod = k_all[:, :1 + n], k_all[:, 1 + n:]
  v_kept, v_mod = v_all[:, :1 + n], v_all[:, 1 + n:]

  # CLS: one query over all T keys, the ordinary dense attention.
  cls_out = attention(q_kept[:, :1], k_all, v_all)                      # [B, 1, H, hd]

  # F_i: keys CLS, F_i, C_i, M_i. C_i / M_i sit at offset i of their blocks, so the "gather"
  # is a slice; logits are per-position dot products. float32 logits and softmax as in
  # jax.nn.dot_product_attention, so both layer-0 implementations round alike.
  q_fus = q_kept[:, 1:]
  head_dim = width // num_heads
  keys = (jnp.broadcast_to(k_kept[:, :1], q_fus.shape), k_kept[:, 1:], k_mod[:, :n], k_mod[:, n:])
  values = (jnp.broadcast_to(v_kept[:, :1], q_fus.shape), v_kept[:, 1:], v_mod[:, :n],
            v_mod[:, n:])
  logits = jnp.stack([jnp.einsum('bnhd,bnhd->bnh', q_fus, k, preferred_element_type=jnp.float32)
                      for k in keys], axis=-1)                           # [B, n, H, 4]
  logits = logits * np.float32(1.0 / np.sqrt(head_dim))
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v_kept.dtype)
  fus_out = sum(probs[..., j, None] * v for j, v in enumerate(values))  # [B, n, H, hd]

  out = jnp.concatenate([cls_out, fus_out], axis=1)
  return out.reshape(batch, 1 + n, width)
