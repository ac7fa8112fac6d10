"""Train state, device mesh and shardings, optimizer, Orbax checkpoints, encoder export."""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lemumo_jax import files
from lemumo_jax.models import encoders


@flax.struct.dataclass
class TrainState:
  """Everything a pretraining step reads and writes; a plain pytree (checkpointed whole)."""
  step: jax.Array              # int32 scalar: the number of updates applied
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite_step: jax.Array    # int32 scalar: first step whose loss was NaN/Inf, -1 if none


@flax.struct.dataclass
class TeacherTrainState(TrainState):
  """TrainState plus an EMA teacher (the dinov3 row): `teacher_params`, a tree like `params`
  that the step updates by EMA after the optimizer step. A subclass rather than an optional
  field, so every other model's state tree and checkpoints stay exactly TrainState's."""
  teacher_params: Any


def teacher_of(state: TrainState) -> Any:
  """The EMA teacher's params, or None for a state without a teacher."""
  return state.teacher_params if isinstance(state, TeacherTrainState) else None


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """1-D mesh over all (global) devices; the batch is sharded on 'data'."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def global_batch(mesh: Mesh, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This host's rows -> global arrays sharded on 'data' (works on one or many hosts)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine decay to lr * final_lr_fraction."""
  warmup = int(round(optim_cfg.warmup_fraction * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=max(warmup, 1),
      decay_steps=max(total_steps, warmup + 1), end_value=optim_cfg.lr * optim_cfg.final_lr_fraction)


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices and convolution kernels only (not biases, norms, tokens)."""
  def decays(path, leaf):
    name = str(path[-1].key) if hasattr(path[-1], 'key') else str(path[-1])
    return leaf.ndim >= 2 and name == 'kernel'
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                           weight_decay=optim_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def create_train_state(variables: dict[str, Any], tx: optax.GradientTransformation,
                       with_teacher: bool = False) -> TrainState:
  """with_teacher: a TeacherTrainState whose teacher starts as a copy of the params (DINO)."""
  params = variables['params']
  fields = dict(step=jnp.zeros((), jnp.int32), params=params,
                batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                nonfinite_step=jnp.full((), -1, jnp.int32))
  if with_teacher:
    return TeacherTrainState(teacher_params=jax.tree.map(jnp.copy, params), **fields)
  return TrainState(**fields)


def apply_gradients(state: TrainState, tx: optax.GradientTransformation, grads: Any,
                    loss: jax.Array, batch_stats: Any) -> TrainState:
  """One optimizer step of any stage's state: params updated by tx, step + 1, the new
  batch_stats, and the first step whose loss was NaN/Inf recorded in nonfinite_step."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  nonfinite = jnp.where((state.nonfinite_step < 0) & ~jnp.isfinite(loss), state.step + 1,
                        state.nonfinite_step)
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state, nonfinite_step=nonfinite)


def ema_update(teacher: Any, student: Any, momentum: jax.Array | float) -> Any:
  """teacher <- momentum * teacher + (1 - momentum) * student, leaf by leaf."""
  return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher, student)


# What an Orbax read of a damaged folder raises (a lost item, truncated JSON, a partial copy).
UNREADABLE = (OSError, ValueError, KeyError, TypeError)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState) -> TrainState | None:
  """The latest checkpointed state with the shardings of `abstract_state`, or None."""
  step = manager.latest_step()
  if step is None:
    return None
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except UNREADABLE as e:
    path = os.path.join(str(manager.directory), str(step))
    raise ValueError(f'checkpoint {path} cannot be restored ({type(e).__name__}: '
                     f'{str(e)[:300]}); if that folder is damaged (e.g. a partial copy), move '
                     f'it away to resume from the checkpoint before it') from e


def restore_or_init(manager: ocp.CheckpointManager, init_fn, init_args: tuple,
                    sharding: jax.sharding.Sharding, what: str) -> tuple[TrainState, int, Any]:
  """(state, start step, state shardings) with every leaf placed by `sharding`: the latest
  checkpoint in `manager`, else `init_fn(*init_args)` jitted at step 0. The shardings tree is
  what the loop's jitted steps take. `what` names the loop in the resume line ('pretraining',
  'probes', 'fine-tuning')."""
  abstract_state = jax.eval_shape(init_fn, *init_args)
  state_sharding = jax.tree.map(lambda _: sharding, abstract_state)
  state = restore_latest(manager, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state))
  if state is None:
    return jax.jit(init_fn, out_shardings=state_sharding)(*init_args), 0, state_sharding
  start_step = int(jax.device_get(state.step))
  print(f'Resuming {what} from step {start_step} in {manager.directory}', flush=True)
  return state, start_step, state_sharding


def encoder_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'encoder')


