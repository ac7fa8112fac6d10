"""What the probe and fine-tune stages share: both train heads (tasks/heads.py) on an encoder's
patch grid of the clean probe view (probe.image_size) and validate them with the same targets,
metrics and report; the probe stage freezes the encoder, fine-tuning trains it with a decoder.

`check` and `views` check a stage's settings and build the views: the probe geometry, the
per-frame targets (ProbeFrame), the heads' spec, the step count and the mesh; `fit` trains with
validation, keep-best and early stopping; `validate` runs one validation pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


def stale_validations(step: int, best_step: int | None, val_every: int) -> int:
  """Validations (at multiples of val_every) after the best one, up to and including step."""
  if best_step is None or step <= best_step:
    return 0
  return step // val_every - best_step // val_every


@dataclasses.dataclass
class Fitted:
  best_state: Any                     # the state with the best validation's params
  best: dict[str, Any]                # {'step', 'metrics'} of the best validation
  best_params_dir: str
  history: list[tuple[int, float]]    # (logged step, train loss)
  val_history: list[tuple[int, float]]  # (validated step, val loss) of this run
  stopped_at: int | None              # the step of an early stop, or None


def fit(stage_dir: str, state, *, step_fn: Callable[[Any, Any], tuple[Any, Any]],
        loader_fn: Callable[[int], Iterable[Any]], start_step: int, total_steps: int,
        checkpoints: loop.Checkpoints, writer, on_log: Callable[[int, dict, float], None],
        evaluate: Callable[[Any], dict[str, Any]], log_every: int, val_every: int,
        select_by: str = 'loss', patience: int = 0) -> Fitted:
  """The probe and fine-tune stages' training: loop.train with a validation every val_every
  steps (and at the last) whose best (select_by) is kept in <stage_dir>/best (loop.KeepBest),
  stopping early after `patience` validations without a new best (0: never).

  loader_fn(start_step) gives the train batches; evaluate(state) one validation's metrics.
  Returns the best state restored (a finished run resumed without best/ validates its final
  state first).
  """
  keep = loop.KeepBest(stage_dir, select_by)
  what = checkpoints.what

  def stale(at_step):
    return stale_validations(at_step, keep.step, val_every)

  stopped = patience > 0 and stale(start_step) >= patience
  if stopped:
    print(f'{what[0].upper()}{what[1:]} stopped early at step {start_step} in an earlier run '
          f'({patience} validations without a new best {select_by})', flush=True)
  val_history = []

  def on_validate(step, state):
    values = evaluate(state)
    val_history.append((step, values['loss']))
    writer.write_scalars(step, {f'val/{k}': v for k, v in values.items() if np.isfinite(v)})
    improved = keep.is_better(values)
    if improved:
      keep.save(step, state, values)
    note = ('  [best]' if improved else
            f'  ({stale(step)}/{patience} without a new best)' if patience else '')
    print(f'val @ {step}: {fmt_val(values)}{note}', flush=True)
    if patience and stale(step) >= patience:
      print(f'Early stop at step {step}: {patience} validations without a new best '
            f'{select_by} (best at step {keep.step})', flush=True)
      return True
    return False

  try:
    result = loop.train(
        state, step_fn, () if stopped else loader_fn(start_step), start_step=start_step,
        total_steps=total_steps, log_every=log_every, checkpoints=checkpoints, on_log=on_log,
        writer=writer, val_every=val_every, on_validate=on_validate, stopped=stopped)
  finally:
    writer.flush()
  if keep.best is None:  # a finished run resumed with best/ deleted: validate the final state
    keep.save(result.step, result.state, evaluate(result.state))
  best_state = keep.restore(result.state)
  stopped_at = result.step if result.stopped and result.step < total_steps else None
  return Fitted(best_state, keep.best, keep.params_dir, result.history, val_history,
                stopped_at)


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


def write_train_scalars(writer, step: int, scalars: dict[str, float]) -> None:
  """A logged train step of the probe / fine-tune loops as train/<name> scalars (the loop's
  ReportProgress writes steps_per_sec)."""
  writer.write_scalars(step, {f'train/{k}': v for k, v in scalars.items()})
