"""The run layout paper_tables and claims share: one lemumo_jax.main workdir per (row, seed)
under an --out_dir, where its report lies, the flags that made it, running it, and the paired
seed statistics."""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from lemumo_jax import files

FROZEN, TRANSFER, FINETUNE = ':frozen', ':transfer', ':finetune'
KINDS = ('', FROZEN, TRANSFER, FINETUNE)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def split_row(row: str) -> tuple[str, str]:
  """'<row>[:<kind>]' -> (row, kind) with kind one of KINDS; an unknown kind is a ValueError."""
  base, sep, kind = row.partition(':')
  kind = sep + kind
  if kind not in KINDS:
    raise ValueError(f'row {row!r}: the part after the row name must be one of '
                     f'{[k for k in KINDS if k]}')
  return base, kind


def run_dir(out_dir: str, row: str, seed: str) -> str:
  return os.path.join(out_dir, f'{row.replace(":", "_")}_seed{seed}')


def report_path(workdir: str, row: str) -> str:
  stage = {'': 'probe', FROZEN: 'probe_random', TRANSFER: 'probe', FINETUNE: 'finetune'}
  return os.path.join(workdir, stage[split_row(row)[1]], 'report.json')


# Each workdir records the paper_tables arguments its runs were made with. A finished run is
# skipped on a rerun, so without the record a rerun with other flags (another probe schedule,
# say) would put runs of two settings into one table, or pair them in a claim, silently.
INVOCATION_FILE = 'paper_tables_args.json'


def invocation(config: str, extra: Sequence[str],
               transfer_from: str | None = None) -> dict[str, Any]:
  """What a run's numbers depend on from the paper_tables call that made it: the --config
  file, the flags passed to lemumo_jax.main (after --) and, for ':transfer' / ':finetune'
  rows, the --transfer_from out_dir."""
  record = {'config': os.path.normpath(config), 'extra': list(extra)}
  if transfer_from:
    record['transfer_from'] = os.path.abspath(transfer_from)
  return record


def _flag_values(extra: Sequence[str]) -> dict[str, str]:
  """['--config.a=1', '--config.b', '2', '--x'] -> {'config.a': '1', 'config.b': '2', 'x': ''}
  (the last value of a repeated flag wins, as in absl)."""
  values, i = {}, 0
  while i < len(extra):
    arg = extra[i]
    name, sep, value = arg.lstrip('-').partition('=')
    if not sep and i + 1 < len(extra) and not extra[i + 1].startswith('-'):
      value, i = extra[i + 1], i + 1
    values[name] = value
    i += 1
  return values


def resumable_flags() -> tuple[str, ...]:
  """config keys (dotted, 'train.log_every') that change how lemumo_jax.main runs, not what
  it computes: the keys its stages let a resumed run change."""
  from lemumo_jax.training import finetune, pretrain, probe  # imports jax: only when needed
  return (*pretrain.RESUMABLE, *probe.RESUMABLE, *finetune.RESUMABLE)


def invocation_changes(recorded: Mapping[str, Any], current: Mapping[str, Any],
                       resumable: Sequence[str]) -> tuple[list[str], list[str]]:
  """(refused, allowed): '--flag: old -> new' for each difference between two invocation()
  records (files.record_changes); allowed are the --config.<key> flags with a key in
  `resumable`."""
  def flags(record):
    return {'--config': record.get('config'), '--transfer_from': record.get('transfer_from'),
            **{f'--{k}': v for k, v in _flag_values(record.get('extra', ())).items()}}
  return files.record_changes(flags(recorded), flags(current),
                              resumable=[f'--config.{key}' for key in resumable])


