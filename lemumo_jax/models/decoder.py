"""The detection decoder of end-to-end fine-tuning (S1: "a 3-layer decoder with hidden width
512" on the 2D CenterNet path).

The probe heads (probes.py) read the patch grid through one 3x3 Conv + BN + ReLU adapter. The
decoder deepens that readout: num_layers - 1 more 3x3 Conv(hidden) + BN + ReLU layers over the
patch grid, then the probe heads at hidden width, whose adapter is the decoder's last layer.
CenterNet2D then upsamples 2x and predicts heatmap, offset and box size with 1x1 convs. With
num_layers = 1 this is exactly the probe head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lemumo_jax.tasks import heads as heads_lib


class DecoderHeads(nn.Module):
  """patches [B, h, w, D] -> the outputs of tasks.heads.ProbeHeads for `heads`."""
  heads: tuple[str, ...]
  num_classes_3d: int
  num_classes_2d: int
  num_seg_classes: int
  seg_size: tuple[int, int]
  num_layers: int = 3
  hidden: int = 512
  occupancy_hidden: int = 64

  @nn.compact
  def __call__(self, patches: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    if self.num_layers < 1:
      raise ValueError(f'config.finetune.decoder_layers={self.num_layers}: need at least 1 '
                       f'(the CenterNet adapter)')
    x = patches.astype(jnp.float32)
    for i in range(self.num_layers - 1):
      x = nn.Conv(self.hidden, (3, 3), padding='SAME', name=f'decoder{i}')(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                               name=f'decoder{i}_bn')(x))
    return heads_lib.ProbeHeads(
        heads=tuple(self.heads), num_classes_3d=self.num_classes_3d,
        num_classes_2d=self.num_classes_2d, num_seg_classes=self.num_seg_classes,
        seg_size=tuple(self.seg_size), centernet_hidden=self.hidden,
        occupancy_hidden=self.occupancy_hidden, name='heads')(x, train=train)
