"""Comparison tables across probe runs, in the paper's layout (best bold, second underlined).

  python -m lemumo_jax.evaluation.compare runs/synthetic_lemumo/probe \
      runs/synthetic_lemumo/probe_random --out=runs/table1.md

Each argument is a probe directory holding report.json (or the report.json itself); rows keep
the order given. Writes the markdown table to --out (and the rows to the same path with .json)
and prints it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import app, flags

from lemumo_jax import files
from lemumo_jax.evaluation import report

_OUT = flags.DEFINE_string('out', None, 'Write the table here (markdown; rows also as .json).')
_TITLE = flags.DEFINE_string('title', 'Frozen patch probes', 'Table caption.')


def load_rows(paths: Sequence[str]) -> list[report.ReportRow]:
  rows = []
  for path in paths:
    file = os.path.join(path, 'report.json') if os.path.isdir(path) else path
    if not os.path.exists(file):
      raise FileNotFoundError(f'{file} not found: run the probe stage (--config.mode=probe) for '
                              f'{path} first')
    rows.append(report.read_report(file))
  return rows


def write_table(rows: Sequence[report.ReportRow], out: str, title: str) -> str:
  table = report.markdown_table(rows, mark_best=True)
  text = f'{title}\n\n{table}\n'
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  for path, payload in ((out, text), (os.path.splitext(out)[0] + '.json', json.dumps(
      [{'method': r.method, 'training_data': r.training_data, 'table': report.table_values(r)}
       for r in rows], indent=2))):
    files.write_text_atomic(path, payload)
  return table


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('give one or more probe directories (or report.json files)')
  rows = load_rows(argv[1:])
  table = write_table(rows, _OUT.value, _TITLE.value) if _OUT.value else report.markdown_table(
      rows, mark_best=True)
  print(table)


if __name__ == '__main__':
  app.run(main)
