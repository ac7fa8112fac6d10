"""The shared training loop (training/loop.py) and the run-safety rules every stage gets from
it: config checks before anything is written, resume refusals that name the keys, NaN stops
that name a finished checkpoint and never save a NaN state, crash-safe encoder export, probes
tied to the encoder they were trained on, and a clean stop on SIGTERM."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lemumo_jax import files
from lemumo_jax.tasks import heads as heads_lib
from lemumo_jax.training import loop, pretrain, probe
from lemumo_jax.training import state as state_lib
from tests.conftest import REPO, TINY_FLAGS, tiny_config


# ------------------------------------------------------------------------- a toy stage


def _toy(nan_from: int | None = None):
  """A 1-parameter state and a step whose loss turns NaN at step `nan_from` (1-based)."""
  tx = optax.sgd(0.1)
  state = state_lib.create_train_state({'params': {'w': jnp.ones(())}}, tx)

  @jax.jit
  def step(state, batch):
    loss = jnp.square(state.params['w'] - batch)
    if nan_from is not None:
      loss = jnp.where(state.step + 1 >= nan_from, jnp.nan, loss)
    grads = {'w': 2 * (state.params['w'] - batch)}
    return state_lib.apply_gradients(state, tx, grads, loss, {}), {'loss': loss}

  return state, step


def _run_toy(tmp_path, *, nan_from=None, total=6, log_every=1, checkpoint_every=2):
  state, step = _toy(nan_from)
  checkpoints = loop.Checkpoints(str(tmp_path), checkpoint_every, 10, 'toy', 'Try less.')
  logged = []
  result = loop.train(state, step, (np.float32(i) for i in range(total)), start_step=0,
                      total_steps=total, log_every=log_every, checkpoints=checkpoints,
                      on_log=lambda s, scalars, rate: logged.append((s, rate)))
  return result, [s for s, _ in logged], [rate for _, rate in logged]


def _saved_steps(tmp_path):
  directory = tmp_path / 'checkpoints'
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if directory.exists() else []


def test_loop_logs_saves_and_returns_the_history(tmp_path):
  result, logged, rates = _run_toy(tmp_path, log_every=4)
  assert result.step == 6 and not result.stopped
  assert logged == [4, 6] and [s for s, _ in result.history] == [4, 6]
  assert all(np.isfinite(r) and r > 0 for r in rates)  # clu ReportProgress, first step included
  assert _saved_steps(tmp_path) == [2, 4, 6]


def test_nan_stop_names_the_last_finished_checkpoint(tmp_path):
  """NaN at step 3, found at the step-4 log: the error names step 2, whose save was in flight
  and is finished before the error is raised; nothing after it is saved."""
  with pytest.raises(loop.NonFiniteLossError,
                     match=r'toy loss became NaN/Inf at step 3 \(checked at step 4\); the last '
                           r'good checkpoint is step 2 in .*checkpoints\. Try less\.'):
    _run_toy(tmp_path, nan_from=3, log_every=4)
  assert _saved_steps(tmp_path) == [2]
  assert not [n for n in os.listdir(tmp_path / 'checkpoints') if 'tmp' in n]


def test_a_nan_state_is_never_saved(tmp_path):
  """No log step between the NaN and the checkpoint: the save itself refuses (the probe and
  fine-tune loops used to save it, and a rerun resumed NaN)."""
  with pytest.raises(loop.NonFiniteLossError, match=r'at step 3 \(checked at step 4\)'):
    _run_toy(tmp_path, nan_from=3, log_every=100)
  assert _saved_steps(tmp_path) == [2]


def _toy_state(w: float):
  return state_lib.create_train_state({'params': {'w': jnp.full((2,), w)}}, optax.sgd(0.1))


def test_keep_best_keeps_the_best_validation_only(tmp_path):
  """Orbax ranks the kept steps by best_fn; a rerun reads the best back, a non-finite metric
  never wins and is stored as null, and the restore returns the best step's params."""
  keep = loop.KeepBest(str(tmp_path), 'mAP50')
  assert keep.best is None
  for step, value in ((1, 0.2), (2, 0.5), (3, 0.4), (4, float('nan'))):
    if keep.is_better({'mAP50': value, 'loss': 1.0}):
      keep.save(step, _toy_state(step), {'mAP50': value, 'loss': 1.0})
  assert keep.step == 2
  # A save killed before its rename leaves a temporary folder, which the next run removes.
  (tmp_path / 'best' / '3.orbax-checkpoint-tmp-1796000000000000' / 'default').mkdir(parents=True)
  again = loop.KeepBest(str(tmp_path), 'mAP50')
  assert again.best == {'step': 2, 'metrics': {'mAP50': 0.5, 'loss': 1.0}}
  np.testing.assert_array_equal(again.restore(_toy_state(0)).params['w'], [2, 2])
  assert not again.is_better({'mAP50': float('nan')})
  again.save(5, _toy_state(5), {'mAP50': float('nan'), 'loss': 0.5})  # forced: ranks last
  assert sorted(os.listdir(tmp_path / 'best')) == ['2']  # 5 removed, the temporary folder too
  assert loop.KeepBest(str(tmp_path), 'mAP50').step == 2
  assert loop.KeepBest(str(tmp_path / 'other'), 'loss').best is None