def check_invocations(made: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
  """made: (workdir, its invocation() now) pairs. Before anything runs: SystemExit naming the
  workdir and each changed flag when a run was made with other arguments; returns the
  workdirs that hold a run but no record (made before paper_tables kept one: their flags
  cannot be checked)."""
  unrecorded, resumable = [], None
  for workdir, current in made:
    if not holds_run(workdir):
      continue
    recorded = read_invocation(workdir)
    if recorded is None:
      unrecorded.append(workdir)
      continue
    if resumable is None:
      resumable = resumable_flags()
    refused, _ = invocation_changes(recorded, current, resumable)
    if refused:
      raise SystemExit(
          f'{workdir} was made by paper_tables with other arguments ({"; ".join(refused)}). '
          f'A finished run is not run again, so it would be tabled beside runs of these '
          f'arguments: pass the same ones, or use another --out_dir')
  return unrecorded


def command_config(cmd: Sequence[str]):
  """The config lemumo_jax.main builds from `cmd` ([python, -m, lemumo_jax.main, flags...]):
  its --config=<file>:<row> and --config.<key> flags, parsed by ml_collections as main parses
  them."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  argv = ['lemumo_jax.main', *(f'--{name}={value}' for name, value in _flag_values(cmd[3:]).items()
                                if name == 'config' or name.startswith('config.'))]
  values = absl_flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'the run config', flag_values=values,
                                  sys_argv=argv)  # the overrides are read from sys_argv
  values(argv)
  return values.config


def tabled_differences(workdir: str, row: str, config) -> list[str]:
  """'<record>: key: recorded -> claimed' for each setting a finished run's records (the
  pretraining's config.json, the probe's or fine-tune's) hold otherwise than `config`, the
  config the table says the run was made with (command_config); keys that change how a run
  ran, not what it computed (resumable_flags), are not compared."""
  from lemumo_jax import files as files_lib  # pylint: disable=g-import-not-at-top
  from lemumo_jax.training import pretrain  # pylint: disable=g-import-not-at-top
  kind = split_row(row)[1]
  stage_dir = os.path.dirname(report_path(workdir, row))
  records = [(os.path.join(stage_dir, 'config.json'),
              ('seed', 'model', 'finetune', 'data') if kind == FINETUNE
              else ('seed', 'data', 'probe'))]
  if kind == '':
    records.append((os.path.join(workdir, 'config.json'), pretrain.run_sections(config)))
  claimed = files_lib.flatten(files_lib.as_json(config))
  differences, resumable = [], resumable_flags()
  for path, sections in records:
    recorded = files_lib.read_json(path, f'it records the run in {workdir}; restore it, or '
                                   'remove the run')
    if recorded is None:
      continue
    old = {k: v for k, v in files_lib.flatten(recorded).items() if files_lib.under(k, sections)}
    refused, _ = files_lib.record_changes(old, {k: claimed.get(k, '<absent>') for k in old},
                                          resumable=resumable)
    differences += [f'{os.path.relpath(path, workdir)}: {change}' for change in refused]
  return differences


def holds_run(workdir: str) -> bool:
  """Whether anything but the record is there (a call that failed before its run wrote a thing,
  a mistyped flag say, leaves a record the next call may replace)."""
  return os.path.isdir(workdir) and bool(set(os.listdir(workdir)) - {INVOCATION_FILE})


def read_invocation(workdir: str) -> dict[str, Any] | None:
  return files.read_json(os.path.join(workdir, INVOCATION_FILE),
                         f'it records the paper_tables arguments the run in {workdir} was made '
                         f'with; restore it, or remove the run')


def git_commit() -> str:
  """This checkout's short commit ('+' when it has uncommitted changes), or 'unknown'."""
  def git(*args):
    return subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True).stdout
  commit = git('rev-parse', '--short', 'HEAD').strip()
  if not commit:
    return 'unknown'
  return commit + ('+' if git('status', '--porcelain', '--untracked-files=no').strip() else '')


def record_invocation(workdir: str, current: Mapping[str, Any]) -> None:
  """Before a run starts (or resumes): the arguments it is made with and, under 'commits', the
  commit of every checkout that worked on it, by atomic rename. Only resume-compatible changes
  can reach here (check_invocations); they are printed."""
  recorded = read_invocation(workdir) if holds_run(workdir) else None
  commits = list((recorded or {}).get('commits', []))
  commit = git_commit()
  updated = dict(current, commits=commits + [commit] * (commit not in commits))
  if recorded == updated:
    return
  if recorded is not None:
    _, allowed = invocation_changes(recorded, current, resumable_flags())
    if allowed:
      print(f'{workdir}: resuming with changed settings (resume-compatible): '
            f'{"; ".join(allowed)}', flush=True)
  os.makedirs(workdir, exist_ok=True)
  files.write_json_atomic(os.path.join(workdir, INVOCATION_FILE), updated)


def paired_summary(gains: Sequence[float]) -> dict[str, Any]:
  """Per-seed gains (positive = better) -> mean, two-sided 95% t-interval of the mean (n - 1
  degrees of freedom; nan from one seed), seeds won and seeds."""
  n = len(gains)
  mean = float(np.mean(gains)) if n else float('nan')
  low = high = float('nan')
  if n > 1:
    half = stats.t.ppf(0.975, n - 1) * float(np.std(gains, ddof=1)) / math.sqrt(n)
    low, high = mean - half, mean + half
  return {'gains': [float(g) for g in gains], 'mean': mean, 'ci95': [low, high],
          'wins': int(sum(g > 0 for g in gains)), 'seeds': n}


def _die_with_parent():
  """A preexec_fn for the children: SIGTERM when the parent dies (Linux PR_SET_PDEATHSIG), so
  a killed paper_tables leaves no run writing on; lemumo_jax.main takes SIGTERM as a
  preemption (checkpoint, exit). libc is loaded here, in the parent: the child, forked from a
  process with threads, only calls the resolved function. None where there is no prctl (the
  workdir locks still refuse a second writer)."""
  try:
    prctl = ctypes.CDLL('libc.so.6', use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  parent = os.getpid()

  def preexec() -> None:
    prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the parent died before prctl took effect
      os._exit(1)  # pylint: disable=protected-access

  return preexec


def check_free(workdirs: Sequence[str]) -> None:
  """Exits naming the holders when a process (a child of an earlier, killed call) still runs
  a stage in any of `workdirs`."""
  from lemumo_jax import locks  # pylint: disable=g-import-not-at-top
  busy = [(w, stage, info) for w in workdirs for stage, info in locks.busy_stages(w).items()]
  if busy:
    listed = '; '.join(f'{w} ({stage}: {locks.describe(info)})' for w, stage, info in busy)
    raise SystemExit(f'run folder(s) in use by another process: {listed}. Stop it (an earlier '
                     'call\'s run) or wait for it, then rerun this command to resume')


def run_command(cmd: Sequence[str], label: str, env: Mapping[str, str]) -> None:
  print(f'[{label}] {" ".join(cmd[1:])}', flush=True)
  proc = subprocess.run(cmd, cwd=REPO, env=env, preexec_fn=_die_with_parent())
  if proc.returncode:
    raise SystemExit(f'[{label}] failed (exit {proc.returncode}); rerun the same command to '
                     f'resume it')
