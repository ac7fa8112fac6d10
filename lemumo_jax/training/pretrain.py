"""Pretraining, for every method: model and objective are plugged in by config.

`build` makes THE train step (the loop, mode=profile and benchmarks/step.py all run it): one
jitted step over a `Mesh(('data',))`; the host batch becomes a global array sharded on 'data',
params are replicated, views are cut on the device (augment.py), and the loss is reduced over
the global batch by XLA. `train` hands it to the shared loop (loop.py: checkpoints, NaN check,
resume rules, preemption); the data order is a function of the step, so a resumed run sees the
batches the killed run would have seen. The encoder is exported at the end (state.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lemumo_jax import files
from lemumo_jax.data import augment, pipeline, sources
from lemumo_jax.models import dino as dino_model
from lemumo_jax.models import multimae, ssl
from lemumo_jax.objectives import dino as dino_objective
from lemumo_jax.objectives import infonce, lejepa, mae, sigreg, vicreg
from lemumo_jax.training import loop, progress
from lemumo_jax.training import state as state_lib

Objective = Callable[[jax.Array, dict[str, Any]], tuple[jax.Array, dict[str, jax.Array]]]


NonFiniteLossError = loop.NonFiniteLossError


OBJECTIVES = ('lejepa', 'vicreg', 'infonce', 'dino', 'mae')


def build_model(config: ml_collections.ConfigDict):
  if config.model.family == 'multimae':
    # Masked autoencoder with per-task decoders (models/multimae.py): the MultiMAE rows.
    return multimae.build_model(config)
  if config.objective.name == 'dino':
    # Student + EMA teacher heads (models/dino.py): the dinov3 row.
    return dino_model.DinoModel(encoder_cfg=config.model, dino_cfg=config.dino)
  return ssl.JepaModel(encoder_cfg=config.model, projector_cfg=config.projector,
                       passes=ssl.check_passes(config.objective.passes))


def build_objective(config: ml_collections.ConfigDict) -> Objective:
  cfg = config.objective
  passes = ssl.check_passes(cfg.passes)
  if cfg.name == 'mae' or config.model.family == 'multimae':
    return mae.build_objective(config)  # the MultiMAE rows (objectives/mae.py)
  # The 'dual' encoder's two branches are trained only by the contrastive pairing of their CLS
  # embeddings, and InfoNCE needs the companion embeddings only that encoder returns.
  if (config.model.family == 'dual') != (cfg.name == 'infonce'):
    raise ValueError(f"config.objective.name={cfg.name!r} with config.model.family="
                     f"{config.model.family!r}: objective 'infonce' and family 'dual' (the "
                     f"ImageBind-style row) go together")
  if cfg.name == 'lejepa':
    reduction = lejepa.check_choice(cfg.invariance_reduction, lejepa.INVARIANCE_REDUCTIONS,
                                    'objective.invariance_reduction')
    scale = lejepa.check_choice(cfg.sigreg_scale, sigreg.SCALES, 'objective.sigreg_scale')
    def objective(key, outputs):
      return lejepa.lejepa_loss(key, outputs['z_global'], outputs['z_local'], lam=cfg.lam,
                                num_slices=cfg.num_slices, num_knots=cfg.num_knots,
                                t_max=cfg.t_max, invariance_reduction=reduction,
                                sigreg_scale=scale, extra_passes=outputs.get('passes'))
    return objective
  if cfg.name == 'vicreg':
    if passes != ('joint',):
      raise ValueError(f"config.objective.passes={list(passes)}: the single-modality passes "
                       f"are a SIGReg ablation (S3); use ('joint',) with objective.name='vicreg'")
    def objective(key, outputs):
      del key  # deterministic
      return vicreg.vicreg_loss(outputs['z_global'], outputs['z_local'],
                                sim_coeff=cfg.vicreg_sim, std_coeff=cfg.vicreg_std,
                                cov_coeff=cfg.vicreg_cov, eps=cfg.vicreg_eps)
    return objective
  if cfg.name == 'infonce':
    if passes != ('joint',):
      raise ValueError(f"config.objective.passes={list(passes)}: the single-modality passes "
                       f"are a SIGReg ablation (S3); use ('joint',) with objective.name='infonce'")
    if config.views.num_local:
      raise ValueError(f'config.views.num_local={config.views.num_local}: the ImageBind-style '
                       f'InfoNCE row disables local crops (S1); set config.views.num_local=0')
    temperature = float(cfg.get('infonce_temperature', 0.07))  # set by the imagebind row
    def objective(key, outputs):
      del key  # deterministic
      return infonce.infonce_loss(outputs['z_global'], outputs['z_companion_global'],
                                  temperature=temperature)
    return objective
  if cfg.name == 'dino':
    return _build_dino_objective(config)
  raise ValueError(f'config.objective.name must be one of {list(OBJECTIVES)}, got {cfg.name!r}')


def _build_dino_objective(config: ml_collections.ConfigDict) -> Objective:
  """DINO + iBOT (objectives/dino.py) on a 'vit' encoder with an EMA teacher (the dinov3 row)."""
  if tuple(config.objective.passes) != ('joint',):
    raise ValueError(f"config.objective.passes={list(config.objective.passes)}: the "
                     f"single-modality passes are a SIGReg ablation (S3); use ('joint',) with "
                     f"objective.name='dino'")
  if config.model.family != 'vit':
    raise ValueError(f"config.model.family={config.model.family!r}: objective.name='dino' "
                     f"needs the single-ViT family 'vit' (the dinov3 row)")
  if config.views.num_global < 1 or config.views.num_global + config.views.num_local < 2:
    raise ValueError(f'config.views: DINO needs >= 1 global view and >= 2 views in all, got '
                     f'{config.views.num_global} global + {config.views.num_local} local')
  cfg = config.dino
  def objective(key, outputs):
    del key  # the iBOT masks come from the step's 'mask' stream
    return dino_objective.dino_objective(outputs, student_temp=cfg.student_temp,
                                         teacher_temp=cfg.teacher_temp,
                                         ibot_weight=cfg.ibot_weight)
  return objective


def build_teacher_momentum(config: ml_collections.ConfigDict,
                           total_steps: int) -> optax.Schedule | None:
  """step -> the EMA teacher's momentum (DINO's cosine from dino.teacher_momentum to
  dino.final_teacher_momentum), or None for objectives without a teacher."""
  if config.objective.name != 'dino':
    return None
  base, final = float(config.dino.teacher_momentum), float(config.dino.final_teacher_momentum)
  return lambda step: dino_objective.teacher_momentum(step, total_steps, base, final)


def total_train_steps(config: ml_collections.ConfigDict, num_records: int) -> int:
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  return config.train.num_epochs * pipeline.steps_per_epoch(num_records, config.train.batch_size)


def make_train_step(model, objective: Objective, tx: optax.GradientTransformation,
                    view_cfg: augment.ViewConfig, schedule: optax.Schedule,
                    teacher_momentum: optax.Schedule | None = None):
  """(state, batch, base_key) -> (state, metrics); jit it with the state donated.

  A state with an EMA teacher (state_lib.TeacherTrainState: the dinov3 row) first runs the
  model's `teacher` method on the views with the teacher's params, outside the gradient (its
  'batch_stats' updates, DINO's centres, carry over to the student's apply); the objective
  finds its outputs under outputs['teacher']. After the optimizer step the teacher moves to
  the new params by EMA with momentum `teacher_momentum(step)` (build_teacher_momentum).
  """

  def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array], base_key: jax.Array):
    key = jax.random.fold_in(base_key, state.step)
    view_key, loss_key, mask_key = jax.random.split(key, 3)
    views = augment.make_views(view_key, batch['rgb'], batch['companion'], view_cfg,
                               seg=batch['seg'] if view_cfg.with_seg else None)
    teacher = state_lib.teacher_of(state)
    batch_stats_in, teacher_outputs = state.batch_stats, None
    if teacher is not None:
      if teacher_momentum is None:
        raise ValueError('make_train_step: this state has an EMA teacher; pass '
                         'teacher_momentum=build_teacher_momentum(config, total_steps)')
      teacher_outputs, teacher_updates = model.apply(
          {'params': teacher, 'batch_stats': batch_stats_in}, views, mutable=['batch_stats'],
          method='teacher')
      teacher_outputs = jax.lax.stop_gradient(teacher_outputs)
      batch_stats_in = teacher_updates['batch_stats']

    def loss_fn(params):
      # 'mask': the stream of models that sample token masks in training (a model that never
      # calls make_rng('mask') ignores it).
      outputs, updates = model.apply({'params': params, 'batch_stats': batch_stats_in},
                                     views, train=True, mutable=['batch_stats'],
                                     rngs={'mask': mask_key})
      if teacher_outputs is not None:
        outputs = dict(outputs, teacher=teacher_outputs)
      loss, metrics = objective(loss_key, outputs)
      return loss, (metrics, updates['batch_stats'])

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=schedule(state.step))
    new_state = state_lib.apply_gradients(state, tx, grads, loss, batch_stats)
    if teacher is not None:
      momentum = teacher_momentum(state.step)
      new_state = new_state.replace(
          teacher_params=state_lib.ema_update(teacher, new_state.params, momentum))
      metrics['teacher_momentum'] = momentum
    return new_state, metrics

  return train_step


def _dummy_views(view_cfg: augment.ViewConfig, batch: int, channels: int) -> dict[str, jax.Array]:
  g, l = view_cfg.global_size, view_cfg.local_size
  views = {'global_rgb': jnp.zeros((view_cfg.num_global, batch, g, g, 3)),
           'global_companion': jnp.zeros((view_cfg.num_global, batch, g, g, channels)),
           'local_rgb': jnp.zeros((view_cfg.num_local, batch, l, l, 3)),
           'local_companion': jnp.zeros((view_cfg.num_local, batch, l, l, channels))}
  if view_cfg.with_seg:
    views.update(global_seg=jnp.zeros((view_cfg.num_global, batch, g, g), jnp.int32),
                 local_seg=jnp.zeros((view_cfg.num_local, batch, l, l), jnp.int32))
  return views


def make_init_state(model, tx: optax.GradientTransformation, view_cfg: augment.ViewConfig,
                    companion_channels: int) -> Callable[[jax.Array], state_lib.TrainState]:
  """key -> a fresh TrainState (params initialised on a 2-sample batch of zero views)."""

  def init_state(key):
    dummy = _dummy_views(view_cfg, 2, companion_channels)
    return state_lib.create_train_state(model.init(key, dummy, train=False), tx,
                                        with_teacher=getattr(model, 'has_teacher', False))

  return init_state


def jit_train_step(train_step, mesh, state_sharding):
  """The jitted step every caller runs (the loop, mode=profile, benchmarks/step.py): state
  replicated and donated, batch sharded on 'data', key and metrics replicated."""
  replicated = state_lib.replicated(mesh)
  return jax.jit(train_step,
                 in_shardings=(state_sharding, state_lib.batch_sharding(mesh), replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)


# What a pretraining run computes: a rerun into the same workdir must match these sections
# (config.dino / config.multimae only for the rows that read them) ...
RUN_SECTIONS = ('method', 'seed', 'data', 'views', 'model', 'projector', 'objective', 'optim',
                'train')
# ... except these keys, which change how it runs, not what it computes (logged on resume).
RESUMABLE = ('train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints',
             'model.attention', 'model.remat', *loop.LOADER_KEYS)


def run_sections(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  extra = (('dino',) if config.objective.name == 'dino' else ()) + (
      ('multimae',) if config.model.family == 'multimae' else ())
  return RUN_SECTIONS + extra


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run with other pretraining settings (naming the keys); records the
  config in <workdir>/config.json on a fresh run."""
  record = files.as_json(config)
  identity = sources.dataset_identity(config.data)
  if identity:  # a dataset rebuilt in place is other data under the same data_dir
    record['dataset_identity'] = identity
  loop.check_run_config(
      os.path.join(workdir, 'config.json'), record,
      compared=(*run_sections(config), 'dataset_identity'), resumable=RESUMABLE,
      fix='use a new --workdir, or set those values back to resume it (a dataset moved to '
          'another data_dir: edit data.data_dir in the workdir\'s config.json)')


