"""The loop every training stage runs: pretraining, probes, fine-tuning.

A stage builds its state, jitted step and batch iterator, then calls `train`, which owns what
must be the same everywhere:
  - the NaN/Inf check (`Checkpoints.check_finite`): at every logged, validated and saved step;
    it waits for in-flight saves and names the last finished checkpoint (or says there is none);
  - checkpoint saving (`Checkpoints.save`): Orbax, asynchronous, never of a non-finite state;
  - preemption: on SIGTERM (a Slurm time limit, a TPU preemption) the loop saves the step it
    is at and raises `Preempted`; main exits with EX_TEMPFAIL (75) and a rerun resumes;
  - progress lines (step, rate, ETA) through the stage's `on_log`, the rate measured by clu's
    `periodic_actions.ReportProgress`; validation through `on_validate`;
  - keep-best (`KeepBest`, probes and fine-tuning): an Orbax manager ranking by `best_fn`.
`check_run_config` is the one comparison of a stage's settings against the run already in its
directory: the keys a resumed run may change are logged, every other difference is refused
with the keys named, and nothing is written before the config is validated.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
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


# Input-pipeline knobs: how fast the data arrives, never which batches (batch i is a function of
# the seed and i), so a resumed pretraining or probe run may change them.
LOADER_KEYS = ('data.num_threads', 'data.prefetch', 'data.num_workers')


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
    refused, allowed = files.record_changes(previous, current, resumable=resumable,
                                            compared=compared)
    if refused:
      raise ValueError(f'{os.path.dirname(path)} holds a run with other settings '
                       f'({"; ".join(refused)}); {fix}')
    if not allowed or not record:
      return
    print('Resuming with changed settings (resume-compatible): ' + '; '.join(allowed),
          flush=True)
    current = dict(previous, **current)
  if record and jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_json_atomic(path, current)


# ---------------------------------------------------------------------------- checkpoints


class Checkpoints:
  """A stage's Orbax CheckpointManager with the loop's rules: a non-finite state is never
  saved, a NaN stop names a finished checkpoint, and a resumed state is verified against the
  digest saved with it (state.state_digest: ~0.6 s per 264 MB of state on one CPU core)."""

  def __init__(self, directory: str, every: int, keep: int, what: str, nan_hint: str):
    self.what, self.nan_hint, self.every = what, nan_hint, every
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                           create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(directory), 'checkpoints'),
                                         options=options)

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def _digest_path(self, step: int) -> str:
    return os.path.join(os.path.dirname(self.directory), 'checkpoint_digests', f'{step}.json')

  def restore_or_init(self, init_fn, init_args: tuple, sharding) -> tuple[Any, int, Any]:
    """(state, start step, state shardings): the latest checkpoint, else a fresh state. A
    restored state must match the digest saved with it (checkpoint_digests/<step>.json,
    written before the checkpoint: a checkpoint without one predates digests, or its save
    found the state sharded over hosts)."""
    state, start, shardings = state_lib.restore_or_init(self.manager, init_fn, init_args,
                                                        sharding, self.what)
    if start:
      path = self._digest_path(start)
      recorded = files.read_json(path, f'it holds the digest of checkpoint {start}; remove it '
                                       'to resume unverified')
      found = state_lib.state_digest(state) if recorded else None
      if found is not None and found != recorded['state_sha256']:
        raise ValueError(
            f'checkpoint {os.path.join(self.directory, str(start))} does not match the digest '
            f'saved with it in {path} ({found[:12]} != {recorded["state_sha256"][:12]}): its '
            'files are damaged or were replaced; move that folder away to resume from the '
            'checkpoint before it')
    return state, start, shardings

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
    # The digest is written before the save, so it exists by the time the checkpoint does.
    digest = state_lib.state_digest(state)
    folder = os.path.dirname(self._digest_path(step))
    if digest is not None and jax.process_index() == 0:
      os.makedirs(folder, exist_ok=True)
      files.write_json_atomic(self._digest_path(step), {'step': int(step),
                                                        'state_sha256': digest})
    self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    kept = self.manager.all_steps()
    # The digests of checkpoints Orbax has removed (max_to_keep) go too.
    if kept and os.path.isdir(folder) and jax.process_index() == 0:
      for name in os.listdir(folder):
        if name.endswith('.json') and name[:-5].isdigit() and int(name[:-5]) < min(kept):
          os.remove(os.path.join(folder, name))

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


def is_better(values: Mapping[str, Any], best: Mapping[str, Any] | None, select_by: str) -> bool:
  """Whether a validation beats the best so far (strictly; a missing or non-finite value never
  wins, and beats a best that has none). select_by 'loss': lower is better, else higher."""
  if best is None:
    return True
  new, old = values.get(select_by), best['metrics'].get(select_by)
  if new is None or not np.isfinite(new):
    return False
  if old is None or not np.isfinite(old):
    return True
  return new < old if select_by == 'loss' else new > old


# The kept best's metrics entry holding its params' fingerprint (state.params_fingerprint).
DIGEST_KEY = 'params_sha256'


class KeepBest:
  """<stage dir>/best/: the best validation's params and metrics, an Orbax CheckpointManager
  that ranks its steps by `best_fn` (metrics[select_by]) in `best_mode` and keeps one.

  A validation is saved only when it beats the best (`is_better`); Orbax writes it to a
  temporary folder, renames it, then removes the step it beat, so a kill at any moment leaves
  a finished best (and the next run removes the temporary folder). Non-finite metrics are
  stored as null and rank last. The params' fingerprint is saved with them and checked on
  restore (a damaged or replaced best is refused, named; ~0.3 s per 100 MB of params).
  """

  def __init__(self, stage_dir: str, select_by: str = 'loss'):
    self.select_by = select_by
    mode = 'min' if select_by == 'loss' else 'max'
    worst = np.inf if mode == 'min' else -np.inf

    def best_fn(metrics: Mapping[str, Any]) -> float:
      value = metrics.get(select_by)
      return worst if value is None else float(value)

    self.directory = os.path.join(os.path.abspath(stage_dir), 'best')
    options = ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=best_fn, best_mode=mode,
                                           keep_checkpoints_without_metrics=False, create=True,
                                           cleanup_tmp_directories=True)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
      self._adopt_legacy()
      step = self.manager.best_step()
      if step is None and self.manager.all_steps():  # Orbax ranks no step without metrics
        raise ValueError(f'no readable metrics in step(s) {self.manager.all_steps()}')
      self.best, self._digest = None, None
      if step is not None:
        metrics = dict(self.manager.metrics(step))
        self._digest = metrics.pop(DIGEST_KEY, None)  # None: kept before digests were
        self.best = {'step': step, 'metrics': metrics}
    except state_lib.UNREADABLE as e:
      raise self._unreadable(e) from e

  def _unreadable(self, error: Exception) -> ValueError:
    return ValueError(f'{self.directory} holds a kept best that cannot be read '
                      f'({type(error).__name__}: {str(error)[:300]}); if it is damaged, move '
                      f'it away and rerun: the final state is then validated and kept as the '
                      f'best')

  def _adopt_legacy(self) -> None:
    """Moves a best kept by earlier versions (best/best.json naming best/params_<step>) into
    the manager, so its validation stays the reported one instead of being lost."""
    legacy = os.path.join(self.directory, 'best.json')
    old = files.read_json(legacy, f'remove {self.directory} and rerun: the final state is '
                                  f'validated again')
    if old is not None:
      if old['step'] not in self.manager.all_steps():
        self._save(old['step'], ocp.StandardCheckpointer().restore(
            os.path.join(self.directory, old['params_dir'])), old['metrics'])
      if jax.process_index() == 0:
        os.remove(legacy)
    if jax.process_index() == 0 and not os.path.exists(legacy):
      for name in os.listdir(self.directory):
        if name.startswith('params_'):
          shutil.rmtree(os.path.join(self.directory, name))

  @property
  def step(self) -> int | None:
    return None if self.best is None else self.best['step']

  @property
  def params_dir(self) -> str:
    """The folder of the best params ({'params', 'batch_stats'}, Orbax StandardSave)."""
    return os.path.join(self.directory, str(self.step), 'default')

  def is_better(self, values: Mapping[str, Any]) -> bool:
    return is_better(values, self.best, self.select_by)

  def save(self, step: int, state, values: Mapping[str, Any]) -> None:
    """Keeps this validation as the best."""
    metrics = {k: (float(v) if np.isfinite(v) else None) for k, v in values.items()}
    self._save(step, {'params': state.params, 'batch_stats': state.batch_stats}, metrics)
    self.best = {'step': int(step), 'metrics': metrics}

  def _save(self, step: int, variables: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
    """Waits until the save is on disk: the training checkpoint of this step, saved next, must
    never be resumed from with this best lost. The params' fingerprint goes into the step's
    metrics (written in the same atomic step folder), for restore to verify."""
    self._digest = state_lib.params_fingerprint(dict(variables))
    self.manager.save(step, args=ocp.args.StandardSave(dict(variables)),
                      metrics={**metrics, DIGEST_KEY: self._digest}, force=True)
    self.manager.wait_until_finished()

  def restore(self, state):
    """`state` with the best params and batch_stats, in its own shardings."""
    target = {'params': state.params, 'batch_stats': state.batch_stats}
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    try:
      restored = self.manager.restore(self.step, args=ocp.args.StandardRestore(abstract))
    except state_lib.UNREADABLE as e:
      raise self._unreadable(e) from e
    if self._digest is not None:
      found = state_lib.params_fingerprint(restored)
      if found != self._digest:
        raise self._unreadable(ValueError(
            f'its params do not match the fingerprint saved with them ({found[:12]} != '
            f'{self._digest[:12]}): the files are damaged or were replaced'))
    return state.replace(params=restored['params'], batch_stats=restored['batch_stats'])


# ------------------------------------------------------------------------------------ loop


def _report_progress(total_steps: int, log_every: int, writer):
  """clu's ReportProgress every log_every steps and at the last, keeping the steps/s it
  measured for the stage's progress line (`.rate`)."""
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

  class ReportProgress(periodic_actions.ReportProgress):
    rate = float('nan')

    def _apply(self, step: int, t: float):
      self.rate = (step - self._previous_step) / max(t - self._previous_time, 1e-9)
      super()._apply(step, t)

  return ReportProgress(num_train_steps=total_steps, writer=writer, every_steps=log_every,
                        every_secs=None)


