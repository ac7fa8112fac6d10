"""Probe-stage cost with and without probe.cache_features; prints a table last.

  python -m benchmarks.probe_cache          # configs/synthetic.py, the random-init encoder
  python -m benchmarks.probe_cache --steps=16,48 --config.probe.encoder=pretrained \
      --config.probe.encoder_dir=/tmp/run/encoder    # an encoder a pretraining run exported

For each setting of cache_features, the whole probe stage (training.probe.run) runs twice in
this process, for the two --steps counts, validating and checkpointing only at the end. The
difference of the two wall times over the difference of the step counts is the cost of one
training step, from the loader to the update (render + encoder + heads uncached; a gather from
host memory + heads cached); the rest of the shorter run is the fixed cost (compilation, the
cache build, the validation passes, the report). Absolute times are only meaningful on the
hardware they ran on; the ratios between the two rows are what carry over.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'Config file.',
                                          lock_config=True)
_STEPS = flags.DEFINE_list('steps', ['16', '80'], 'Two probe step counts, short then long.')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Also write the rows as JSON to this path.')


def _timed_run(config, workdir: str) -> float:
  from lemumo_jax.training import probe  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  probe.run(config, workdir)
  return time.perf_counter() - start


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  short, long = (int(s) for s in _STEPS.value)
  if not 0 < short < long:
    raise app.UsageError(f'--steps={",".join(_STEPS.value)}: want two counts, short < long')
  base = _CONFIG.value.copy_and_resolve_references()
  if base.probe.encoder == 'pretrained' and base.probe.encoder_dir:
    base.probe.encoder_dir = os.path.abspath(base.probe.encoder_dir)
  if base.probe.encoder == 'pretrained' and not base.probe.encoder_dir:
    raise app.UsageError('--config.probe.encoder=pretrained needs --config.probe.encoder_dir')
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for cached in (False, True):
      walls = {}
      for steps in (short, long):
        config = base.copy_and_resolve_references()
        config.probe.update(cache_features=cached, num_steps=steps, val_every=steps,
                            checkpoint_every=steps, log_every=steps)
        # A fresh workdir per run: the probe resumes from <workdir>/probe*.
        walls[steps] = _timed_run(config, os.path.join(tmp, f'{cached}_{steps}'))
      step_s = (walls[long] - walls[short]) / (long - short)
      rows.append({'cache_features': cached, 'step_s': step_s,
                   'fixed_s': walls[short] - short * step_s,
                   'wall_s': walls, 'batch_size': base.probe.batch_size})
  for row in rows:
    row['step_ratio'] = row['step_s'] / rows[0]['step_s']
  print(f'\n{base.data.name} probe on {jax.device_count()} x {jax.devices()[0].platform}; '
        f'encoder {base.probe.encoder}, batch {base.probe.batch_size}, views '
        f'{tuple(base.probe.image_size)}, heads {tuple(base.probe.heads)}; steps {short} and {long}')
  print('\n| cache_features | s / step | fixed s | wall s (short, long) | step / uncached |')
  print('|---|---:|---:|---|---:|')
  for row in rows:
    print(f'| {row["cache_features"]} | {row["step_s"]:.3f} | {row["fixed_s"]:.1f} | '
          f'{row["wall_s"][short]:.1f}, {row["wall_s"][long]:.1f} | {row["step_ratio"]:.2f} |')
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  app.run(main)