# config.<key>: (low, high, low inclusive, high inclusive); None = unbounded.
_RANGES = {
    'optim.lr': (0.0, None, False, False),
    'optim.weight_decay': (0.0, None, True, False),
    'optim.b1': (0.0, 1.0, True, False),
    'optim.b2': (0.0, 1.0, True, False),
    'optim.warmup_fraction': (0.0, 1.0, True, True),
    'optim.final_lr_fraction': (0.0, 1.0, True, True),
    'optim.grad_clip': (0.0, None, True, False),
}


def check_ranges(config: ml_collections.ConfigDict, ranges=None) -> None:
  """Each config.<key> of `ranges` (default _RANGES) is a number in its interval."""
  for key, (low, high, low_in, high_in) in (ranges or _RANGES).items():
    section, name = key.split('.')
    value = config[section][name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (low is None or value > low or (low_in and value == low))
    ok = ok and (high is None or value < high or (high_in and value == high))
    if not ok:
      interval = (f'{"[" if low_in else "("}{"-inf" if low is None else low}, '
                  f'{"inf" if high is None else high}{"]" if high_in else ")"}')
      raise ValueError(f'config.{key}={value!r} must be a number in {interval}')


def check_config(config: ml_collections.ConfigDict) -> None:
  """The loop's, optimizer's, views' and patch settings, before anything reads data, compiles
  or writes."""
  loop.check_schedule(config.train, 'train', ('log_every', 'checkpoint_every',
                                              'keep_checkpoints'))
  loop.check_pair(config.data.image_size, 'data.image_size')
  check_ranges(config)
  loop.check_positive(config.model, 'model', ('patch_size', 'img_size'))
  loop.check_positive(config.views, 'views', ('num_global', 'global_size', 'local_size'))
  if config.model.img_size % config.model.patch_size:
    raise ValueError(f'config.model.img_size={config.model.img_size} is not a multiple of '
                     f'config.model.patch_size={config.model.patch_size}')
  num_local = config.views.num_local
  if isinstance(num_local, bool) or not isinstance(num_local, int) or num_local < 0:
    raise ValueError(f'config.views.num_local={num_local!r} must be an integer >= 0')
  for key in ('global_size', 'local_size') if num_local else ('global_size',):
    if config.views[key] % config.model.patch_size:
      raise ValueError(f'config.views.{key}={config.views[key]} is not a multiple of '
                       f'config.model.patch_size={config.model.patch_size}')


def build(config: ml_collections.ConfigDict, mesh, total_steps: int):
  """Validates the pretraining config and builds THE train step, shared by the loop,
  mode=profile and benchmarks/step.py: (init_state(key), step(state, batch, key), view_cfg)
  with step unjitted (jit_train_step jits it)."""
  check_config(config)
  if config.train.batch_size % mesh.size:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} is not divisible by '
                     f'the {mesh.size} devices of the mesh')
  view_cfg = augment.ViewConfig.from_config(config.views)
  model = build_model(config)
  objective = build_objective(config)
  schedule = state_lib.learning_rate_schedule(config.optim, total_steps)
  tx = state_lib.make_optimizer(config.optim, total_steps)
  init_state = make_init_state(model, tx, view_cfg, config.model.companion_channels)
  step = make_train_step(model, objective, tx, view_cfg, schedule,
                         build_teacher_momentum(config, total_steps))
  return init_state, step, view_cfg


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains, checkpoints, exports the encoder; returns a summary (losses, steps, paths)."""
  workdir = os.path.abspath(workdir)
  check_config(config)
  metadata = sources.dataset_metadata(config.data)
  num_records = int(metadata['splits']['train'])
  total_steps = total_train_steps(config, num_records)
  mesh = state_lib.make_mesh()
  init_state, train_step, view_cfg = build(config, mesh, total_steps)
  root_key = jax.random.PRNGKey(config.seed)
  init_key, step_key = jax.random.split(root_key)
  jax.eval_shape(init_state, init_key)  # the model builds (shapes only) before ...
  check_workdir_config(workdir, config)  # ... the run is recorded: a bad config writes nothing
  replicated = state_lib.replicated(mesh)
  checkpoints = loop.Checkpoints(
      workdir, config.train.checkpoint_every, config.train.keep_checkpoints, 'pretraining',
      'Lower optim.lr, enable optim.grad_clip, or use model.dtype=float32.')
  state, start_step, state_sharding = checkpoints.restore_or_init(init_state, (init_key,),
                                                                  replicated)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'{config.method}: {num_params / 1e6:.2f}M params, {num_records} train records, '
        f'{total_steps} steps of batch {config.train.batch_size} on {mesh.size} device(s)',
        flush=True)

  step_fn = jit_train_step(train_step, mesh, state_sharding)
  loader = pipeline.pretrain_loader(config.data, config.train.batch_size, seed=config.seed,
                                    start_step=start_step, num_steps=total_steps,
                                    with_seg=view_cfg.with_seg)
  writer = progress.metric_writer(workdir)
  batch_size = config.train.batch_size

  def on_log(step, scalars, rate):
    writer.write_scalars(step, dict(scalars, samples_per_sec=rate * batch_size))
    terms = progress.loss_terms(scalars)
    print(f'step {step}/{total_steps} | loss {scalars["loss"]:.4f}'
          f'{f" ({terms})" if terms else ""} | lr {scalars["lr"]:.2e} | '
          f'{rate:.2f} steps/s, {rate * batch_size:.1f} samples/s | '
          f'ETA {progress.eta(total_steps - step, rate)}', flush=True)

  try:
    result = loop.train(
        state, lambda s, b: step_fn(s, state_lib.global_batch(mesh, b), step_key), loader,
        start_step=start_step, total_steps=total_steps, log_every=config.train.log_every,
        checkpoints=checkpoints, on_log=on_log, writer=writer)
  finally:
    writer.flush()
  state, step = result.state, result.step
  checkpoints.check_finite(state, step)
  # With an EMA teacher (DINO) the teacher's backbone is the exported encoder, DINO's convention.
  teacher = state_lib.teacher_of(state)
  encoder_params = (state.params if teacher is None else teacher)['encoder']
  export_path = state_lib.export_encoder(workdir, encoder_params, config, step)
  print(f'Pretraining done: {step} steps; checkpoints in {checkpoints.directory}; encoder '
        f'exported to {export_path}', flush=True)
  return {'history': result.history, 'final_step': step, 'start_step': start_step,
          'encoder_dir': export_path, 'state': state}
