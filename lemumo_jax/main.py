"""Entry point: `python -m lemumo_jax.main --config=configs/synthetic.py[:row] --workdir=DIR`.

Config values are overridden on the command line (`--config.train.batch_size=8`); an unknown
key is an error. `config.mode` selects what runs:
  pretrain         self-supervised pretraining; exports <workdir>/encoder
  probe            frozen patch probes on <workdir>/encoder (or config.probe.encoder_dir; or a
                   frozen random encoder with config.probe.encoder=random; or no encoder,
                   the raw input patches, with config.probe.encoder=raw) -> report.md
  pretrain_probe   both, in order (the synthetic default)
  finetune         end-to-end fine-tuning of an exported encoder (config.finetune.encoder_dir,
                   default <workdir>/encoder) with a detection decoder -> <workdir>/finetune
  profile          the compute profile of the config's train step (paper Table 6: time, SSL
                   FLOPs, peak memory) -> <workdir>/profile.json; trains nothing
  analyze          Figure 3 (section 4.6): t-SNE of the frozen encoder's patch embeddings
                   (config.probe.encoder_dir, default <workdir>/encoder) on the val split, with
                   10-NN class purity and a planar depth fit, beside config.analyze.reference_dir
                   -> <workdir>/analysis/{figure3.png, analysis.json}

Preemption: on SIGTERM (a Slurm time limit or preemption, a TPU preemption notice) the running
stage checkpoints the step it is at and the process exits with status 75 (EX_TEMPFAIL); the same
command resumes it.

Multi-host (launch/): --distributed calls jax.distributed.initialize(), which finds the
coordinator, process count and process id itself under Slurm, Open MPI and on Cloud TPU VMs;
elsewhere pass --coordinator_address, --num_processes and --process_id (or the
JAX_COORDINATOR_ADDRESS environment variable for the first).
"""

from __future__ import annotations

import contextlib
import os
import sys

# TensorFlow is imported only for clu's TensorBoard writer; keep its C++ start-up lines out.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from lemumo_jax import modes

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/synthetic.py', 'Config file, optionally with :<paper row>.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Checkpoints, TensorBoard and reports go here; a rerun resumes from it. '
    'Default: runs/<config file stem>_<method>.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() first (multi-host runs; the '
    'launch/ scripts set this).')

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'With --distributed: host:port of process 0\'s coordinator '
    'service. Default: auto-detected (Slurm, Open MPI, Cloud TPU) or $JAX_COORDINATOR_ADDRESS.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'With --distributed: the number of processes. Default: '
    'auto-detected.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'With --distributed: this process\'s index in [0, num_processes). '
    'Default: auto-detected.')



def initialize_distributed() -> None:
  """jax.distributed.initialize() with the explicit flags (None: auto-detected by JAX).

  Must run before anything touches a JAX backend. Collectives between CPU processes (the local
  launch test) go through gloo.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_cpu_collectives_implementation in (None, '', 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  config = _CONFIG.value
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every checkpoint step at INFO; the progress line says what matters.
    logging.set_verbosity(logging.WARNING)
  explicit = [f'--{f.name}' for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)
              if f.value is not None]
  repeated = modes.repeated_tuple_overrides(sys.argv[1:], config)
  if repeated:
    raise app.UsageError(f'--config.{", --config.".join(repeated)} given more than once: '
                         f'ml_collections would append the tuples; give each once')
  if any(a.split('=')[0] in ('--config.method', '-config.method') for a in sys.argv[1:]):
    raise app.UsageError(
        '--config.method would rename the run without applying its row\'s settings (model '
        'family, objective, views): choose the row with --config=<config file>:<row>, e.g. '
        '--config=configs/synthetic.py:lejepa_rgb')
  if explicit and not _DISTRIBUTED.value:
    raise app.UsageError(f'{", ".join(explicit)} only apply with --distributed')
  if _DISTRIBUTED.value:
    initialize_distributed()
  workdir = _WORKDIR.value or modes.default_workdir(flags.FLAGS['config'].config_filename,
                                              config.method)
  if config.mode not in modes.MODES:
    raise app.UsageError(f'config.mode must be one of {modes.MODES}, got {config.mode!r}')
  from lemumo_jax import locks  # pylint: disable=g-import-not-at-top
  from lemumo_jax.training import loop  # pylint: disable=g-import-not-at-top
  try:
    run_mode(config, workdir)
  except loop.Preempted as e:
    print(str(e), flush=True)
    sys.exit(loop.EX_TEMPFAIL)
  except (locks.FolderBusyError, NotADirectoryError) as e:
    raise SystemExit(f'error: {e}') from None


def _stage(workdir: str, stage: str, mode: str):
  """The workdir's lock of `stage` (locks.py: one writer per stage folder; `stage` names what
  it writes: pretrain, probe / probe_random / probe_raw, finetune, profile, analyze), taken by
  the first process of a multi-host run only (the others write no run files)."""
  import jax  # pylint: disable=g-import-not-at-top
  from lemumo_jax import locks  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return contextlib.nullcontext()
  return locks.folder_lock(os.path.abspath(workdir), stage, f'mode={mode}')


def run_mode(config, workdir: str) -> None:
  if config.mode in ('pretrain', 'pretrain_probe'):
    from lemumo_jax.training import pretrain  # pylint: disable=g-import-not-at-top
    pretrain.check_config(config)  # a bad value is named before the workdir is made
    with _stage(workdir, 'pretrain', config.mode):
      pretrain.train(config, workdir)
  if config.mode in ('probe', 'pretrain_probe'):
    from lemumo_jax.training import probe  # pylint: disable=g-import-not-at-top
    with _stage(workdir, probe.probe_dirname(config.probe), config.mode):
      probe.run(config, workdir)
  if config.mode == 'finetune':
    from lemumo_jax.training import finetune  # pylint: disable=g-import-not-at-top
    with _stage(workdir, 'finetune', config.mode):
      finetune.run(config, workdir)
  if config.mode == 'profile':
    from lemumo_jax import profiling  # pylint: disable=g-import-not-at-top
    with _stage(workdir, 'profile', config.mode):
      profiling.profile(config, workdir)
  if config.mode == 'analyze':
    from lemumo_jax.training import analyze  # pylint: disable=g-import-not-at-top
    with _stage(workdir, 'analyze', config.mode):
      analyze.run(config, workdir)


if __name__ == '__main__':
  app.run(main, flags_parser=modes.parse_flags)