def test_an_unreadable_kept_best_is_named(tmp_path):
  """A truncated metrics file or a lost params folder under best/ is one error naming the
  folder and the fix, not an Orbax message (nor a best silently replaced)."""
  loop.KeepBest(str(tmp_path)).save(3, _toy_state(3), {'loss': 1.0})
  (tmp_path / 'best' / '3' / 'metrics' / 'metrics').write_text('{"loss": 1')
  with pytest.raises(ValueError,
                     match=r'best holds a kept best that cannot be read .*move it away'):
    loop.KeepBest(str(tmp_path))
  (tmp_path / 'best' / '3' / 'metrics' / 'metrics').write_text('{"loss": 1.0}')
  keep = loop.KeepBest(str(tmp_path))
  shutil.rmtree(tmp_path / 'best' / '3' / 'default')
  with pytest.raises(ValueError, match=r'best holds a kept best that cannot be read'):
    keep.restore(_toy_state(0))


def test_keep_best_adopts_the_layout_of_earlier_versions(tmp_path):
  """best/best.json naming best/params_<step> (written before KeepBest) becomes the manager's
  best with its metrics, instead of being lost and the final state reported as best."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state = _toy_state(7.0)
  best_dir = tmp_path / 'best'
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(best_dir / 'params_30', {'params': state.params,
                                               'batch_stats': state.batch_stats})
  (best_dir / 'best.json').write_text(json.dumps(
      {'step': 30, 'params_dir': 'params_30', 'metrics': {'loss': 0.25, 'mAP50': None}}))
  keep = loop.KeepBest(str(tmp_path))
  assert keep.best == {'step': 30, 'metrics': {'loss': 0.25, 'mAP50': None}}
  assert sorted(os.listdir(best_dir)) == ['30']
  np.testing.assert_array_equal(keep.restore(_toy_state(0.0)).params['w'], [7, 7])
  assert not keep.is_better({'loss': 0.5}) and keep.is_better({'loss': 0.1})


def test_a_damaged_checkpoint_is_named(tmp_path):
  """A checkpoint folder that lost its contents (a partial copy) is one error naming it."""
  _run_toy(tmp_path)
  shutil.rmtree(tmp_path / 'checkpoints' / '6' / 'default')
  state, _ = _toy()
  checkpoints = loop.Checkpoints(str(tmp_path), 2, 10, 'toy', 'Try less.')
  with pytest.raises(ValueError, match=r'checkpoints/6 cannot be restored .*move it away'):
    checkpoints.restore_or_init(lambda: state, (),
                                jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def test_a_resumed_checkpoint_is_verified_against_its_digest(tmp_path):
  """Each save writes checkpoint_digests/<step>.json first (the digests of removed checkpoints
  go with them); a resume restores the latest and refuses a state that does not match it."""
  _run_toy(tmp_path)
  assert sorted(os.listdir(tmp_path / 'checkpoint_digests')) == ['2.json', '4.json', '6.json']
  state, _ = _toy()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  checkpoints = loop.Checkpoints(str(tmp_path), 2, 10, 'toy', 'Try less.')
  restored, start, _ = checkpoints.restore_or_init(lambda: state, (), sharding)
  assert start == 6
  record = json.loads((tmp_path / 'checkpoint_digests' / '6.json').read_text())
  assert record == {'step': 6, 'state_sha256': state_lib.state_digest(restored)}
  # The checkpoint's arrays replaced by another state's (a copy from another run, say).
  other = state_lib.create_train_state({'params': {'w': jnp.full((), 5.0)}}, optax.sgd(0.1))
  shutil.rmtree(tmp_path / 'checkpoints' / '6')
  manager = loop.Checkpoints(str(tmp_path / 'elsewhere'), 2, 10, 'toy', '').manager
  manager.save(6, args=loop.ocp.args.StandardSave(other.replace(step=restored.step)))
  manager.wait_until_finished()
  shutil.copytree(tmp_path / 'elsewhere' / 'checkpoints' / '6', tmp_path / 'checkpoints' / '6')
  with pytest.raises(ValueError, match=r'checkpoints/6 does not match the digest saved with it '
                                       r'in .*checkpoint_digests/6.json .*move that folder away'):
    loop.Checkpoints(str(tmp_path), 2, 10, 'toy', '').restore_or_init(lambda: state, (),
                                                                        sharding)
  # A checkpoint without a digest (saved before digests were kept) resumes as before.
  os.remove(tmp_path / 'checkpoint_digests' / '6.json')
  assert loop.Checkpoints(str(tmp_path), 2, 10, 'toy', '').restore_or_init(
      lambda: state, (), sharding)[1] == 6
  small = loop.Checkpoints(str(tmp_path / 'few'), 1, 2, 'toy', '')
  for step in range(1, 6):
    small.save(step, state.replace(step=jnp.asarray(step)))
  small.wait()
  small.save(6, state.replace(step=jnp.asarray(6)))  # the cleanup reads the finished steps
  assert sorted(os.listdir(tmp_path / 'few' / 'checkpoint_digests')) in (
      ['4.json', '5.json', '6.json'], ['5.json', '6.json'])


def test_nan_before_the_first_checkpoint_says_there_is_none(tmp_path):
  with pytest.raises(loop.NonFiniteLossError, match=r'there is no checkpoint in .*before the '
                                                    r'first'):
    _run_toy(tmp_path, nan_from=1, log_every=1)
  assert _saved_steps(tmp_path) == []


def test_probe_never_saves_nan_heads(tmp_path, monkeypatch):
  """The probe stage through the loop: NaN from step 1 and neither a log nor a validation
  before the step-2 checkpoint; nothing is saved, no best heads are kept."""
  config = tiny_config()
  config.probe.update(encoder='raw', log_every=100, val_every=100)
  real = heads_lib.probe_losses
  monkeypatch.setattr(heads_lib, 'probe_losses', lambda *a: {
      k: v * jnp.nan for k, v in real(*a).items()})
  with pytest.raises(loop.NonFiniteLossError, match=r'probes loss became NaN/Inf at step 1 '
                                                    r'\(checked at step 2\); there is no'):
    probe.run(config, str(tmp_path))
  assert _saved_steps(tmp_path / 'probe_raw') == []
  assert loop.KeepBest(str(tmp_path / 'probe_raw')).best is None


# ------------------------------------------------------------------------ config checks


@pytest.mark.parametrize('section,key,value,message', [
    ('train', 'checkpoint_every', 0, r'config\.train\.checkpoint_every=0 must be an integer >= 1'),
    ('train', 'log_every', 0, r'config\.train\.log_every=0 must be'),
    ('train', 'num_steps', -3, r'config\.train\.num_steps=-3 must be an integer >= 0'),
    ('data', 'image_size', (48, 64, 48, 64), r'config\.data\.image_size=\(48, 64, 48, 64\): give '
                                             r'two positive integers'),
])
def test_pretraining_settings_are_checked_before_anything_runs(tmp_path, section, key, value,
                                                               message):
  config = tiny_config()
  config[section][key] = value
  with pytest.raises(ValueError, match=message):
    pretrain.train(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'config.json')


@pytest.mark.parametrize('key,value,message', [
    ('heads', ('seg', 'depth', 'seg'), r"config\.probe\.heads=\['seg', 'depth', 'seg'\] names "
                                       r"\['seg'\] twice \(ml_collections appends"),
    ('heads', ('seg', 'nope'), r'config\.probe\.heads=.*choose one or more of'),
    ('image_size', (48, 64, 48, 64), r'config\.probe\.image_size=.*two positive integers'),
    ('val_every', 0, r'config\.probe\.val_every=0 must be an integer >= 1'),
])
def test_probe_settings_are_checked_before_anything_runs(tmp_path, key, value, message):
  config = tiny_config()
  config.probe.encoder = 'raw'
  config.probe[key] = value
  with pytest.raises(ValueError, match=message):
    probe.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'probe_raw')


def test_an_invalid_config_writes_no_record(tmp_path):
  """The first run with an invalid model writes nothing, so the corrected rerun is accepted
  (config.json used to be written first and then refused it)."""
  bad = tiny_config()
  bad.model.family = 'nope'
  with pytest.raises(ValueError):
    pretrain.train(bad, str(tmp_path))
  assert not os.path.exists(tmp_path / 'config.json')
  pretrain.check_workdir_config(str(tmp_path), tiny_config())  # the corrected run: accepted
  assert os.path.exists(tmp_path / 'config.json')


@pytest.mark.parametrize('section,key,value', [
    ('train', 'batch_size', 16), ('seed', None, 1), ('optim', 'lr', 3e-4),
    ('train', 'num_steps', 40), ('data', 'num_train', 64), ('views', 'num_local', 1)])
def test_resuming_with_other_settings_is_refused_naming_the_key(tmp_path, section, key, value):
  pretrain.check_workdir_config(str(tmp_path), tiny_config())
  changed = tiny_config()
  if key is None:
    changed[section] = value
  else:
    changed[section][key] = value
  name = section if key is None else f'{section}.{key}'
  with pytest.raises(ValueError, match=rf'other settings \({name}: .* -> {value!r}\); use a '
                                       rf'new --workdir'):
    pretrain.check_workdir_config(str(tmp_path), changed)


def test_resume_compatible_changes_are_logged_and_recorded(tmp_path, capsys):
  pretrain.check_workdir_config(str(tmp_path), tiny_config())
  changed = tiny_config()
  changed.train.log_every = 7
  changed.probe.lr = 0.5   # not a pretraining setting: not compared
  pretrain.check_workdir_config(str(tmp_path), changed)
  assert 'Resuming with changed settings (resume-compatible): train.log_every: 1 -> 7' in (
      capsys.readouterr().out)
  assert json.loads((tmp_path / 'config.json').read_text())['train']['log_every'] == 7


def test_record_changes_compare_dotted_keys_of_nested_and_flat_records():
  old = {'optim': {'lr': 1e-3, 'b1': 0.9}, 'train': {'log_every': 1}, 'probe.image_size': [8, 8],
         'data': {'num_threads': 2}}
  new = {'optim': {'lr': 1e-3, 'b1': 0.95}, 'train': {'log_every': 7}, 'probe': {'image_size':
         [8, 16]}, 'data': {'num_threads': 2, 'prefetch': 4}, 'seed': 1}
  assert files.record_changes(old, old) == ([], [])
  # A flat dotted key equals its nested form; a missing key reads '<absent>'; sorted by key.
  assert files.record_changes(old, new, resumable=('train.log_every', 'data')) == (
      ["optim.b1: 0.9 -> 0.95", "probe.image_size: [8, 8] -> [8, 16]",
       "seed: '<absent>' -> 1"],
      ["data.prefetch: '<absent>' -> 4", "train.log_every: 1 -> 7"])
  # Only keys under `compared` count; 'optim' does not cover 'optimizer'.
  assert files.record_changes({'optimizer': 1, 'optim': {'lr': 1}}, {'optimizer': 2, 'optim':
                              {'lr': 2}}, compared=('optim',)) == (['optim.lr: 1 -> 2'], [])
  # Prefixes given as a one-pass iterable still apply to every key.
  assert files.record_changes(old, new, resumable=iter(('train', 'data')),
                              compared=iter(('train', 'data', 'seed'))) == (
      ["seed: '<absent>' -> 1"], ["data.prefetch: '<absent>' -> 4", "train.log_every: 1 -> 7"])


def test_a_truncated_record_is_named(tmp_path):
  pretrain.check_workdir_config(str(tmp_path), tiny_config())
  path = tmp_path / 'config.json'
  path.write_text(path.read_text()[:50])
  with pytest.raises(ValueError, match=rf'{path} is not readable JSON'):
    pretrain.check_workdir_config(str(tmp_path), tiny_config())


# ------------------------------------------------------------------------- encoder export


def _random_encoder_params(config, seed):
  from lemumo_jax.models import encoders  # pylint: disable=g-import-not-at-top
  module = encoders.build_encoder(config.model)
  return module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)),
                     jnp.zeros((1, 32, 32, 1)), train=False)['params']


def _assert_params_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_export_is_crash_safe_and_skipped_when_unchanged(tmp_path, monkeypatch):
  config = tiny_config()
  first, second = _random_encoder_params(config, 0), _random_encoder_params(config, 1)
  directory = state_lib.export_encoder(str(tmp_path), first, config, step=4)
  meta = state_lib.read_encoder_config(directory)
  assert meta['fingerprint'] == state_lib.params_fingerprint(first)

  # The same params again (every pretrain_probe rerun of a finished run): nothing written.
  def no_save(*args, **kwargs):
    raise AssertionError('an unchanged encoder was written again')
  monkeypatch.setattr(state_lib.ocp.StandardCheckpointer, 'save', no_save)
  state_lib.export_encoder(str(tmp_path), first, config, step=4)
  monkeypatch.undo()

  # Killed after the new params, before encoder_config.json names them: the old export is
  # still whole (it used to be overwritten in place, same step, under the old json).
  real_replace = os.replace

  def killed(src, dst):
    if dst.endswith('encoder_config.json'):
      raise KeyboardInterrupt('killed')
    return real_replace(src, dst)
  monkeypatch.setattr(state_lib.os, 'replace', killed)
  with pytest.raises(KeyboardInterrupt):
    state_lib.export_encoder(str(tmp_path), second, config, step=4)
  monkeypatch.undo()
  _, params, _ = state_lib.load_encoder(directory)
  _assert_params_equal(params, first)

  # The rerun completes the export and removes the old params.
  state_lib.export_encoder(str(tmp_path), second, config, step=4)
  _, params, _ = state_lib.load_encoder(directory)
  _assert_params_equal(params, second)
  assert [n for n in os.listdir(directory) if n.startswith('params_')] == [
      state_lib.read_encoder_config(directory)['params_dir']]


def test_probes_refuse_heads_of_another_encoder_or_other_heads(tmp_path):
  """Probe, re-export a different encoder into the workdir, probe again: refused with the
  encoder's step and fingerprint named (it used to resume the stale heads). A rerun with other
  heads is refused naming probe.heads (it used to fail inside Orbax's tree matching)."""
  config = tiny_config()
  config.probe.robustness = ()
  first = _random_encoder_params(config, 0)
  state_lib.export_encoder(str(tmp_path), first, config, step=40)
  result = probe.run(config, str(tmp_path))
  again = probe.run(config, str(tmp_path))  # the same encoder: resumes, nothing to train
  assert again['history'] == [] and again['best_step'] == result['best_step']

  other_heads = tiny_config()
  other_heads.probe.update(robustness=(), heads=('seg', 'depth'))
  with pytest.raises(ValueError, match=r"probe\.heads: \['centernet3d', 'seg', 'depth', "
                                       r"'occupancy'\] -> \['seg', 'depth'\]\); its checkpoints"):
    probe.run(other_heads, str(tmp_path))

  state_lib.export_encoder(str(tmp_path), _random_encoder_params(config, 1), config, step=60)
  with pytest.raises(ValueError, match=r'encoder\.fingerprint: .*encoder\.step: 40 -> 60\); '
                                       r'its checkpoints and best heads belong to that run: '
                                       r'remove .*probe to train'):
    probe.run(config, str(tmp_path))


# ---------------------------------------------------------------------------- preemption


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_the_rerun_resumes(python_env, tmp_path):
  """SIGTERM mid-pretraining (a Slurm time limit, a preemption): the step it is at is
  checkpointed, the process exits with EX_TEMPFAIL, and the same command resumes there."""
  command = [sys.executable, '-m', 'lemumo_jax.main', '--config=configs/synthetic.py',
             f'--workdir={tmp_path}', *TINY_FLAGS, '--config.train.num_steps=24',
             '--config.train.checkpoint_every=1000']
  proc = subprocess.Popen(command, cwd=REPO, env=python_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  deadline = time.time() + 300
  while time.time() < deadline:
    line = proc.stdout.readline()
    assert line or proc.poll() is None, ''.join(lines)[-3000:]
    lines.append(line)
    if line.startswith('step 3/24'):
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == loop.EX_TEMPFAIL, out[-3000:]
  preempted_at = int(out.split('pretraining preempted (SIGTERM) at step ')[1].split(':')[0])
  assert 3 <= preempted_at < 24 and _saved_steps(tmp_path) == [preempted_at]
  rerun = subprocess.run(command, cwd=REPO, env=python_env, capture_output=True, text=True,
                         timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'Resuming pretraining from step {preempted_at} ' in rerun.stdout


def test_same_seed_same_numbers(tmp_path):
  """Two runs of pretraining + probes with the same seed on one machine agree bitwise: losses,
  params and every reported metric."""
  runs = []
  for name in ('a', 'b'):
    config = tiny_config(num_steps=3)
    config.probe.robustness = ()
    summary = pretrain.train(config, str(tmp_path / name))
    report = probe.run(config, str(tmp_path / name))
    runs.append((summary, report))
  (a, pa), (b, pb) = runs
  assert a['history'] == b['history'] and pa['history'] == pb['history']
  _assert_params_equal(a['state'].params, b['state'].params)
  assert pa['val_history'] == pb['val_history']
  assert json.dumps(pa['metrics'], sort_keys=True) == json.dumps(pb['metrics'], sort_keys=True)
