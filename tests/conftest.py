"""Shared test helpers: a tiny end-to-end config (seconds per step on a CPU)."""

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# One on-disk XLA compilation cache for the whole run, shared by the pytest-xdist workers and
# every subprocess they start (they inherit the environment): many tests compile the same tiny
# programs (a rerun resuming, a probe on the same encoder). Set here, before any test module
# imports jax, by the first process to load this file (the xdist controller), and removed by it
# at exit. A cache entry is keyed by the program and the jax/XLA version and flags, so a hit
# runs exactly what a fresh compile would.
# Tests compile with LLVM at -O0 (XLA's CPU backend optimisation level 0): the same XLA
# programs, about 40% less compile CPU, which is most of a tiny test's time; the runs under
# test compare like with like (both sides of a 1-vs-4-device or resume check compile alike).
# Give XLA_FLAGS yourself to test at another level. `xla_flags(devices)` adds fake devices.
TEST_XLA_FLAGS = os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a subprocess with `devices` fake CPU devices (one: the default)."""
  return f'{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}'


# The optional AOT compilers (requirements-aot.txt: libtpu, the CUDA plugin) must not claim the
# tests' backend, and libtpu's host-wide lock would stop the xdist workers and their
# subprocesses from compiling for the TPU target side by side.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='lemumo_jax_xla_cache_')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


def tiny_config(method: str = 'lemumo', **train):
  """configs/synthetic.py shrunk further: 48x64 frames, 32 px global / 16 px local crops."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config(method)
  config.data.update(num_train=32, num_val=16, image_size=(48, 64), num_threads=1, prefetch=1)
  # A row that disables local crops (imagebind: num_local=0) keeps them disabled.
  config.views.update(num_global=2, num_local=min(2, config.views.num_local), global_size=32,
                      local_size=16)
  config.model.update(img_size=32, patch_size=8, width=32, depth=2, num_heads=2)
  config.projector.update(hidden_dim=32, out_dim=8)
  config.dino.update(hidden_dim=32, bottleneck_dim=16, num_prototypes=64, ibot_num_prototypes=64)
  config.multimae.update(decoder_width=32, decoder_heads=2)
  config.objective.update(num_slices=16)
  config.train.update(batch_size=8, num_steps=4, log_every=1, checkpoint_every=2)
  config.train.update(**train)
  config.mode = 'pretrain'
  config.probe.update(image_size=(48, 64), seg_size=(24, 32), batch_size=8, num_steps=4,
                      val_every=2, log_every=1, checkpoint_every=2, centernet_hidden=16,
                      occupancy_hidden=8, max_objects=16, num_figure_frames=2)
  config.finetune.update(batch_size=8, num_steps=4, val_every=2, log_every=1,
                         checkpoint_every=2, decoder_hidden=16)
  return config


def _flags(keys: str) -> list[str]:
  """--config.<key>=<value> overrides carrying tiny_config()'s values of `keys` (one source:
  the subprocess tests run the same tiny config as the in-process ones)."""
  config = tiny_config()
  flags = []
  for key in keys.split():
    value = config
    for part in key.split('.'):
      value = value[part]
    flags.append(f'--config.{key}={tuple(value) if isinstance(value, list) else value}')
  return flags


# tiny_config() for `python -m lemumo_jax.main` ...
TINY_FLAGS = _flags(
    'data.num_train data.num_val data.image_size data.num_threads data.prefetch views.num_local '
    'views.global_size views.local_size model.img_size model.patch_size model.width model.depth '
    'model.num_heads projector.hidden_dim projector.out_dim objective.num_slices '
    'train.batch_size train.log_every mode')
# ... its probe stage (add '--config.mode=probe' or 'pretrain_probe') ...
TINY_PROBE_FLAGS = _flags(
    'probe.image_size probe.seg_size probe.batch_size probe.num_steps probe.val_every '
    'probe.log_every probe.checkpoint_every probe.centernet_hidden probe.occupancy_hidden '
    'probe.max_objects probe.num_figure_frames')
# ... and its fine-tuning (mode=finetune; it reads the probe view settings above).
TINY_FINETUNE_FLAGS = _flags(
    'finetune.batch_size finetune.num_steps finetune.val_every finetune.log_every '
    'finetune.checkpoint_every finetune.decoder_hidden')


def killed_and_unbroken(flags: list[str], env: dict[str, str], tmp_path, kill_at: str):
  """`python -m lemumo_jax.main --config=configs/synthetic.py <flags>` in tmp_path/killed,
  SIGKILLed as soon as killed/<kill_at> exists and rerun, and in tmp_path/unbroken: the two
  finished runs (CompletedProcess, each checked to exit 0)."""
  def command(workdir):
    return [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py',
            f'--workdir={workdir}', *flags]

  kill_when_exists(command(tmp_path / 'killed'), env, tmp_path / 'killed' / kill_at)
  runs = [subprocess.run(command(tmp_path / name), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600) for name in ('killed', 'unbroken')]
  for run in runs:
    assert run.returncode == 0, run.stderr[-3000:]
  return runs


def kill_when_exists(command: list[str], env: dict[str, str], path, timeout: float = 300) -> None:
  """Runs `command` and SIGKILLs it as soon as `path` (e.g. a checkpoint folder) exists."""
  with tempfile.TemporaryFile('w+') as log:
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + timeout
    while not os.path.exists(path):
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        log.seek(0)
        raise AssertionError(f'{path} did not appear before the run ended or {timeout} s '
                             f'passed:\n{log.read()[-3000:]}')
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture
def python_env():
  """Environment for subprocesses: the repo on PYTHONPATH, quiet TensorFlow."""
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  env['PYTHONUNBUFFERED'] = '1'
  return env
