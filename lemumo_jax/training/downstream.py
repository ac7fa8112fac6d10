"""What the probe and fine-tune stages share: both train heads (tasks/heads.py) on an encoder's
patch grid of the clean probe view (probe.image_size) and validate them with the same targets,
metrics and report; the probe stage freezes the encoder, fine-tuning trains it with a decoder.

`prepare` checks a stage's settings and builds the views: the probe geometry, the per-frame
targets (ProbeFrame), the heads' spec, the step count and the mesh; `validate` runs one pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils

from lemumo_jax.data import pipeline, sources
from lemumo_jax.tasks import heads as heads_lib
from lemumo_jax.training import loop
from lemumo_jax.training import state as state_lib


@dataclasses.dataclass(frozen=True)
class Setup:
  """A downstream stage's checked settings and views."""
  metadata: dict[str, Any]
  heads: tuple[str, ...]
  image_hw: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Views:
  geometry: pipeline.ProbeGeometry
  frame: pipeline.ProbeFrame          # record -> the clean view and every head's targets
  spec: heads_lib.Spec
  num_classes: dict[str, int]         # classes_3d, classes_2d, seg_classes
  total_steps: int
  num_val: int
  mesh: Any


def check(config: ml_collections.ConfigDict, section: str, periods: tuple[str, ...]) -> Setup:
  """config.<section>'s schedule, the view sizes and heads, before anything is loaded."""
  cfg = config[section]
  loop.check_schedule(cfg, section, periods)
  loop.check_pair(config.data.image_size, 'data.image_size')
  image_hw = loop.check_pair(config.probe.image_size, 'probe.image_size')
  loop.check_pair(config.probe.seg_size, 'probe.seg_size')
  metadata = sources.dataset_metadata(config.data)
  heads = tuple(cfg.heads)
  check_heads(heads, metadata, config.data.data_dir, f'{section}.heads')
  return Setup(metadata, heads, image_hw)


def views(config: ml_collections.ConfigDict, section: str, setup: Setup,
          patch_size: int) -> Views:
  """The probe views of an encoder with `patch_size`, the step count of config.<section> and
  the mesh (its batch must divide over the devices)."""
  cfg, probe_cfg, metadata = config[section], config.probe, setup.metadata
  geometry = pipeline.ProbeGeometry.create(setup.image_hw, patch_size, probe_cfg.seg_size)
  num_classes = {k: len(metadata.get(k, ())) for k in ('classes_3d', 'classes_2d', 'seg_classes')}
  frame = pipeline.ProbeFrame(geometry, setup.heads, num_classes['classes_3d'],
                              num_classes['classes_2d'], probe_cfg.max_objects,
                              probe_cfg.max_gt_boxes)
  spec = heads_lib.Spec.create(geometry, metadata, probe_cfg.max_objects, probe_cfg.max_gt_boxes)
  num_train = int(metadata['splits']['train'])
  total_steps = (int(cfg.num_steps) if cfg.num_steps > 0 else
                 cfg.num_epochs * pipeline.steps_per_epoch(num_train, cfg.batch_size))
  mesh = state_lib.make_mesh()
  if cfg.batch_size % mesh.size:
    raise ValueError(f'config.{section}.batch_size={cfg.batch_size} is not divisible by the '
                     f'{mesh.size} devices of the mesh')
  return Views(geometry, frame, spec, num_classes, total_steps,
               int(metadata['splits']['val']), mesh)


def feature_width(encoder, encoder_params, image_hw: tuple[int, int],
                  companion_channels: int) -> int:
  """The channels of the encoder's patch grid (late fusion concatenates two branches)."""
  return jax.eval_shape(
      lambda p: encoder.apply({'params': p}, jnp.zeros((1, *image_hw, 3)),
                              jnp.zeros((1, *image_hw, companion_channels)),
                              train=False).patches, encoder_params).shape[-1]


def validate(evaluator: heads_lib.ProbeEvaluator, batches: Iterable[dict[str, Any]], mesh,
             eval_fn: Callable[[dict[str, jax.Array]], tuple[Any, Any]]):
  """One validation pass: eval_fn(global batch) -> (per-example losses, predictions), read
  back to the host into the evaluator; returns (metrics, figure frames)."""
  for host_batch in batches:
    batch = state_lib.global_batch(mesh, host_batch)
    losses, preds = eval_fn(batch)
    evaluator.update(*to_host((losses, preds, {k: v for k, v in batch.items()
                                                if k != 'patches'})))
  return evaluator.result(), evaluator.figure_frames


def check_heads(heads: tuple[str, ...], metadata: dict[str, Any], data_dir: str,
                config_key: str = 'probe.heads') -> None:
  loop.check_names(heads, config_key, heads_lib.HEADS)
  for head in heads:
    key = heads_lib.get(head).needs
    if key and not metadata.get(key):
      raise ValueError(f'probe head {head!r} needs {key} in the dataset metadata '
                       f'({data_dir or "synthetic"}), which has none; drop it from '
                       f'config.{config_key}')


def training_data_label(model_cfg, companion: str) -> str:
  """The paper's "Training Data" column: modalities the encoder saw (None: no encoder)."""
  if model_cfg is None:
    return 'none'
  other = {'depth': 'Depth', 'thermal': 'Thermal'}.get(companion, companion)
  if model_cfg['family'] == 'vit':
    return 'RGB' if model_cfg['inputs'] == 'rgb' else other
  return f'RGB+{other}'


def to_host(tree):
  """Global arrays -> numpy on this host (all hosts' rows on multi-host runs)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def fmt_val(values: dict[str, Any]) -> str:
  parts = [f'loss {values["loss"]:.4f}']
  for key, label, scale, digits in (('mAP_XY', 'mAP XY', 100, 1), ('depth_MAE', 'Depth MAE', 1, 3),
                                    ('mAP_XZ', 'mAP XZ', 100, 1), ('seg_mIoU', 'mIoU', 1, 3),
                                    ('mAP50', 'mAP50', 100, 2), ('occupancy_IoU', 'occ IoU', 1, 3)):
    if key in values:
      parts.append(f'{label} {values[key] * scale:.{digits}f}')
  return ', '.join(parts)


def write_train_scalars(writer, step: int, scalars: dict[str, float], rate: float) -> None:
  """A logged train step of the probe / fine-tune loops as train/<name> scalars, with
  train/steps_per_sec."""
  writer.write_scalars(step, {f'train/{k}': v for k, v in scalars.items()}
                       | {'train/steps_per_sec': rate})
