"""What `python -m lemumo_jax.main` runs and where: config.mode values and the default workdir.

Kept apart from main.py, which defines absl flags at import, so that tests and tools can use
these without defining main's flags in their process.
"""

from __future__ import annotations

import collections
import os
import re
import sys

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


def repeated_tuple_overrides(argv: list[str], config) -> list[str]:
  """The tuple-valued config keys given more than once as --config.<key>=... in argv.

  ml_collections appends a tuple override given twice (--config.probe.heads twice trains the
  union of both lists), while a repeated scalar simply takes the last value (which
  benchmarks/paper_tables.py relies on to set config.mode after the user's flags).
  """
  counts = collections.Counter(arg[len('--config.'):].split('=', 1)[0] for arg in argv
                               if arg.startswith('--config.'))
  repeated = []
  for key, count in counts.items():
    node = config
    try:
      for part in key.split('.'):
        node = node[part]
    except (KeyError, AttributeError, TypeError):
      continue  # an unknown key is config_flags' error
    if count > 1 and isinstance(node, (tuple, list)):
      repeated.append(key)
  return sorted(repeated)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run's flags_parser) with an unknown --config.<key> named.

  ml_collections raises a bare KeyError / AttributeError traceback from inside the flag parser
  for a key the config does not have (`--config.profile.warmup`, `--config.nosuch`); this
  exits with the flags error absl gives any other bad flag, naming the argument.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:
    text = str(e)
    found = re.search(r"'([^'\\]+)", text)
    name = found.group(1) if found else text
    overrides = [a.split('=', 1)[0].lstrip('-') for a in argv[1:]
                 if a.lstrip('-').startswith('config.')]
    given = [a for a in overrides if name in a.split('.')[1:]] or overrides
    arg = f'--{given[0]}' if given else 'a --config.<key> flag'
    hint = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', text)
    sys.stderr.write(f'FATAL Flags parsing error: {arg}: the config has no key {name!r}'
                     f'{" (" + hint.group(0) + ")" if hint else ""}; every --config.<key> '
                     f'must be a key the config file defines (configs/common.py)\n')
    sys.exit(1)
