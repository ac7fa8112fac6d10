"""End-to-end fine-tuning (mode=finetune; paper S1 "End-to-end FLIR fine-tuning").

An exported encoder (config.finetune.encoder_dir, e.g. a Waymo run's) and a detection decoder
(models/decoder.py: 3 x 3x3 Conv(512) layers, the last the CenterNet adapter, then the 2D
CenterNet head) train together; unlike the probe stage the encoder's params are updated.
Schedule (S1): AdamW, weight decay 0.05, encoder lr 2e-5 and decoder lr 2e-4
(optax.multi_transform), each warmed up linearly over the first 5% of the steps from 1% of
its lr, then cosine-decayed to 1e-7. Train views are random-resized crops, area scale
[0.8, 1.0], of the frame (data/finetune_views.py; boxes follow the crop); validation runs
every finetune.val_every steps on the clean probe view (probe.image_size) with the probe
stage's targets, losses, evaluator and report. The best validation (finetune.select_by) is
kept, and training stops early after finetune.patience validations without a new best.

Files under <workdir>/finetune: config.json (what a resumed run must match), checkpoints/
(Orbax, resumable), best/ (the best validation's encoder + decoder params and metrics,
loop.KeepBest), tensorboard/, report.md, report.json, probe_outputs.png.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lemumo_jax.data import augment, finetune_views, pipeline, sources
from lemumo_jax.evaluation import report
from lemumo_jax.models import decoder
from lemumo_jax.tasks import heads as heads_lib
from lemumo_jax.training import downstream, loop, pretrained, probe, progress
from lemumo_jax.training import state as state_lib

GROUPS = ('encoder', 'head')   # param groups, each with its own learning rate
SELECT_BY = ('loss', 'mAP50')  # lowest loss, highest mAP50
# Changing these between a run and its resumption changes nothing that was computed.
RESUMABLE = ('finetune.log_every', 'finetune.checkpoint_every', 'finetune.patience')


# -------------------------------------------------------------------------------- optimizer


def learning_rate_schedule(peak: float, total_steps: int,
                           ft: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from peak * warmup_init_fraction to peak over warmup_fraction of the
  steps, then cosine decay to end_lr at total_steps."""
  warmup = max(int(round(ft.warmup_fraction * total_steps)), 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=peak * ft.warmup_init_fraction, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=ft.end_lr)


def make_optimizer(ft: ml_collections.ConfigDict, total_steps: int):
  """(tx, {'encoder': schedule, 'head': schedule}) for params {'encoder': ..., 'head': ...}."""
  schedules = {group: learning_rate_schedule(ft[f'{group}_lr'], total_steps, ft)
               for group in GROUPS}
  tx = optax.multi_transform(
      {group: optax.adamw(schedules[group], b1=0.9, b2=0.999, weight_decay=ft.weight_decay,
                          mask=state_lib.decay_mask) for group in GROUPS},
      lambda params: {group: jax.tree.map(lambda _, g=group: g, params[group])
                      for group in params})
  if ft.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(ft.grad_clip), tx)
  return tx, schedules


# ------------------------------------------------------------------------------------ steps


