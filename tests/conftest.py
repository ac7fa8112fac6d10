"""Shared test helpers: a tiny end-to-end config (seconds per step on a CPU)."""

import atexit
import os
import shutil
import sys
import tempfile

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


# Command-line overrides giving the same tiny config to `python -m lemumo_jax.main`.
TINY_FLAGS = [
    '--config.data.num_train=32', '--config.data.num_val=16', '--config.data.image_size=(48, 64)',
    '--config.data.num_threads=1', '--config.data.prefetch=1',
    '--config.views.num_local=2', '--config.views.global_size=32', '--config.views.local_size=16',
    '--config.model.img_size=32', '--config.model.patch_size=8', '--config.model.width=32',
    '--config.model.depth=2', '--config.model.num_heads=2', '--config.projector.hidden_dim=32',
    '--config.projector.out_dim=8', '--config.objective.num_slices=16',
    '--config.train.batch_size=8', '--config.train.log_every=1', '--config.mode=pretrain',
]
# ... and the tiny probe stage (add '--config.mode=probe' or 'pretrain_probe').
TINY_PROBE_FLAGS = [
    '--config.probe.image_size=(48, 64)', '--config.probe.seg_size=(24, 32)',
    '--config.probe.batch_size=8', '--config.probe.num_steps=4', '--config.probe.val_every=2',
    '--config.probe.log_every=1', '--config.probe.checkpoint_every=2',
    '--config.probe.centernet_hidden=16', '--config.probe.occupancy_hidden=8',
    '--config.probe.max_objects=16', '--config.probe.num_figure_frames=2',
]
# ... and tiny fine-tuning (mode=finetune; it reads the probe view settings above).
TINY_FINETUNE_FLAGS = [
    '--config.finetune.batch_size=8', '--config.finetune.num_steps=4',
    '--config.finetune.val_every=2', '--config.finetune.log_every=1',
    '--config.finetune.checkpoint_every=2', '--config.finetune.decoder_hidden=16',
]


@pytest.fixture
def python_env():
  """Environment for subprocesses: the repo on PYTHONPATH, quiet TensorFlow."""
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  env['PYTHONUNBUFFERED'] = '1'
  return env
