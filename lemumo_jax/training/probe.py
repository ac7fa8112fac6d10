"""The frozen-patch-probe stage (paper section 4.1 and S3): every head trained at once.

The encoder exported by pretraining (or, for Table 1's "encoder frozen" rows, the same
architecture at its random initialisation; or, with probe.encoder='raw', no encoder at all: the
view's own pixels cut into the patch grid, encoders.InputPatches) is frozen; its patch grid feeds
the probe heads (models/probes.py). Inputs are deterministic clean views (probe.image_size, no
crop, flip or colour). The heads train with AdamW for probe.num_epochs, are validated on the
full val split every probe.val_every steps, and the validation with the lowest total probe loss
is kept: its params are saved and its metrics are the reported numbers.

Each head's targets, loss, predictions and metric are in tasks/heads.py.

The report also carries `patch_variance/{frame,position,local}`: the final validation pass
splits the frozen grid's variance into what every token of a frame shares, what depends on the
grid position only, and the local rest (metrics.FeatureVariance), which tells why a detector
can or cannot read objects off an encoder.

Robustness rows (beyond the paper, config.probe.robustness): the kept heads are validated once
more per condition with the companion perturbed (zeroed, shifted, LiDAR returns dropped;
evaluation/robustness.py), on rendered frames through the encoder even with the cache; the
report gets a row and report.json a `robustness` entry per condition (null where n/a).

The encoder is frozen and the probe views are deterministic, so every epoch renders the same
frames and computes the same patch grids. With probe.cache_features the stage runs the encoder
once over the train and val splits and keeps the grids with the targets on the host
(feature_cache.FeatureCache); training then draws the same frames per step as the uncached
loader (pipeline.training_positions), so the numbers are the uncached run's, at the cost of the
probe heads alone per step. The cache refuses to start, before anything is written, when its size
would exceed probe.cache_max_gib per host.

Files under <workdir>/probe (probe_random for the random-encoder control, probe_raw for the raw
input patches): checkpoints/ (Orbax, resumable like pretraining), best/ (the best validation's
params and metrics, loop.KeepBest), tensorboard/, report.md, report.json, probe_outputs.png.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lemumo_jax.data import augment, pipeline, sources
from lemumo_jax.evaluation import metrics, report, robustness
from lemumo_jax.models import encoders
from lemumo_jax.tasks import heads as heads_lib
from lemumo_jax.training import downstream, feature_cache, loop, pretrained, progress
from lemumo_jax.training import state as state_lib

# ----------------------------------------------------------------------------------- set-up


# config.probe.encoder -> (the probe stage's directory under the workdir, the report row's suffix)
ENCODERS = {'pretrained': ('probe', ''), 'random': ('probe_random', ' encoder frozen'),
            'raw': ('probe_raw', ' raw input patches')}


def probe_dirname(probe_cfg: ml_collections.ConfigDict) -> str:
  if probe_cfg.encoder not in ENCODERS:
    raise ValueError(f"config.probe.encoder must be 'pretrained', 'random' or 'raw', got "
                     f'{probe_cfg.encoder!r}')
  return ENCODERS[probe_cfg.encoder][0]


def _load_encoder(config: ml_collections.ConfigDict, workdir: str, image_hw):
  """(module, params, model cfg, description) of the frozen encoder."""
  if config.probe.encoder == 'pretrained':
    directory = pretrained.resolve_dir(config.probe.encoder_dir, 'probe.encoder_dir', workdir)
    module, params, model_cfg = pretrained.load_encoder(directory, config.model,
                                                        'probe.encoder_dir', config.method)
    return module, params, model_cfg, f'pretrained ({directory})'
  if config.probe.encoder == 'raw':
    module = encoders.InputPatches(int(config.model.patch_size),
                                   int(config.model.companion_channels))
    return module, {}, config.model, 'none: raw input patches (RGB, companion, has-a-return)'
  module = encoders.build_encoder(config.model)
  channels = config.model.companion_channels
  params = jax.jit(lambda key: module.init(
      key, jnp.zeros((1, *image_hw, 3)), jnp.zeros((1, *image_hw, channels)),
      train=False)['params'])(jax.random.PRNGKey(config.seed))
  return module, params, config.model, f'random init (seed {config.seed}), frozen'


def frozen_features_fn(encoder, view_cfg: augment.ViewConfig):
  """features(encoder_params, batch) -> the frozen patch grid [B, h, w, D] of the clean view's
  'rgb' (uint8) and 'companion' (the probe stage's and mode=analyze's readout); a batch from the
  FeatureCache brings its grid as 'patches'."""
  def features(encoder_params, batch):
    if 'patches' in batch:
      return batch['patches']
    rgb = augment.normalize(batch['rgb'].astype(jnp.float32) / 255.0, view_cfg)
    companion = batch['companion'].astype(jnp.float32)[..., None]
    patches = encoder.apply({'params': encoder_params}, rgb, companion, train=False).patches
    return jax.lax.stop_gradient(patches)
  return features


def patch_moments(patches: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """One batch's moments for metrics.FeatureVariance.update_moments, reduced on the device:
  patches [B, h, w, D], valid [B] (0 = padding) -> frames (), total_sum [D], total_sum_sq [D],
  frame_mean_sum_sq [D], position_sum [h * w, D]."""
  x = patches.astype(jnp.float32).reshape(patches.shape[0], -1, patches.shape[-1])
  weight = (valid > 0).astype(jnp.float32)
  return {'frames': jnp.sum(weight),
          'total_sum': jnp.einsum('b,bpd->d', weight, x),
          'total_sum_sq': jnp.einsum('b,bpd->d', weight, jnp.square(x)),
          'frame_mean_sum_sq': jnp.einsum('b,bd->d', weight, jnp.square(jnp.mean(x, axis=1))),
          'position_sum': jnp.einsum('b,bpd->pd', weight, x)}


def make_probe_steps(encoder, heads_module: heads_lib.ProbeHeads, tx, view_cfg, schedule):
  """(train_step, eval_step). train_step(state, encoder_params, batch) -> (state, metrics);
  eval_step(state, encoder_params, batch) -> (per-example losses, predictions, patch_moments of
  the frozen grid)."""
  features = frozen_features_fn(encoder, view_cfg)
  heads = tuple(heads_module.heads)

  def train_step(state, encoder_params, batch):
    patches = features(encoder_params, batch)

    def loss_fn(params):
      outputs, updates = heads_module.apply(
          {'params': params, 'batch_stats': state.batch_stats}, patches, train=True,
          mutable=['batch_stats'])
      losses = heads_lib.probe_losses(outputs, batch, heads)
      return losses['loss'], (losses, updates.get('batch_stats', {}))

    (loss, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    new_state = state_lib.apply_gradients(state, tx, grads, loss, batch_stats)
    return new_state, dict(losses, lr=schedule(state.step), grad_norm=optax.global_norm(grads))

  def eval_step(state, encoder_params, batch):
    patches = features(encoder_params, batch)
    outputs = heads_module.apply({'params': state.params, 'batch_stats': state.batch_stats},
                                 patches, train=False)
    one = lambda tree: jax.tree.map(lambda x: x[None], tree)
    losses = jax.vmap(lambda o, b: heads_lib.probe_losses(one(o), one(b), heads))(outputs, batch)
    return losses, heads_lib.predictions(outputs, heads), patch_moments(patches, batch['valid'])

  return train_step, eval_step


# ------------------------------------------------------------------------------------- loop


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the probes on the frozen encoder, keeps the best validation, writes the report.

  Returns {'metrics': best validation metrics, 'robustness': {condition: the same heads' metrics
  on perturbed inputs, or None where n/a}, 'best_step', 'probe_dir', 'report': path,
  'history': [(step, train loss)], 'val_history': [(step, val loss)]}.
  """
  workdir = os.path.abspath(workdir)
  probe_cfg = config.probe
  probe_dir = os.path.join(workdir, probe_dirname(probe_cfg))
  setup = downstream.check(config, 'probe', ('log_every', 'checkpoint_every', 'val_every'))
  robustness.check_conditions(probe_cfg.robustness)
  metadata, heads, image_hw = setup.metadata, setup.heads, setup.image_hw
  encoder, encoder_params, model_cfg, encoder_desc = _load_encoder(config, workdir, image_hw)
  run_config = {'encoder': encoder_identity(config, workdir, encoder_params), 'seed': config.seed,
                'data': config.data, 'dataset_identity': sources.dataset_identity(config.data),
                'probe': {k: v for k, v in probe_cfg.items() if k != 'encoder_dir'}}
  check_probe_config(probe_dir, run_config, record=False)  # before anything is built
  views = downstream.views(config, 'probe', setup, int(model_cfg['patch_size']))
  geometry, frame, mesh = views.geometry, views.frame, views.mesh
  total_steps, num_val = views.total_steps, views.num_val
  heads_module = heads_lib.ProbeHeads(
      heads=heads, num_classes_3d=views.num_classes['classes_3d'],
      num_classes_2d=views.num_classes['classes_2d'],
      num_seg_classes=views.num_classes['seg_classes'], seg_size=geometry.seg_hw,
      centernet_hidden=probe_cfg.centernet_hidden, occupancy_hidden=probe_cfg.occupancy_hidden)
  optim_cfg = ml_collections.ConfigDict(dict(
      lr=probe_cfg.lr, weight_decay=probe_cfg.weight_decay, b1=0.9, b2=0.999,
      warmup_fraction=probe_cfg.warmup_fraction, final_lr_fraction=1e-3, grad_clip=0.0))
  schedule = state_lib.learning_rate_schedule(optim_cfg, total_steps)
  tx = state_lib.make_optimizer(optim_cfg, total_steps)

  replicated = state_lib.replicated(mesh)
  encoder_params = jax.device_put(encoder_params, replicated)
  width = downstream.feature_width(encoder, encoder_params, image_hw,
                                   int(model_cfg['companion_channels']))

  def init_state(key):
    dummy = jnp.zeros((1, *geometry.grid_hw, width))
    return state_lib.create_train_state(heads_module.init(key, dummy, train=False), tx)

  view_cfg = augment.ViewConfig.from_config(config.views)
  train_step, eval_step = make_probe_steps(encoder, heads_module, tx, view_cfg, schedule)
  data_sharding = state_lib.batch_sharding(mesh)
  cache = None
  if probe_cfg.cache_features:
    # Before the probe directory exists: a cache over its memory limit writes nothing.
    feature_step = jax.jit(frozen_features_fn(encoder, view_cfg),
                           in_shardings=(replicated, data_sharding), out_shardings=data_sharding)
    start = time.perf_counter()
    cache = feature_cache.FeatureCache.build(
        config.data, frame, probe_cfg.batch_size,
        lambda b: feature_cache.host_rows(feature_step(encoder_params, state_lib.global_batch(
            mesh, {k: b[k] for k in ('rgb', 'companion')}))),
        float(probe_cfg.cache_max_gib))
    print(f'probe.cache_features: the frozen patch grids of {cache.num_train} train and '
          f'{sum(int(np.sum(b["valid"])) for b in cache.val)} val frames cached on the host '
          f'({cache.nbytes / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s', flush=True)

  check_probe_config(probe_dir, run_config, record=True)
  init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  checkpoints = loop.Checkpoints(probe_dir, probe_cfg.checkpoint_every, 2, 'probes',
                                 'Lower config.probe.lr.')
  state, start_step, state_sharding = checkpoints.restore_or_init(init_state, (init_key,),
                                                                  replicated)

  train_step = jax.jit(train_step, in_shardings=(state_sharding, replicated, data_sharding),
                       out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_step = jax.jit(eval_step, in_shardings=(state_sharding, replicated, data_sharding))
  num_probe_params = sum(x.size for x in jax.tree.leaves(state.params))
  source = (encoder_desc if probe_cfg.encoder == 'raw' else
            f'a frozen {model_cfg["family"]} encoder, {encoder_desc}')
  print(f'probes {list(heads)} on {source}: '
        f'{num_probe_params / 1e6:.2f}M probe params, {image_hw[0]}x{image_hw[1]} clean views '
        f'-> {geometry.grid_hw[0]}x{geometry.grid_hw[1]} patches; {total_steps} steps of batch '
        f'{probe_cfg.batch_size}, validation on {num_val} frames every {probe_cfg.val_every} '
        f'steps', flush=True)

  def evaluate(eval_state, num_figure_frames=0, variance: metrics.FeatureVariance | None = None,
               condition: str | None = None) -> tuple[dict[str, Any], list]:
    """One validation pass; with `variance`, the frozen grid's moments accumulate into it; with
    a robustness `condition`, rendered frames (never the cache) with the companion perturbed."""
    evaluator = heads_lib.ProbeEvaluator(heads, views.spec, probe_cfg, num_figure_frames)
    batches = (cache.val_batches() if cache and condition is None else
               pipeline.probe_eval_loader(config.data, frame, probe_cfg.batch_size))
    if condition is not None:
      batches = (robustness.perturb_batch(b, condition, seed=config.seed, batch_index=i)
                 for i, b in enumerate(batches))

    def eval_fn(batch):
      losses, preds, moments = eval_step(eval_state, encoder_params, batch)
      if variance is not None:
        variance.update_moments(**downstream.to_host(moments))
      return losses, preds

    return downstream.validate(evaluator, batches, mesh, eval_fn)

  writer = progress.metric_writer(probe_dir)

  def loader_fn(first_step):
    loader_args = dict(seed=config.seed + 1, start_step=first_step, num_steps=total_steps)
    return (cache.train_batches(probe_cfg.batch_size, **loader_args) if cache else
            pipeline.probe_train_loader(config.data, frame, probe_cfg.batch_size, **loader_args))

  def on_log(step, scalars, rate):
    downstream.write_train_scalars(writer, step, scalars)
    print(f'probe step {step}/{total_steps} | loss {scalars["loss"]:.4f} '
          f'({progress.loss_terms(scalars, heads)}) | lr {scalars["lr"]:.2e} | '
          f'{rate:.2f} steps/s | ETA {progress.eta(total_steps - step, rate)}', flush=True)

  fitted = downstream.fit(
      probe_dir, state,
      step_fn=lambda s, b: train_step(s, encoder_params, state_lib.global_batch(mesh, b)),
      loader_fn=loader_fn, start_step=start_step, total_steps=total_steps,
      checkpoints=checkpoints, writer=writer, on_log=on_log,
      evaluate=lambda s: evaluate(s)[0], log_every=probe_cfg.log_every,
      val_every=probe_cfg.val_every)
  best, best_state = fitted.best, fitted.best_state

  def reported(num_figure_frames=0, condition=None) -> tuple[dict[str, Any], list]:
    # What the heads read: how much of the frozen grid's variance is local content.
    variance = metrics.FeatureVariance()
    values, figure_frames = evaluate(best_state, num_figure_frames, variance, condition)
    values.update({f'patch_variance/{k}': v for k, v in variance.result().items()})
    return values, figure_frames

  values, figure_frames = reported(probe_cfg.num_figure_frames)
  encoder_cfg = None if probe_cfg.encoder == 'raw' else model_cfg
  companion = metadata.get('companion', 'depth')
  robust = run_robustness(tuple(probe_cfg.robustness), encoder_cfg, companion,
                          lambda name: reported(condition=name)[0])
  writer.write_scalars(best['step'], {f'robust/{name}/{k}': v for name, result in robust.items()
                                      if result for k, v in result.items() if np.isfinite(v)})
  writer.flush()
  row = report.ReportRow(
      method=config.method + ENCODERS[probe_cfg.encoder][1],
      training_data=downstream.training_data_label(encoder_cfg, companion), metrics=values)
  paths = report.write_report(
      probe_dir, row, details={
          'encoder': encoder_desc, 'best_step': best['step'], 'total_steps': total_steps,
          'heads': list(heads), 'cached_features': bool(cache), 'probe_view': list(image_hw),
          'patch_grid': list(geometry.grid_hw),
          'dataset': metadata.get('dataset', config.data.name), 'val_frames': num_val},
      figure_frames=figure_frames, metadata=metadata, image_hw=image_hw, robustness=robust)
  print(report.markdown_table([row, *report.robustness_rows(row, robust)]), flush=True)
  print('Patch-grid variance over the val frames (metrics.FeatureVariance): '
        + ', '.join(f'{k} {values[f"patch_variance/{k}"]:.3f}' for k in ('frame', 'position',
                                                                          'local')), flush=True)
  print(f'Probe report: {paths["markdown"]} (figure {paths.get("figure", "none")})', flush=True)
  return {'metrics': values, 'robustness': robust, 'best_step': best['step'],
          'probe_dir': probe_dir, 'report': paths['markdown'], 'history': fitted.history,
          'val_history': fitted.val_history}


def run_robustness(names: tuple[str, ...], encoder_cfg, companion: str,
                   evaluate) -> dict[str, dict[str, Any] | None]:
  """{condition: evaluate(condition), or None where it is n/a}, with a progress line each."""
  out = {}
  for name in names:
    reason = robustness.not_applicable(name, encoder_cfg, companion)
    if reason:
      out[name] = None
      print(f'robustness [{robustness.label(name)}]: n/a ({reason})', flush=True)
      continue
    start = time.perf_counter()
    out[name] = evaluate(name)
    print(f'robustness [{robustness.label(name)}]: {downstream.fmt_val(out[name])} '
          f'({time.perf_counter() - start:.1f} s)', flush=True)
  return out


# Probe settings a resumed probe run may change: how it runs and what the report shows, not
# what the heads train on (the best validation is chosen by loss, which these leave alone).
RESUMABLE = ('probe.log_every', 'probe.checkpoint_every', 'probe.num_figure_frames',
             'probe.robustness', 'probe.cache_features', 'probe.cache_max_gib',
             'probe.max_detections', 'probe.score_threshold', *loop.LOADER_KEYS)


def encoder_identity(config: ml_collections.ConfigDict, workdir: str,
                     encoder_params) -> dict[str, Any]:
  """What the probe heads are trained on: the kind of encoder and its params' fingerprint
  (with the export's method and step for the message when it changes)."""
  kind = config.probe.encoder
  if kind == 'raw':
    return {'kind': 'raw'}
  identity = {'kind': kind, 'fingerprint': state_lib.params_fingerprint(encoder_params)}
  if kind == 'pretrained':
    directory = pretrained.resolve_dir(config.probe.encoder_dir, 'probe.encoder_dir', workdir)
    meta = state_lib.read_encoder_config(directory) or {}
    identity.update(method=meta.get('method'), step=meta.get('step'))
  return identity


def check_probe_config(probe_dir: str, run_config: dict[str, Any], record: bool) -> None:
  """Refuses to resume probes trained on another encoder or with other settings (heads, data,
  schedule), naming what changed; a fresh probe directory gets the record."""
  loop.check_run_config(
      os.path.join(probe_dir, 'config.json'), run_config, resumable=RESUMABLE, record=record,
      fix=f'its checkpoints and best heads belong to that run: remove {probe_dir} to train '
          f'probes for this one, or use another --workdir')
