"""The loop every training stage runs: pretraining, probes, fine-tuning.

A stage builds its state, jitted step and batch iterator, then calls `train`, which owns what
must be the same everywhere:
  - the NaN/Inf check (`Checkpoints.check_finite`): at every logged, validated and saved step;
    it waits for in-flight saves and names the last finished checkpoint (or says there is none);
  - checkpoint saving (`Checkpoints.save`): Orbax, asynchronous, never of a non-finite state;
  - preemption: on SIGTERM (a Slurm time limit, a TPU preemption) the loop saves the step it
    is at and raises `Preempted`; main exits with EX_TEMPFAIL (75) and a rerun resumes;
  - progress lines (step, rate, ETA) through the stage's `on_log`, validation through
    `on_validate`, and the best validation's params kept by `save_best` (probes, fine-tuning).
`check_run_config` is the one comparison of a stage's settings against the run already in its
directory: the keys a resumed run may change are logged, every other difference is refused
with the keys named, and nothing is written before the config is validated.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lemumo_jax import files
from lemumo_jax.training import progress
from lemumo_jax.training import state as state_lib

EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, the caller is invited to retry


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the run stopped without checkpointing the bad state."""


class Preempted(Exception):
  """SIGTERM: the state at `step` was checkpointed; rerunning the command resumes from it."""

  def __init__(self, what: str, step: int, directory: str):
    super().__init__(f'{what} preempted (SIGTERM) at step {step}: checkpoint saved in '
                     f'{directory}; rerun the same command to resume')
    self.step = step


# ------------------------------------------------------------------------- config checks


def check_positive(cfg: ml_collections.ConfigDict, section: str, keys: Iterable[str]) -> None:
  """Each config.<section>.<key> must be an integer >= 1."""
  for key in keys:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'config.{section}.{key}={value!r} must be an integer >= 1')


def check_schedule(cfg: ml_collections.ConfigDict, section: str,
                   periods: Iterable[str] = ('log_every', 'checkpoint_every')) -> None:
  """num_steps >= 0 (0: num_epochs decides, which must then be >= 1) and the periods >= 1."""
  if isinstance(cfg.num_steps, bool) or not isinstance(cfg.num_steps, int) or cfg.num_steps < 0:
    raise ValueError(f'config.{section}.num_steps={cfg.num_steps!r} must be an integer >= 0 '
                     f'(0: config.{section}.num_epochs decides)')
  if cfg.num_steps == 0:
    check_positive(cfg, section, ('num_epochs',))
  check_positive(cfg, section, ('batch_size', *periods))


def check_pair(value: Any, key: str) -> tuple[int, int]:
  """An (H, W) config value; a tuple override given twice is appended by ml_collections."""
  values = tuple(value)
  if len(values) != 2 or not all(isinstance(v, int) and v > 0 for v in values):
    raise ValueError(f'config.{key}={values}: give two positive integers (H, W); note that '
                     f'ml_collections appends a tuple override given twice on the command line')
  return values


def check_names(values: Any, key: str, choices: Iterable[str]) -> tuple[str, ...]:
  """A non-empty tuple of distinct names from `choices`."""
  values, choices = tuple(values), tuple(choices)
  unknown = [v for v in values if v not in choices]
  if not values or unknown:
    raise ValueError(f'config.{key}={list(values)}: choose one or more of {list(choices)}')
  repeated = sorted({v for v in values if values.count(v) > 1})
  if repeated:
    raise ValueError(f'config.{key}={list(values)} names {repeated} twice (ml_collections '
                     f'appends a tuple override given twice on the command line)')
  return values


# ---------------------------------------------------------------------- run config record


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


# Input-pipeline knobs: how fast the data arrives, never which batches (batch i is a function of
# the seed and i), so a resumed pretraining or probe run may change them.
LOADER_KEYS = ('data.num_threads', 'data.prefetch', 'data.num_workers')


def _matches(key: str, prefixes: Iterable[str]) -> bool:
  return any(key == p or key.startswith(p + '.') for p in prefixes)


def check_run_config(path: str, current: Mapping[str, Any], *, resumable: Iterable[str] = (),
                     compared: Iterable[str] | None = None, fix: str,
                     record: bool = True) -> None:
  """Records `current` at `path` (JSON) on a fresh run; a rerun must match the record.

  Keys are compared as dotted paths ('optim.lr'). A differing key under one of `compared`
  (default: all of them) and not under `resumable` is refused: ValueError naming each such key
  with both values, then `fix`. Differences under `resumable` are printed and the record is
  updated. Call it after the config is validated: the record is what the next rerun must match.
  record=False compares only (a stage that checks before its slow set-up and records after).
  """
  current = files.as_json(dict(current))
  previous = files.read_json(path, f'it records the run in this directory; restore it or {fix}')
  if previous is not None:
    old, new = _flatten(previous), _flatten(current)
    keys = sorted(k for k in set(old) | set(new) if old.get(k, '<absent>') != new.get(k, '<absent>')
                  and (compared is None or _matches(k, compared)))
    refused = [k for k in keys if not _matches(k, resumable)]
    if refused:
      listed = '; '.join(f'{k}: {old.get(k, "<absent>")!r} -> {new.get(k, "<absent>")!r}'
                         for k in refused)
      raise ValueError(f'{os.path.dirname(path)} holds a run with other settings '
                       f'({listed}); {fix}')
    if not keys or not record:
      return
    print('Resuming with changed settings (resume-compatible): ' + '; '.join(
        f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys), flush=True)
    current = dict(previous, **current)
  if record and jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_json_atomic(path, current)


# ---------------------------------------------------------------------------- checkpoints


