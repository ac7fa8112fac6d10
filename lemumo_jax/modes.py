"""What `python -m lemumo_jax.main` runs and where: config.mode values and the default workdir.

Kept apart from main.py, which defines absl flags at import, so that tests and tools can use
these without defining main's flags in their process.
"""

from __future__ import annotations

import os

# config.mode values; main.py dispatches on them.
MODES = ('pretrain', 'probe', 'pretrain_probe', 'finetune', 'profile', 'analyze')


def default_workdir(config_path: str, method: str) -> str:
  """runs/<config file stem>_<method>[_<regime>] (path:<row>,<regime> or
  path:row=<row>,regime=<regime>)."""
  path, _, arg = config_path.partition(':')
  stem = os.path.splitext(os.path.basename(path))[0]
  if '=' in arg:  # big_vision style: row=<row>,regime=<regime>
    regime = dict(p.partition('=')[::2] for p in arg.split(',')).get('regime', '')
  else:
    regime = arg.partition(',')[2]
  return os.path.join('runs', f'{stem}_{method}' + (f'_{regime}' if regime else ''))
