"""Heads on top of encoder features. The SSL projector lives here; probe heads follow."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's default Linear weight init (kaiming-uniform, a=sqrt(5)) = U(+-1/sqrt(fan_in)),
# which the LeJEPA reference projector trains with; biases start at zero.
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class Projector(nn.Module):
  """LeJEPA projector g: x [B, D] -> z [B, out_dim].

  num_hidden_layers x (Dense(hidden_dim) -> BatchNorm -> ReLU), then Dense(out_dim) without BN
  (the reference's minimal example is 2048, 2048, proj_dim). BatchNorm normalises with the
  batch's statistics when `train` (and updates the 'batch_stats' running averages with
  momentum 0.9, eps 1e-5), with the running averages otherwise. Computes in float32.
  """
  hidden_dim: int = 2048
  num_hidden_layers: int = 2
  out_dim: int = 16

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if x.ndim != 2:
      raise ValueError(f'Projector expects [B, D] features, got shape {x.shape}')
    if self.num_hidden_layers < 0:
      raise ValueError(f'num_hidden_layers must be >= 0, got {self.num_hidden_layers}')
    x = x.astype(jnp.float32)
    for i in range(self.num_hidden_layers):
      # No bias before BatchNorm: BN removes it, so it would only be a zero-gradient parameter.
      x = nn.Dense(self.hidden_dim, use_bias=False, kernel_init=torch_linear_init,
                   name=f'dense_{i}')(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       name=f'bn_{i}')(x)
      x = nn.relu(x)
    return nn.Dense(self.out_dim, kernel_init=torch_linear_init,
                    name=f'dense_{self.num_hidden_layers}')(x)
