"""Atomic file writes: a reader (or a rerun after a kill) sees the old file or the new one,
never half of one."""

from __future__ import annotations

import json
import os
from typing import Any


def write_text_atomic(path: str, text: str) -> None:
  """Writes text to path.tmp, then renames it over path (the tmp is left on a kill, never read)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_json_atomic(path: str, payload: Any) -> None:
  """JSON (indent 2; tuples as lists, numpy scalars as floats) by write_text_atomic."""
  write_text_atomic(path, json.dumps(payload, indent=2, default=_plain))


def _plain(value: Any) -> Any:
  if isinstance(value, (tuple, set, frozenset)):
    return list(value)
  return float(value)