def _host_value(leaf: Any) -> np.ndarray:
  """A leaf's value on this host: a replicated array spanning other hosts' devices is read from
  a local copy (device_get would refuse it); PRNG keys as their key data."""
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  if (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
      and leaf.is_fully_replicated):
    leaf = leaf.addressable_data(0)
  return np.asarray(jax.device_get(leaf))


def state_digest(tree: Any) -> str | None:
  """params_fingerprint of a whole train state, or None where a leaf is sharded over other
  hosts' devices (no host sees all of it). About 0.6 s per 264 MB (ViT-S params + AdamW
  moments) on one core of the 2-core CI machine, plus the device-to-host copy."""
  for leaf in jax.tree.leaves(tree):
    if (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        and not leaf.is_fully_replicated):
      return None
  return params_fingerprint(tree)


def params_fingerprint(params: Any) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes: the identity of a set of params (an
  exported encoder, the encoder a probe's heads were trained on, a kept best)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    leaf = _host_value(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|'.encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def read_encoder_config(directory: str) -> dict[str, Any] | None:
  """encoder_config.json of an export directory, or None when there is none; a truncated or
  unreadable file is an error naming it."""
  return files.read_json(os.path.join(directory, 'encoder_config.json'),
                         're-export the encoder (rerun mode=pretrain in its workdir)')


def export_encoder(workdir: str, encoder_params: Any, config: ml_collections.ConfigDict,
                   step: int) -> str:
  """Writes the encoder the probe stage loads: Orbax params + encoder_config.json.

  Crash-safe at every point: the params go to a new folder named by step and fingerprint
  (Orbax finalises it atomically), then encoder_config.json is replaced by rename to name it,
  then older params folders are removed. A reader finds either the old export or the new one,
  whole. An export whose params equal the current one's (the rerun of a finished run) writes
  nothing.
  """
  directory = encoder_dir(workdir)
  host_params = jax.device_get(encoder_params)
  fingerprint = params_fingerprint(host_params)
  previous = read_encoder_config(directory)
  name = f'params_{step}_{fingerprint[:12]}'
  if (previous and previous.get('fingerprint') == fingerprint
      and os.path.isdir(os.path.join(directory, previous['params_dir']))):
    return directory
  meta = {'model': config.model.to_dict(), 'method': config.method, 'step': int(step),
          'params_dir': name, 'fingerprint': fingerprint, 'data': config.data.to_dict()}
  publish_params(directory, name, host_params, 'encoder_config.json', meta)
  return directory


def publish_params(directory: str, name: str, tree: Any, pointer: str,
                   meta: dict[str, Any]) -> None:
  """Saves `tree` to directory/name (Orbax finalises it atomically; an existing one is kept),
  then replaces the JSON `pointer` (meta, which names `name`) by rename, then removes the older
  params_* folders: at any kill, the pointer names complete params (the encoder export)."""
  path = os.path.join(directory, name)
  if not os.path.isdir(path):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    files.write_json_atomic(os.path.join(directory, pointer), meta)
    for entry in os.listdir(directory):
      if entry.startswith('params_') and entry != name:
        shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)


def load_encoder(directory: str, compute: dict[str, Any] | None = None,
                 ) -> tuple[Any, Any, ml_collections.ConfigDict]:
  """(encoder module, params, model config) from an `export_encoder` directory; `compute`
  replaces model keys that choose how the encoder computes (pretrained.RUN_COMPUTE_KEYS)."""
  meta = read_encoder_config(directory)
  if meta is None:
    raise FileNotFoundError(f'{os.path.join(directory, "encoder_config.json")} not found: '
                            f'pretrain first (mode=pretrain writes <workdir>/encoder)')
  model_cfg = ml_collections.ConfigDict(meta['model'])
  model_cfg.update(compute or {})
  return encoders.build_encoder(model_cfg), verified_params(directory, meta), model_cfg


def verified_params(directory: str, meta: dict[str, Any]) -> Any:
  """The params an encoder_config.json names, restored and checked against its fingerprint
  (sha256 of every leaf, ~0.3 s per 100 MB of params on one core): a damaged or replaced
  params folder is refused, named, never loaded."""
  remedy = 're-export the encoder (rerun mode=pretrain in its workdir)'
  where = os.path.join(directory, 'encoder_config.json')
  if not meta.get('fingerprint') or not meta.get('params_dir'):
    raise ValueError(f'{where} names no params fingerprint: the export cannot be verified; '
                     f'{remedy}')
  path = os.path.join(directory, meta['params_dir'])
  try:
    params = ocp.StandardCheckpointer().restore(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: the exported params cannot be read ({type(e).__name__}: '
                     f'{str(e)[:300]}); {remedy}') from e
  found = params_fingerprint(params)
  if found != meta['fingerprint']:
    raise ValueError(f'{path}: the params do not match the fingerprint in {where} '
                     f'({found[:12]} != {meta["fingerprint"][:12]}): the files are damaged or '
                     f'were replaced; {remedy}')
  return params