class Checkpoints:
  """A stage's Orbax CheckpointManager with the loop's two rules: a non-finite state is never
  saved, and a NaN stop names a finished checkpoint."""

  def __init__(self, directory: str, every: int, keep: int, what: str, nan_hint: str):
    self.what, self.nan_hint, self.every = what, nan_hint, every
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                           create=True)
    self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(directory), 'checkpoints'),
                                         options=options)

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def restore_or_init(self, init_fn, init_args: tuple, sharding) -> tuple[Any, int, Any]:
    """(state, start step, state shardings): the latest checkpoint, else a fresh state."""
    return state_lib.restore_or_init(self.manager, init_fn, init_args, sharding, self.what)

  def check_finite(self, state, step: int) -> None:
    """Raises NonFiniteLossError if a loss up to `step` was NaN/Inf."""
    bad = int(jax.device_get(state.nonfinite_step))
    if bad < 0:
      return
    self.manager.wait_until_finished()  # a save in flight is finished (or failed) first
    last = self.manager.latest_step()
    where = (f'the last good checkpoint is step {last} in {self.directory}' if last is not None
             else f'there is no checkpoint in {self.directory} (the NaN came before the first)')
    raise NonFiniteLossError(f'{self.what} loss became NaN/Inf at step {bad} (checked at step '
                             f'{step}); {where}. {self.nan_hint}')

  def save(self, step: int, state, force: bool = False) -> None:
    """Saves at every `every`-th step, or now with force; never a non-finite state."""
    if not force and step % self.every:
      return
    self.check_finite(state, step)
    self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()


class _SigtermFlag:
  """Single-process preemption notice: SIGTERM sets a flag the loop reads between steps (on
  several processes JAX's preemption service, through Orbax, agrees on the step instead)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    if not self.received:
      print('SIGTERM received: checkpointing after the current step', flush=True)
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False

  def reached(self, step: int, checkpoints: Checkpoints) -> bool:
    if jax.process_count() > 1:
      return checkpoints.manager.reached_preemption(step)
    return self.received


# ---------------------------------------------------------------------------- keep-best
# The probe and fine-tune stages keep their best validation's params in <stage dir>/best/.


def read_best(directory: str) -> dict[str, Any] | None:
  """best/best.json of a stage directory (step, params_dir, metrics), or None."""
  best_dir = os.path.join(directory, 'best')
  return files.read_json(os.path.join(best_dir, 'best.json'),
                         f'remove {best_dir} and rerun: the final state is validated again')


def save_best(directory: str, step: int, state, values: dict[str, Any]) -> dict[str, Any]:
  """Writes best/params_<step> (Orbax), then best.json naming it (atomic rename), then removes
  older params: a kill at any point leaves a best.json that names complete params."""
  best_dir = os.path.join(directory, 'best')
  best = {'step': int(step), 'params_dir': f'params_{step}',
          'metrics': {k: (float(v) if np.isfinite(v) else None) for k, v in values.items()}}
  state_lib.publish_params(best_dir, best['params_dir'],
                           {'params': state.params, 'batch_stats': state.batch_stats},
                           'best.json', best)
  return best


def restore_best(directory: str, best: dict[str, Any], state, state_sharding):
  target = {'params': state.params, 'batch_stats': state.batch_stats}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          target)
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(directory, 'best', best['params_dir']), abstract)
  return state.replace(params=restored['params'], batch_stats=restored['batch_stats'])


# ------------------------------------------------------------------------------------ loop


@dataclasses.dataclass
class Result:
  state: Any
  step: int
  history: list[tuple[int, float]]   # (logged step, train loss)
  stopped: bool                      # on_validate asked to stop before total_steps


def train(state, step_fn: Callable[[Any, Any], tuple[Any, Any]], batches: Iterable[Any], *,
          start_step: int, total_steps: int, log_every: int, checkpoints: Checkpoints,
          on_log: Callable[[int, dict[str, float], float], None],
          val_every: int = 0,
          on_validate: Callable[[int, Any], bool] | None = None,
          stopped: bool = False) -> Result:
  """Runs step_fn(state, batch) -> (state, metrics) from start_step to total_steps.

  Every log_every steps (and the last) the metrics become floats, the loss is checked and
  on_log(step, scalars, steps/s) writes them; every val_every steps (and the last)
  on_validate(step, state) validates and returns True to stop early; checkpoints are saved at
  the manager's interval, the last step and an early stop. Raises NonFiniteLossError,
  Preempted, or RuntimeError when the batches end before total_steps (stopped=True: a run that
  stopped early before, given no batches).
  """
  history: list[tuple[int, float]] = []
  step = start_step
  meter = progress.RateMeter(start_step)
  with _SigtermFlag() as preemption:
    for batch in batches:
      state, metrics = step_fn(state, batch)
      step += 1
      last = step == total_steps
      if step % log_every == 0 or last:
        scalars = progress.host_scalars(metrics)
        checkpoints.check_finite(state, step)
        history.append((step, scalars['loss']))
        on_log(step, scalars, meter.rate(step))
      if on_validate is not None and (step % val_every == 0 or last):
        checkpoints.check_finite(state, step)
        stopped = bool(on_validate(step, state)) and not last
      preempted = preemption.reached(step, checkpoints)
      checkpoints.save(step, state, force=last or stopped or preempted)
      if preempted:
        checkpoints.wait()
        raise Preempted(checkpoints.what, step, checkpoints.directory)
      if stopped:
        break
  checkpoints.wait()
  if step < total_steps and not stopped:
    raise RuntimeError(f'the {checkpoints.what} data loader stopped at step {step} of '
                       f'{total_steps}')
  return Result(state, step, history, stopped)
