"""One writer per folder (issue 33, part 1), with real processes: a stage of a workdir, a dataset
build, and paper_tables' children, which die with their parent."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, TINY_FLAGS
from lemumo_jax import locks


def _holder(folder, name, what='a test'):
  """A process holding `folder`'s `name` lock until killed; returns once it holds it."""
  code = textwrap.dedent(f'''
      import sys, time
      from lemumo_jax import locks
      with locks.folder_lock({str(folder)!r}, {name!r}, {what!r}):
        print('held', flush=True)
        time.sleep(600)
  ''')
  proc = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, 'PYTHONPATH': REPO})
  assert proc.stdout.readline().strip() == 'held'
  return proc


def _wait_for(condition, timeout=240.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return True
    time.sleep(0.2)
  return False


def test_second_process_is_refused_and_a_killed_holder_is_taken_over(tmp_path, capsys):
  proc = _holder(tmp_path, 'pretrain', 'mode=pretrain')
  try:
    assert locks.holder(str(tmp_path), 'pretrain')['pid'] == proc.pid
    with pytest.raises(locks.FolderBusyError,
                       match=f'{tmp_path} is in use: process {proc.pid} on host .* is running '
                             'mode=pretrain'):
      with locks.folder_lock(str(tmp_path), 'pretrain', 'mode=pretrain'):
        pass
    with locks.folder_lock(str(tmp_path), 'probe', 'mode=probe'):  # another stage: free
      pass
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert locks.holder(str(tmp_path), 'pretrain') is None
  with locks.folder_lock(str(tmp_path), 'pretrain', 'mode=pretrain'):
    with locks.folder_lock(str(tmp_path), 'pretrain', 'mode=pretrain'):  # re-entrant
      pass
    assert locks.holder(str(tmp_path), 'pretrain') is None  # held by this process
  assert f'taking over the pretrain lock of process {proc.pid}' in capsys.readouterr().out
  with locks.folder_lock(str(tmp_path), 'pretrain', 'mode=pretrain'):
    pass  # a clean release leaves nothing to take over
  assert 'taking over' not in capsys.readouterr().out


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  path = tmp_path / 'run'
  path.write_text('')
  with pytest.raises(NotADirectoryError, match=f'{path} is a file'):
    with locks.folder_lock(str(path), 'pretrain', 'mode=pretrain'):
      pass


@pytest.mark.slow
def test_two_pretrainings_on_one_workdir(tmp_path):
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py',
         f'--workdir={workdir}', *TINY_FLAGS, '--config.train.num_steps=100000',
         '--config.train.checkpoint_every=5']
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    assert _wait_for(lambda: os.path.isdir(workdir / 'checkpoints')
                     and any(n.isdigit() for n in os.listdir(workdir / 'checkpoints')))
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode != 0
    assert f'{workdir} is in use: process {first.pid}' in second.stderr
    assert first.poll() is None  # the first goes on
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate()
  with open(workdir / 'config.json') as f:
    assert json.load(f)['train']['num_steps'] == 100000


def test_a_second_build_is_refused_and_keeps_the_first_ones_folder(tmp_path):
  import fixtures_real_formats as fx  # pylint: disable=g-import-not-at-top
  from data_prep import builder, waymo  # pylint: disable=g-import-not-at-top
  raw = tmp_path / 'raw'
  fx.write_waymo_segment(str(raw / 'training' / 'segment-0.tfrecord'), 2,
                         context_name='segment-0')
  config = waymo.LemumoWaymo.BUILDER_CONFIGS[0].derive('lock_test', image_height=32,
                                                        image_width=48)
  config_dir = tmp_path / 'tfds' / 'lemumo_waymo' / 'lock_test'
  live = config_dir / 'incomplete.1234'  # the first build's work in progress
  live.mkdir(parents=True)
  proc = _holder(config_dir, 'build', 'a build of lemumo_waymo/lock_test')
  try:
    for overwrite in (False, True):
      with pytest.raises(locks.FolderBusyError, match=f'{config_dir} is in use: process '
                                                       f'{proc.pid}'):
        builder.build(waymo.LemumoWaymo, manual_dir=str(raw), data_dir=str(tmp_path / 'tfds'),
                      config=config, overwrite=overwrite)
      assert live.is_dir()
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  built = builder.build(waymo.LemumoWaymo, manual_dir=str(raw), data_dir=str(tmp_path / 'tfds'),
                        config=config)
  assert not live.exists()  # its holder is gone: a killed build's folder, removed
  assert built.info.splits['train'].num_examples > 0


@pytest.mark.slow
def test_paper_tables_children_die_with_it_and_a_busy_run_is_refused(tmp_path):
  out = tmp_path / 'out'
  cmd = [sys.executable, '-m', 'benchmarks.paper_tables', '--rows=lemumo', '--seeds=0',
         '--noprofile', f'--out_dir={out}', '--', *TINY_FLAGS,
         '--config.train.num_steps=100000', '--config.mode=pretrain_probe']
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  parent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  run = out / 'lemumo_seed0'
  try:
    assert _wait_for(lambda: locks.holder(str(run), 'pretrain') is not None)
    child = locks.holder(str(run), 'pretrain')['pid']
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and 'in use by another process' in again.stderr
    assert f'pretrain: process {child}' in again.stderr
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert _wait_for(lambda: not _alive(child) and locks.holder(str(run), 'pretrain') is None,
                     timeout=120), 'the child outlived its parent'
  finally:
    if parent.poll() is None:
      parent.kill()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  try:  # a zombie (exited, not yet reaped by init) is not running
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split(') ')[1][0] != 'Z'
  except OSError:
    return False


def test_a_second_probe_on_one_workdir_is_refused(tmp_path):
  """Two probes of one finished workdir raced on best/ (a FileNotFoundError in Orbax's
  commit); the second is now refused before it reads anything."""
  workdir = tmp_path / 'run'
  proc = _holder(workdir, 'probe', 'mode=probe')
  try:
    run = subprocess.run(
        [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py',
         f'--workdir={workdir}', '--config.mode=probe'], cwd=REPO, capture_output=True,
        text=True, timeout=300, env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'})
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert run.returncode == 1
  assert f'error: {workdir} is in use: process {proc.pid}' in run.stderr
  assert 'running mode=probe' in run.stderr and 'Traceback' not in run.stderr
  assert sorted(os.listdir(workdir)) == ['.lock-probe']