@dataclasses.dataclass
class Result:
  state: Any
  step: int
  history: list[tuple[int, float]]   # (logged step, train loss)
  stopped: bool                      # on_validate asked to stop before total_steps


def train(state, step_fn: Callable[[Any, Any], tuple[Any, Any]], batches: Iterable[Any], *,
          start_step: int, total_steps: int, log_every: int, checkpoints: Checkpoints,
          on_log: Callable[[int, dict[str, float], float], None], writer=None,
          val_every: int = 0,
          on_validate: Callable[[int, Any], bool] | None = None,
          stopped: bool = False) -> Result:
  """Runs step_fn(state, batch) -> (state, metrics) from start_step to total_steps.

  Every log_every steps (and the last) the metrics become floats, the loss is checked and
  on_log(step, scalars, steps/s) writes them (the rate measured by clu's ReportProgress, which
  also writes steps_per_sec and uptime to `writer`); every val_every steps (and the last)
  on_validate(step, state) validates and returns True to stop early; checkpoints are saved at
  the manager's interval, the last step and an early stop. Raises NonFiniteLossError,
  Preempted, or RuntimeError when the batches end before total_steps (stopped=True: a run that
  stopped early before, given no batches).
  """
  history: list[tuple[int, float]] = []
  step = start_step
  report = _report_progress(total_steps, log_every, writer)
  report(start_step)  # starts the clock: the first step is measured too
  with _SigtermFlag() as preemption:
    for batch in batches:
      state, metrics = step_fn(state, batch)
      step += 1
      last = step == total_steps
      if report(step):  # every log_every steps and the last
        scalars = progress.host_scalars(metrics)
        checkpoints.check_finite(state, step)
        history.append((step, scalars['loss']))
        on_log(step, scalars, report.rate)
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
