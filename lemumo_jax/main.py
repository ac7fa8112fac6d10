"""Entry point: `python -m lemumo_jax.main --config=configs/synthetic.py[:row] --workdir=DIR`.

Config values are overridden on the command line (`--config.train.batch_size=8`); an unknown
key is an error. `config.mode` selects what runs:
  pretrain         self-supervised pretraining; exports <workdir>/encoder
  probe            frozen patch probes on <workdir>/encoder (or config.probe.encoder_dir; or a
                   frozen random encoder with config.probe.encoder=random) -> report.md
  pretrain_probe   both, in order (the synthetic default)
"""

from __future__ import annotations

import os

# TensorFlow is imported only for clu's TensorBoard writer; keep its C++ start-up lines out.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/synthetic.py', 'Config file, optionally with :<paper row>.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Checkpoints, TensorBoard and reports go here; a rerun resumes from it. '
    'Default: runs/<config file stem>_<method>.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() first (multi-host runs; the '
    'launch/ scripts set this).')

MODES = ('pretrain', 'probe', 'pretrain_probe')


def default_workdir(config_path: str, method: str) -> str:
  stem = os.path.splitext(os.path.basename(config_path.split(':')[0]))[0]
  return os.path.join('runs', f'{stem}_{method}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  config = _CONFIG.value
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every checkpoint step at INFO; the progress line says what matters.
    logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS['config'].config_filename,
                                              config.method)
  if config.mode not in MODES:
    raise app.UsageError(f'config.mode must be one of {MODES}, got {config.mode!r}')
  if config.mode in ('pretrain', 'pretrain_probe'):
    from lemumo_jax.training import pretrain  # pylint: disable=g-import-not-at-top
    pretrain.train(config, workdir)
  if config.mode in ('probe', 'pretrain_probe'):
    from lemumo_jax.training import probe  # pylint: disable=g-import-not-at-top
    probe.run(config, workdir)


if __name__ == '__main__':
  app.run(main)
