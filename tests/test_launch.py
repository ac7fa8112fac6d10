"""Multi-process launch: two CPU processes of `python -m lemumo_jax.main --distributed` (one CPU
device each, gloo collectives, a local coordinator) train like one process on the same global
batch; and the main.py flags that go with it."""

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np

from lemumo_jax.data import pipeline
from lemumo_jax.training import pretrain
from lemumo_jax.training import state as state_lib
from tests.conftest import REPO, TINY_FLAGS, tiny_config, xla_flags
from tests.test_pretrain import NULL_DIRECTIONS

NUM_PROCESSES = 2
STEPS = 2
# The default views, photometric augmentation included (its hue sector is chosen by argmax,
# robust to the last-bit differences between 4- and 8-row programs).
FLAGS = [*TINY_FLAGS, f'--config.train.num_steps={STEPS}']


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]


def _two_host_loader(real_loader):
  """pretrain_loader for ONE process that yields the global batch two hosts would read
  together: host 0's rows then host 1's (the order make_array_from_process_local_data
  assembles on a mesh whose devices are ordered by process)."""

  def loader(data_cfg, global_batch_size, **kwargs):
    parts = []
    for host in range(NUM_PROCESSES):
      with mock.patch.object(jax, 'process_index', return_value=host), \
          mock.patch.object(jax, 'process_count', return_value=NUM_PROCESSES):
        parts.append(list(real_loader(data_cfg, global_batch_size, **kwargs)))
    for host_batches in zip(*parts):
      yield {k: np.concatenate([b[k] for b in host_batches]) for k in host_batches[0]}

  return loader


def _tensorboard_losses(workdir) -> list[float]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (clu already imported it)
  losses = {}
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == 'loss':
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return [losses[step] for step in sorted(losses)]


def _printed_losses(stdout: str) -> list[float]:
  return [float(x) for x in re.findall(rf'^step \d+/{STEPS} \| loss (\S+)', stdout, re.M)]


def test_two_processes_match_one_process(python_env, tmp_path, monkeypatch):
  env = dict(python_env, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = xla_flags(1)  # one CPU device per process
  port = _free_port()
  two = tmp_path / 'two'
  logs = [(tmp_path / f'process{i}.out', tmp_path / f'process{i}.err')
          for i in range(NUM_PROCESSES)]
  procs = []
  try:
    for i, (out, err) in enumerate(logs):
      with open(out, 'w') as stdout, open(err, 'w') as stderr:
        procs.append(subprocess.Popen(
            [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py',
             f'--workdir={two}', *FLAGS, '--distributed',
             f'--coordinator_address=localhost:{port}', f'--num_processes={NUM_PROCESSES}',
             f'--process_id={i}'], cwd=REPO, env=env, stdout=stdout, stderr=stderr))

    # Meanwhile, the reference: one process, one device, the same 8 global examples per step.
    monkeypatch.setattr(pipeline, 'pretrain_loader', _two_host_loader(pipeline.pretrain_loader))
    config = tiny_config(num_steps=STEPS)
    one = pretrain.train(config, str(tmp_path / 'one'))
    for proc in procs:
      proc.wait(timeout=600)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  outputs = [(out.read_text(), err.read_text()) for out, err in logs]
  for i, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f'process {i}:\n{stdout[-2000:]}\n{stderr[-4000:]}'
    assert f'steps of batch 8 on {NUM_PROCESSES} device(s)' in stdout, stdout
  one_losses = [loss for _, loss in one['history']]
  assert len(one_losses) == STEPS and np.all(np.isfinite(one_losses))

  np.testing.assert_allclose(_tensorboard_losses(two), one_losses, rtol=1e-5)
  for stdout, _ in outputs:  # every process prints the (replicated) loss, to 4 decimals
    np.testing.assert_allclose(_printed_losses(stdout), one_losses, atol=6e-5)

  # Process 0 exported the encoder; it matches the single-process one.
  _, two_params, _ = state_lib.load_encoder(str(two / 'encoder'))
  one_params = jax.device_get(one['state'].params['encoder'])
  flat_two = {jax.tree_util.keystr(path): leaf
              for path, leaf in jax.tree_util.tree_leaves_with_path(two_params)}
  for path, value in jax.tree_util.tree_leaves_with_path(one_params):
    name = jax.tree_util.keystr(path)
    other = np.asarray(flat_two[name])
    if name.endswith(tuple(n.replace("['encoder']", '') for n in NULL_DIRECTIONS)):
      np.testing.assert_array_less(np.abs(other - value), 2.5 * config.optim.lr)
    else:
      np.testing.assert_allclose(other, value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_process_flags_need_distributed(python_env, tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py',
       f'--workdir={tmp_path}', '--num_processes=2', '--process_id=0'],
      cwd=REPO, env=python_env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert '--num_processes, --process_id only apply with --distributed' in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_slurm_script_requeues_and_stops_the_processes_at_a_checkpoint(tmp_path):
  """launch/slurm.sbatch run by bash with stand-ins for srun and scontrol: on Slurm's USR1 (5
  min before the time limit) it requeues the job, sends SIGTERM to srun and exits with the
  processes' status once they have checkpointed (75)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text(
      '#!/bin/bash\necho "srun $*" >> "$LOG"\n'
      'trap \'echo "srun got TERM" >> "$LOG"; exit 75\' TERM\n'
      'echo started >> "$LOG"\nwhile true; do sleep 0.1; done\n')
  (bin_dir / 'scontrol').write_text('#!/bin/bash\necho "scontrol $*" >> "$LOG"\n')
  for tool in ('srun', 'scontrol'):
    os.chmod(bin_dir / tool, 0o755)
  log = tmp_path / 'log'
  script = os.path.join(REPO, 'launch', 'slurm.sbatch')
  text = open(script).read()
  for directive in ('#SBATCH --requeue', '#SBATCH --signal=B:USR1@300',
                    '#SBATCH --open-mode=append'):
    assert directive in text, directive
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', LOG=str(log),
             SLURM_JOB_ID='42', SLURM_NNODES='1', SLURM_GPUS_ON_NODE='1',
             SLURM_NTASKS_PER_NODE='1', SLURM_SUBMIT_DIR=REPO)
  proc = subprocess.Popen(['bash', script, 'configs/waymo.py:lemumo', str(tmp_path / 'w')],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 30
  while not (log.exists() and 'started' in log.read_text()) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGUSR1)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 75, out
  lines = log.read_text().splitlines()
  assert lines[0].startswith('srun --kill-on-bad-exit=1 python -m lemumo_jax.main '
                             '--config=configs/waymo.py:lemumo')
  assert '--distributed' in lines[0]
  assert lines[2:] == ['scontrol requeue 42', 'srun got TERM'], lines
  assert 'requeueing' in out