def make_train_step(encoder, heads_module, tx, view_cfg: augment.ViewConfig,
                    schedules: dict[str, optax.Schedule]):
  """train_step(state, batch) -> (state, metrics): one AdamW step on encoder and decoder."""
  heads = tuple(heads_module.heads)

  def train_step(state, batch):
    rgb = augment.normalize(batch['rgb'].astype(jnp.float32) / 255.0, view_cfg)
    companion = batch['companion'].astype(jnp.float32)[..., None]

    def loss_fn(params):
      # train=False: the encoder sees every token (no pretraining-time token masking).
      patches = encoder.apply({'params': params['encoder']}, rgb, companion,
                              train=False).patches
      outputs, updates = heads_module.apply(
          {'params': params['head'], 'batch_stats': state.batch_stats}, patches, train=True,
          mutable=['batch_stats'])
      losses = heads_lib.probe_losses(outputs, batch, heads)
      return losses['loss'], (losses, updates.get('batch_stats', {}))

    (loss, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    new_state = state_lib.apply_gradients(state, tx, grads, loss, batch_stats)
    metrics = dict(losses, grad_norm=optax.global_norm(grads),
                   encoder_grad_norm=optax.global_norm(grads['encoder']),
                   **{f'lr_{g}': schedules[g](state.step) for g in GROUPS})
    return new_state, metrics

  return train_step


def make_eval_step(encoder, heads_module, view_cfg: augment.ViewConfig):
  """eval_step(state, batch) -> (per-example losses, predictions): the probe stage's."""
  _, probe_eval = probe.make_probe_steps(encoder, heads_module, None, view_cfg, None)

  def eval_step(state, batch):
    losses, preds, _ = probe_eval(state.replace(params=state.params['head']),
                                  state.params['encoder'], batch)
    return losses, preds

  return eval_step


# ------------------------------------------------------------------------------------- loop


def check_run_config(finetune_dir: str, config: ml_collections.ConfigDict, encoder_dir: str,
                     encoder_params) -> None:
  """Records finetune/config.json on a fresh run; a resumed one must match it (the encoder it
  started from included), except RESUMABLE."""
  loop.check_run_config(
      os.path.join(finetune_dir, 'config.json'),
      {'encoder_dir': encoder_dir,
       'encoder_fingerprint': state_lib.params_fingerprint(encoder_params),
       'model': config.model, 'seed': config.seed,
       'finetune': {k: v for k, v in config.finetune.items() if k != 'encoder_dir'},
       'probe.image_size': config.probe.image_size, 'data': config.data,
       'dataset_identity': sources.dataset_identity(config.data)},
      resumable=RESUMABLE,
      fix='use a new --workdir, or set those values back to resume it')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes encoder + decoder, keeps the best validation, writes the report.

  Returns {'metrics': the best validation's metrics, 'best_step', 'finetune_dir', 'report',
  'best_params_dir', 'stopped_early_at' (a step or None), 'history': [(step, train loss)],
  'val_history': [(step, val loss)]}.
  """
  workdir = os.path.abspath(workdir)
  ft, probe_cfg = config.finetune, config.probe
  finetune_dir = os.path.join(workdir, 'finetune')
  if ft.select_by not in SELECT_BY:
    raise ValueError(f'config.finetune.select_by must be one of {SELECT_BY}, got '
                     f'{ft.select_by!r}')
  setup = downstream.check(config, 'finetune', ('log_every', 'checkpoint_every', 'val_every',
                                                'patience'))
  metadata, heads, image_hw = setup.metadata, setup.heads, setup.image_hw
  encoder_dir = pretrained.resolve_dir(ft.encoder_dir, 'finetune.encoder_dir', workdir)
  encoder, encoder_params, model_cfg = pretrained.load_encoder(encoder_dir, config.model,
                                                               'finetune.encoder_dir',
                                                               config.method)
  check_run_config(finetune_dir, config, encoder_dir, encoder_params)
  views = downstream.views(config, 'finetune', setup, int(model_cfg['patch_size']))
  geometry, frame, mesh = views.geometry, views.frame, views.mesh
  total_steps, num_val, num_classes = views.total_steps, views.num_val, views.num_classes
  train_frame = finetune_views.CroppedProbeFrame(frame, ft.crop_scale, ft.crop_ratio)
  heads_module = decoder.DecoderHeads(
      heads=heads, num_classes_3d=num_classes['classes_3d'],
      num_classes_2d=num_classes['classes_2d'], num_seg_classes=num_classes['seg_classes'],
      seg_size=geometry.seg_hw, num_layers=ft.decoder_layers, hidden=ft.decoder_hidden,
      occupancy_hidden=probe_cfg.occupancy_hidden)

  tx, schedules = make_optimizer(ft, total_steps)
  replicated = state_lib.replicated(mesh)
  width = downstream.feature_width(encoder, encoder_params, image_hw,
                                   int(model_cfg['companion_channels']))

  def init_state(key, encoder_params):
    head = heads_module.init(key, jnp.zeros((1, *geometry.grid_hw, width)), train=False)
    return state_lib.create_train_state(
        {'params': {'encoder': encoder_params, 'head': head['params']},
         'batch_stats': head.get('batch_stats', {})}, tx)

  init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  checkpoints = loop.Checkpoints(
      finetune_dir, ft.checkpoint_every, 2, 'fine-tuning',
      'Lower config.finetune.encoder_lr / head_lr or set config.finetune.grad_clip.')
  state, start_step, state_sharding = checkpoints.restore_or_init(
      init_state, (init_key, encoder_params), replicated)
  del encoder_params  # the state holds (and trains) them

  view_cfg = augment.ViewConfig.from_config(config.views)
  data_sharding = state_lib.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(encoder, heads_module, tx, view_cfg, schedules),
                       in_shardings=(state_sharding, data_sharding),
                       out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(encoder, heads_module, view_cfg),
                      in_shardings=(state_sharding, data_sharding))
  counts = {g: sum(x.size for x in jax.tree.leaves(state.params[g])) / 1e6 for g in GROUPS}
  print(f'fine-tuning a {model_cfg["family"]} encoder ({encoder_dir}, {counts["encoder"]:.2f}M '
        f'params) + a {ft.decoder_layers}-layer decoder and heads {list(heads)} '
        f'({counts["head"]:.2f}M): {total_steps} steps of batch {ft.batch_size}, lr '
        f'{ft.encoder_lr:g} / {ft.head_lr:g}, crops of scale {tuple(ft.crop_scale)} -> '
        f'{image_hw[0]}x{image_hw[1]}; validation on {num_val} clean views every '
        f'{ft.val_every} steps, patience {ft.patience}', flush=True)

  def evaluate(eval_state, num_figure_frames=0):
    return downstream.validate(
        heads_lib.ProbeEvaluator(heads, views.spec, probe_cfg, num_figure_frames),
        pipeline.probe_eval_loader(config.data, frame, ft.batch_size), mesh,
        lambda batch: eval_step(eval_state, batch))

  writer = progress.metric_writer(finetune_dir)

  def on_log(step, scalars, rate):
    downstream.write_train_scalars(writer, step, scalars)
    print(f'finetune step {step}/{total_steps} | loss {scalars["loss"]:.4f} '
          f'({progress.loss_terms(scalars, heads)}) | lr {scalars["lr_encoder"]:.2e}'
          f' / {scalars["lr_head"]:.2e} | {rate:.2f} steps/s, '
          f'{rate * ft.batch_size:.1f} samples/s | ETA {progress.eta(total_steps - step, rate)}',
          flush=True)

  fitted = downstream.fit(
      finetune_dir, state, step_fn=lambda s, b: train_step(s, state_lib.global_batch(mesh, b)),
      loader_fn=lambda first_step: pipeline.probe_train_loader(
          config.data, train_frame, ft.batch_size, seed=config.seed + 2,
          start_step=first_step, num_steps=total_steps),
      start_step=start_step, total_steps=total_steps, checkpoints=checkpoints, writer=writer,
      on_log=on_log, evaluate=lambda s: evaluate(s)[0], log_every=ft.log_every,
      val_every=ft.val_every, select_by=ft.select_by, patience=ft.patience)
  best, stopped_at = fitted.best, fitted.stopped_at
  values, figure_frames = evaluate(fitted.best_state, probe_cfg.num_figure_frames)
  row = report.ReportRow(
      method=f'{config.method} fine-tuned',
      training_data=downstream.training_data_label(model_cfg, metadata.get('companion', 'depth')),
      metrics=values)
  paths = report.write_report(
      finetune_dir, row, details={
          'encoder': f'fine-tuned from {encoder_dir}', 'best_step': best['step'],
          'total_steps': total_steps, 'stopped_early_at': stopped_at,
          'select_by': ft.select_by, 'heads': list(heads),
          'decoder': f'{ft.decoder_layers} layers x {ft.decoder_hidden}',
          'lr': {'encoder': ft.encoder_lr, 'head': ft.head_lr},
          'train_crop_scale': list(ft.crop_scale), 'eval_view': list(image_hw),
          'patch_grid': list(geometry.grid_hw),
          'dataset': metadata.get('dataset', config.data.name), 'val_frames': num_val},
      figure_frames=figure_frames, metadata=metadata, image_hw=image_hw,
      title='End-to-end fine-tuning')
  print(report.markdown_table([row]), flush=True)
  print(f'Fine-tuning report: {paths["markdown"]} (figure {paths.get("figure", "none")})',
        flush=True)
  return {'metrics': values, 'best_step': best['step'], 'finetune_dir': finetune_dir,
          'report': paths['markdown'], 'best_params_dir': fitted.best_params_dir,
          'stopped_early_at': stopped_at, 'history': fitted.history,
          'val_history': fitted.val_history}
