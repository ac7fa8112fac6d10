"""What the per-row benchmarks (step.py, aot.py) share: a row's config, one child process per
row (device peak memory and compiler state are process-wide), and table cells."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def check_rows(rows) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  unknown = [row for row in rows if row not in common.METHODS]
  if unknown:
    raise app.UsageError(f'--rows: unknown rows {unknown}; choose from {common.method_names()}')


def row_config(base, row: str, batch_size: int | None):
  """configs/common.py METHODS[row] applied on top of the --config value `base`."""
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.apply_method(base.copy_and_resolve_references(), row)
  if batch_size is not None:
    config.train.batch_size = batch_size
  return config


def child_argv(module: str, replaced: dict[str, str], result_file: str) -> list[str]:
  """This command line for `python -m module` in a child: the flags named in `replaced` (and
  --isolate, --result_file) dropped and set to the given values, --noisolate added."""
  own = (*replaced, 'result_file')
  argv, skip = [], False
  for arg in sys.argv[1:]:
    if skip:
      skip = False
      continue
    name = arg.lstrip('-').split('=')[0]
    if name in own:
      skip = '=' not in arg
      continue
    if name in ('isolate', 'noisolate'):
      continue
    argv.append(arg)
  return [sys.executable, '-m', module, *argv, *(f'--{k}={v}' for k, v in replaced.items()),
          '--noisolate', f'--result_file={result_file}']


def run_child(module: str, replaced: dict[str, str], label: str) -> dict:
  """Runs child_argv(...) and returns the one result it wrote; a failure names `label`."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'row.json')
    child = subprocess.run(child_argv(module, replaced, path), capture_output=True, text=True,
                           check=False)
    if child.returncode != 0:
      raise RuntimeError(f'{label} failed (exit {child.returncode}):\n{child.stderr[-4000:]}')
    with open(path) as f:
      return json.load(f)[0]


def measure_all(module: str, jobs, measure, isolate: bool, quiet: bool) -> list[dict]:
  """One result per job (replaced flags, label, measure's arguments): in a child process
  (run_child) when `isolate`, else measure(*arguments) here; a progress line per job unless
  `quiet` (a child's own run)."""
  results = []
  for replaced, label, arguments in jobs:
    result = run_child(module, replaced, label) if isolate else measure(*arguments)
    results.append(result)
    if not quiet:
      print(f'{label}: done' + (f', compiled in {result["compile_s"]:.0f} s'
                                if 'compile_s' in result else ''), flush=True)
  return results


def write_results(results: list[dict], result_file: str | None, json_out: str | None) -> bool:
  """A child writes its results to --result_file (True: it is done); the parent also writes
  them to --json_out when given (False: it goes on to print its table)."""
  if result_file is not None:
    with open(result_file, 'w') as f:
      json.dump(results, f)
    return True
  if json_out:
    with open(json_out, 'w') as f:
      json.dump(results, f, indent=2)
  return False


def ratio(value, reference):
  if value is None or reference in (None, 0):
    return None
  return value / reference


def fmt(value, spec: str) -> str:
  return 'n/a' if value is None else format(value, spec)
