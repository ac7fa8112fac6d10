"""Atomic file writes (a reader, or a rerun after a kill, sees the old file or the new one,
never half of one) and the comparison of a run's JSON record with a rerun's settings."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections


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


def read_json(path: str, fix: str) -> Any | None:
  """The JSON at path, or None when there is no file; a truncated or unreadable one is a
  ValueError naming the file, then `fix` (what the user should do)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not readable JSON ({e}); {fix}') from e


def as_json(tree: Any) -> Any:
  """A config (dict or ConfigDict) as it reads back from JSON: tuples become lists."""
  def plain(x):
    if isinstance(x, (ml_collections.ConfigDict, Mapping)):
      return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    return x
  return json.loads(json.dumps(plain(tree), default=float))


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """A nested mapping as {dotted key: leaf} ('optim.lr')."""
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def under(key: str, prefixes: Iterable[str]) -> bool:
  """Whether dotted `key` is one of `prefixes` or inside one ('optim.lr' is under 'optim')."""
  return any(key == p or key.startswith(p + '.') for p in prefixes)


def record_changes(old: Mapping[str, Any], new: Mapping[str, Any], *,
                   resumable: Iterable[str] = (),
                   compared: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
  """(refused, allowed): "key: old -> new" for each dotted key ('optim.lr') whose value differs
  between two records (nested mappings, or flat ones with dotted keys; a missing key reads
  '<absent>'), sorted by key. Only keys under `compared` (default: all) count; those under
  `resumable` are allowed, the others refused."""
  old, new = flatten(old), flatten(new)
  resumable = tuple(resumable)  # read once per key: a generator would be spent on the first
  compared = None if compared is None else tuple(compared)
  refused, allowed = [], []
  for key in sorted(set(old) | set(new)):
    before, after = old.get(key, '<absent>'), new.get(key, '<absent>')
    if before != after and (compared is None or under(key, compared)):
      (allowed if under(key, resumable) else refused).append(f'{key}: {before!r} -> {after!r}')
  return refused, allowed
