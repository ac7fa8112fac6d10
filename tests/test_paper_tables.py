"""benchmarks/paper_tables.py: rows x seeds through lemumo_jax.main, then the paper-layout table."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import paper_tables, runs
from conftest import REPO, TINY_FINETUNE_FLAGS, TINY_FLAGS, TINY_PROBE_FLAGS


def test_markdown_mean_std_best_and_compute_columns():
  def row(method, data, xy, mae, compute):
    return {'row': method, 'method': method, 'training_data': data, 'seeds': ['0', '1'],
            'metrics': {'mAP XY ↑': {'mean': xy, 'std': 0.5},
                        'Depth MAE ↓': {'mean': mae, 'std': 0.01}}, 'compute': compute}
  compute = {'Time (min)': 1.5, 'SSL PFLOPs': 0.0123, 'Memory (GB)': 0.3,
             'memory_is_xla_estimate': True}
  text = paper_tables.markdown({'seeds': ['0', '1'], 'rows': [
      row('lejepa_rgb', 'RGB', 19.3, 4.704, compute),
      row('lemumo', 'RGB+Depth', 23.6, 2.86, compute),
      row('lejepa_rgb encoder frozen', 'RGB', 13.8, 6.734, {})]})
  lines = text.splitlines()
  assert lines[0] == ('| Method | Training Data | mAP XY ↑ | Depth MAE ↓ | Time (min) | SSL PFLOPs '
                      '| Memory (GB) |')
  assert lines[2] == ('| lejepa_rgb | RGB | <u>19.3 ± 0.5</u> | <u>4.704 ± 0.010</u> | 1.50 | '
                      '0.0123 | 0.300* |')
  assert lines[3] == '| lemumo | RGB+Depth | **23.6 ± 0.5** | **2.860 ± 0.010** | 1.50 | 0.0123 | 0.300* |'
  assert lines[4] == '| lejepa_rgb encoder frozen | RGB | 13.8 ± 0.5 | 6.734 ± 0.010 | — | — | — |'
  assert 'Mean ± std over seeds 0, 1.' in text and "XLA's static estimate" in text


def test_frozen_gaps_pair_seeds_sign_by_column_and_mark_intervals():
  """Table 1's comparison seed by seed, against an independent float64 formula: gains signed
  by the column's direction, the 95% t-interval (t quantiles for 1 and 2 degrees of freedom
  written out), wins, a seed missing a metric left out of that column, unpaired rows ignored,
  and the markdown cells (bold where the interval excludes 0)."""
  seeds = ['0', '1', '2']
  titles = {'xy': 'mAP XY ↑', 'mae': 'Depth MAE ↓', 'miou': 'Seg. mIoU ↑', 'ade': 'ADE XY (m) ↓'}
  def row(name, **values):
    return {'row': name, 'method': 'lemumo', 'name': name, 'training_data': 'RGB+Depth',
            'seeds': seeds, 'compute': {},
            'metrics': {titles[k]: {'mean': float(np.nanmean(v)), 'std': 0.0, 'values': v}
                        for k, v in values.items()}}
  nan = float('nan')
  result = {'seeds': seeds, 'rows': [
      row('lemumo', xy=[3.3, 2.7, 3.8], mae=[8.532, 8.299, 8.280], miou=[0.206, 0.205, 0.207],
          ade=[1.083, nan, 1.131]),
      row('lemumo:frozen', xy=[2.6, 3.0, 3.1], mae=[8.560, 8.379, 8.250],
          miou=[0.194, 0.190, 0.193], ade=[1.093, 1.116, 1.181]),
      row('lejepa_rgb', xy=[1.0, 1.0, 1.0])]}
  gaps = paper_tables.frozen_gaps(result)
  assert [g['row'] for g in gaps] == ['lemumo']
  columns = gaps[0]['columns']
  t_975 = {1: 12.706204736174694, 2: 4.302652729749462}
  expected = {'mAP XY ↑': [0.7, -0.3, 0.7], 'Depth MAE ↓': [0.028, 0.080, -0.030],
              'Seg. mIoU ↑': [0.012, 0.015, 0.014], 'ADE XY (m) ↓': [0.010, 0.050]}
  for title, gains in expected.items():
    g = np.asarray(gains, np.float64)
    n = len(g)
    mean = g.sum() / n
    half = t_975[n - 1] * math.sqrt(((g - mean) ** 2).sum() / (n - 1)) / math.sqrt(n)
    got = columns[title]
    np.testing.assert_allclose(got['gains'], gains, atol=1e-12)
    np.testing.assert_allclose(got['mean'], mean, atol=1e-12)
    np.testing.assert_allclose(got['ci95'], [mean - half, mean + half], atol=1e-9)
    assert got['seeds'] == n and got['wins'] == int((g > 0).sum())
  lines = paper_tables.markdown({**result, 'frozen_gaps': gaps}).splitlines()
  start = lines.index('| Method | mAP XY ↑ | Depth MAE ↓ | Seg. mIoU ↑ | ADE XY (m) ↓ |')
  assert lines[start - 2].startswith('Pretrained vs. its encoder-frozen control, paired by seed')
  assert lines[start + 2] == ('| lemumo | +0.4 [-1.1, +1.8] 2/3 | +0.026 [-0.111, +0.163] 2/3 '
                              '| **+0.014 [+0.010, +0.017] 3/3** | +0.030 [-0.224, +0.284] 2/2 |')
  assert len(lines) == start + 3
  one_seed = paper_tables.frozen_gaps({'seeds': ['0'], 'rows': [
      {**row('lemumo', xy=[3.3]), 'seeds': ['0']},
      {**row('lemumo:frozen', xy=[2.6]), 'seeds': ['0']}]})
  assert one_seed[0]['columns']['mAP XY ↑']['wins'] == 1
  assert paper_tables._gap_cell(one_seed[0]['columns']['mAP XY ↑'], 1) == '+0.7 1/1'


def test_unknown_row_fails_with_the_row_named(python_env, tmp_path):
  cmd = [sys.executable, '-m', 'benchmarks.paper_tables', '--rows=no_such_row', '--seeds=0',
         f'--out_dir={tmp_path}', '--', *TINY_FLAGS]
  proc = subprocess.run(cmd, cwd=REPO, env=python_env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0
  assert 'no_such_row' in proc.stdout + proc.stderr


def test_seeds_are_validated_before_they_become_paths(python_env, tmp_path):
  assert paper_tables.check_seeds(['0', ' 2', '007']) == ['0', '2', '7']
  for bad in (['0/../../escape'], ['-1'], ['1.5'], [''], ['1', '01']):
    with pytest.raises(ValueError, match='--seeds'):
      paper_tables.check_seeds(bad)
  out = tmp_path / 'out'
  cmd = [sys.executable, '-m', 'benchmarks.paper_tables', '--rows=lemumo',
         '--seeds=0/../../escape', f'--out_dir={out}', '--', *TINY_FLAGS]
  proc = subprocess.run(cmd, cwd=REPO, env=python_env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0 and 'are not non-negative integers' in proc.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, inside or out


# ------------------------------------------------------------------------- table presets


def _names(table):
  return [paper_tables.display_name(row) for row in paper_tables.TABLES[table].rows]


def test_presets_are_the_papers_rows_in_order():
  tables = paper_tables.TABLES
  assert tables[1].rows == ('lejepa_rgb', 'lejepa_rgb:frozen', 'lidar_only', 'lidar_only:frozen')
  assert _names(1) == ['LeJEPA', 'LeJEPA encoder frozen', 'LiDAR-only',
                       'LiDAR-only encoder frozen']
  assert _names(2) == ['Early Fusion RGBD', 'Late Fusion', 'FT-Pruned + VICReg',
                       'FT-Persistent + SIGReg', 'FT-Pruned + SIGReg (3-pass)', 'Le MuMo JEPA']
  assert _names(3) == ['LeJEPA', 'DINOv3', 'LiDAR-only', 'MultiMAE-SS', 'MultiMAE-MT',
                       'ImageBind', 'Le MuMo JEPA']
  assert tables[4].rows == ('multimae_ss', 'multimae_mt', 'imagebind', 'lemumo')
  assert tables[4].config == 'configs/nuscenes.py' and tables[5].config == 'configs/flir.py'
  assert tables[5].rows == (
      'multimae_ss', 'imagebind', 'lemumo',
      'multimae_ss:transfer', 'multimae_mt:transfer', 'imagebind:transfer', 'lemumo:transfer',
      'multimae_ss:finetune', 'multimae_mt:finetune', 'imagebind:finetune', 'lemumo:finetune')
  assert [paper_tables.SETTINGS[paper_tables.split_row(r)[1]] for r in tables[5].rows] == (
      ['Scratch'] * 3 + ['Waymo → FLIR'] * 4 + ['Fine-tune'] * 4)
  assert _names(6) == ['MultiMAE-SS', 'Early Fusion RGBD', 'LeJEPA', 'ImageBind', 'Late Fusion',
                       'DINOv3', 'Le MuMo JEPA', 'FT-Pruned + VICReg', 'MultiMAE-MT',
                       'FT-Pruned + SIGReg (3-pass)', 'FT-Persistent + SIGReg']
  assert tables[6].compute_only and not tables[3].compute_only
  # Every named row is a METHODS row or one of the rows being added (DINOv3, MultiMAE).
  names = {paper_tables.split_row(r)[0] for t in tables.values() for r in t.rows}
  assert names <= set(paper_tables.DISPLAY_NAMES)


def test_preset_rows_missing_from_this_checkout_are_skipped(capsys):
  known = {'lejepa_rgb', 'lidar_only', 'imagebind', 'lemumo'}  # without dinov3 / multimae_*
  rows = paper_tables.select_rows(paper_tables.TABLES[3].rows, from_preset=True, known=known)
  assert rows == ['lejepa_rgb', 'lidar_only', 'imagebind', 'lemumo']
  out = capsys.readouterr().out
  assert "skipping dinov3: no row 'dinov3'" in out and 'skipping multimae_mt' in out
  assert paper_tables.select_rows(['lemumo:finetune'], from_preset=False, known=known) == [
      'lemumo:finetune']
  with pytest.raises(ValueError, match="unknown row 'dinov3'"):
    paper_tables.select_rows(['dinov3'], from_preset=False, known=known)
  with pytest.raises(ValueError, match="row 'lemumo:warm'"):
    paper_tables.select_rows(['lemumo:warm'], from_preset=False, known=known)


def test_transfer_and_finetune_commands_start_from_the_transfer_encoder():
  extra = ['--config.data.data_dir=/data/flir']
  workdir = paper_tables.run_dir('/out', 'lemumo:transfer', '1')
  assert workdir == '/out/lemumo_transfer_seed1'
  assert paper_tables.report_path(workdir, 'lemumo:transfer') == (
      '/out/lemumo_transfer_seed1/probe/report.json')
  [cmd] = paper_tables.commands('configs/flir.py', 'lemumo:transfer', '1', workdir, extra, True,
                                '/waymo')
  assert cmd[3:] == ['--config=configs/flir.py:lemumo,transfer', f'--workdir={workdir}',
                     '--config.seed=1', *extra, '--config.mode=probe',
                     '--config.probe.encoder_dir=/waymo/lemumo_seed1/encoder']
  workdir = paper_tables.run_dir('/out', 'imagebind:finetune', '0')
  assert paper_tables.report_path(workdir, 'imagebind:finetune') == (
      '/out/imagebind_finetune_seed0/finetune/report.json')
  [cmd] = paper_tables.commands('configs/flir.py', 'imagebind:finetune', '0', workdir, extra,
                                True, '/waymo')
  assert cmd[3] == '--config=configs/flir.py:imagebind,finetune'
  assert cmd[-2:] == ['--config.mode=finetune',
                      '--config.finetune.encoder_dir=/waymo/imagebind_seed0/encoder']
  scratch = paper_tables.commands('configs/flir.py', 'lemumo', '0', '/w', [], True, '/waymo')
  assert [c[-1] for c in scratch] == ['--config.mode=pretrain_probe', '--config.mode=profile']
  assert scratch[0][3] == '--config=configs/flir.py:lemumo'
  [profile] = paper_tables.commands('configs/waymo.py', 'dinov3', '0', '/w', [], True,
                                    compute_only=True)
  assert profile[-1] == '--config.mode=profile'
  with pytest.raises(ValueError, match='needs --transfer_from'):
    paper_tables.commands('configs/flir.py', 'lemumo:finetune', '0', '/w', [], True)


def test_markdown_setting_column_and_compute_only():
  def row(name, setting, value):
    return {'row': name, 'name': name, 'setting': setting, 'method': name,
            'training_data': 'RGB+Thermal', 'seeds': ['0'], 'compute': {},
            'metrics': {'mAP50 ↑': {'mean': value, 'std': 0.0},
                        'Car mAP50 ↑': {'mean': 10 * value, 'std': 0.0}}}
  lines = paper_tables.markdown({'seeds': ['0'], 'rows': [
      row('Le MuMo JEPA', 'Scratch', 0.41), row('Le MuMo JEPA', 'Waymo → FLIR', 1.56),
      row('Le MuMo JEPA', 'Fine-tune', 2.39)]}).splitlines()
  assert lines[0] == '| Setting | Method | Training Data | mAP50 ↑ | Car mAP50 ↑ |'
  assert lines[1] == '|---|---|---|---:|---:|'
  assert lines[4] == '| Fine-tune | Le MuMo JEPA | RGB+Thermal | **2.39** | **23.90** |'
  compute = {'Time (min)': 55.09, 'SSL PFLOPs': 86.0, 'Memory (GB)': 12.11,
             'memory_is_xla_estimate': False}
  lines = paper_tables.markdown({'seeds': ['0'], 'rows': [
      {'row': 'lemumo', 'name': 'Le MuMo JEPA', 'setting': 'Scratch', 'method': 'lemumo',
       'training_data': '', 'seeds': ['0'], 'metrics': {}, 'compute': compute}]}).splitlines()
  assert lines[0] == '| Method | Time (min) | SSL PFLOPs | Memory (GB) |'
  assert lines[2] == '| Le MuMo JEPA | 55.09 | 86 | 12.110 |'


# ------------------------------------------------------------- the arguments a run was made with


def test_invocation_changes_name_each_flag_and_allow_only_resumable_ones():
  resumable = runs.resumable_flags()
  assert {'train.log_every', 'probe.checkpoint_every', 'data.num_threads',
          'finetune.patience'} <= set(resumable)
  made = runs.invocation('configs/synthetic.py', ['--config.probe.num_steps=8',
                                                  '--config.train.log_every', '4'])
  # The same arguments written another way: a normalised path, '--k v' for '--k=v'.
  same = runs.invocation('./configs//synthetic.py', ['--config.train.log_every=4',
                                                     '--config.probe.num_steps', '8'])
  assert runs.invocation_changes(made, same, resumable) == ([], [])
  refused, allowed = runs.invocation_changes(
      made, runs.invocation('configs/synthetic.py', ['--config.probe.num_steps=16',
                                                     '--config.train.log_every=9',
                                                     '--config.optim.lr=0.001']), resumable)
  assert refused == ["--config.optim.lr: '<absent>' -> '0.001'",
                     "--config.probe.num_steps: '8' -> '16'"]
  assert allowed == ["--config.train.log_every: '4' -> '9'"]
  # Another config file, another transfer source, a flag dropped: refused (a dropped cadence
  # flag is allowed).
  refused, allowed = runs.invocation_changes(
      made, runs.invocation('configs/waymo.py', [], '/runs/a'), resumable)
  assert refused == ["--config: 'configs/synthetic.py' -> 'configs/waymo.py'",
                     "--config.probe.num_steps: '8' -> '<absent>'",
                     "--transfer_from: None -> '/runs/a'"]
  assert allowed == ["--config.train.log_every: '4' -> '<absent>'"]
  # The last of a repeated flag counts, as in absl; a bare flag has an empty value.
  assert runs._flag_values(['--config.a=1', '--config.a=2', '--b', '--c', 'x']) == {
      'config.a': '2', 'b': '', 'c': 'x'}


def test_runs_made_with_other_arguments_are_refused_before_anything_runs(tmp_path, capsys,
                                                                         monkeypatch):
  made = runs.invocation('configs/synthetic.py', ['--config.probe.num_steps=8'])
  recorded, legacy, fresh = (str(tmp_path / n) for n in ('lemumo_seed0', 'lemumo_seed1',
                                                          'lemumo_seed2'))
  runs.record_invocation(recorded, made)
  with open(tmp_path / 'lemumo_seed0' / runs.INVOCATION_FILE) as f:
    assert json.load(f) == {'config': 'configs/synthetic.py',
                            'extra': ['--config.probe.num_steps=8'],
                            'commits': [runs.git_commit()]}
  for name in ('lemumo_seed0', 'lemumo_seed1'):  # a run's first file
    (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / name / 'config.json').write_text('{}')
  pairs = [(recorded, made), (legacy, made), (fresh, made)]
  assert runs.check_invocations(pairs) == [legacy]  # a run without a record is reported
  other = runs.invocation('configs/synthetic.py', ['--config.probe.num_steps=16'])
  with pytest.raises(SystemExit) as e:
    runs.check_invocations([(fresh, other), (recorded, other)])
  assert recorded in str(e.value) and "--config.probe.num_steps: '8' -> '16'" in str(e.value)
  # A resume-compatible change passes, is printed and becomes the record.
  cadence = runs.invocation('configs/synthetic.py', ['--config.probe.num_steps=8',
                                                     '--config.probe.log_every=2'])
  assert runs.check_invocations([(recorded, cadence)]) == []
  runs.record_invocation(recorded, cadence)
  assert "--config.probe.log_every: '<absent>' -> '2'" in capsys.readouterr().out
  assert runs.read_invocation(recorded) == dict(cadence, commits=[runs.git_commit()])
  # A resume from another checkout adds its commit.
  monkeypatch.setattr(runs, 'git_commit', lambda: 'abc1234')
  runs.record_invocation(recorded, cadence)
  assert runs.read_invocation(recorded)['commits'][1:] == ['abc1234']
  monkeypatch.undo()
  # A record with no run beside it (the call failed before its run wrote anything, a mistyped
  # flag say) is replaced, not held against the next call.
  runs.record_invocation(fresh, other)
  assert runs.check_invocations([(fresh, made)]) == []
  runs.record_invocation(fresh, made)
  assert runs.read_invocation(fresh) == dict(made, commits=[runs.git_commit()])
  assert 'changed settings' not in capsys.readouterr().out
  # A truncated record is one error naming the file.
  path = tmp_path / 'lemumo_seed0' / runs.INVOCATION_FILE
  path.write_text(path.read_text()[:10])
  with pytest.raises(ValueError, match=str(path)):
    runs.check_invocations([(recorded, cadence)])


def test_table_flags_fail_clearly(python_env, tmp_path):
  """Table 5's transfer rows without --transfer_from, or with no encoders there, stop before
  anything runs; --table, --rows and --claims are refused together."""
  base = [sys.executable, '-m', 'benchmarks.paper_tables', '--table=5', f'--out_dir={tmp_path}']
  proc = subprocess.run(base, cwd=REPO, env=python_env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0 and '--transfer_from' in proc.stderr
  assert "'lemumo:transfer'" in proc.stderr and not list(tmp_path.iterdir())
  proc = subprocess.run(base + [f'--transfer_from={tmp_path / "waymo"}'], cwd=REPO,
                        env=python_env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'no exported encoder in' in proc.stderr
  assert str(tmp_path / 'waymo' / 'lemumo_seed0' / 'encoder') in proc.stderr
  proc = subprocess.run(base + ['--rows=lemumo'], cwd=REPO, env=python_env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0 and 'give one of --table, --rows and --claims' in proc.stderr
  proc = subprocess.run(base[:3] + ['--claims', '--rows=lemumo', f'--out_dir={tmp_path}'],
                        cwd=REPO, env=python_env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and 'give one of --table, --rows and --claims' in proc.stderr
  # A finished run made with another probe schedule: refused before anything runs.
  done = tmp_path / 'tables' / 'lemumo_seed0'
  runs.record_invocation(str(done), runs.invocation('configs/synthetic.py',
                                                    ['--config.probe.num_steps=8']))
  (done / 'config.json').write_text('{}')
  proc = subprocess.run(base[:3] + ['--rows=lemumo', '--seeds=0,1', '--profile=false',
                                    f'--out_dir={tmp_path / "tables"}', '--',
                                    '--config.probe.num_steps=16'],
                        cwd=REPO, env=python_env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and str(done) in proc.stderr
  assert "--config.probe.num_steps: '8' -> '16'" in proc.stderr
  assert sorted(p.name for p in (tmp_path / 'tables').iterdir()) == ['lemumo_seed0']


@pytest.mark.slow
def test_transfer_and_finetune_rows_end_to_end(python_env, tmp_path):
  """A pretrained row, then its transfer and fine-tune rows from that run's encoder."""
  tiny = [*TINY_FLAGS, *TINY_PROBE_FLAGS, *TINY_FINETUNE_FLAGS,
          "--config.probe.heads=('centernet2d',)"]
  run = lambda *args: subprocess.run(
      [sys.executable, '-m', 'benchmarks.paper_tables', '--seeds=0', '--noprofile', *args, '--',
       *tiny], cwd=REPO, env=python_env, capture_output=True, text=True, timeout=900)
  proc = run('--rows=lemumo', f'--out_dir={tmp_path / "source"}')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  proc = run('--rows=lemumo:transfer,lemumo:finetune', f'--out_dir={tmp_path / "target"}',
             f'--transfer_from={tmp_path / "source"}')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((tmp_path / 'target' / 'tables.json').read_text())
  assert [(r['setting'], r['name'], r['method']) for r in result['rows']] == [
      ('Waymo → FLIR', 'Le MuMo JEPA', 'lemumo'),
      ('Fine-tune', 'Le MuMo JEPA', 'lemumo fine-tuned')]
  assert all('mAP50 ↑' in r['metrics'] for r in result['rows'])
  encoder = tmp_path / 'source' / 'lemumo_seed0' / 'encoder'
  for row, stage in (('lemumo_transfer', 'probe'), ('lemumo_finetune', 'finetune')):
    details = json.loads((tmp_path / 'target' / f'{row}_seed0' / stage / 'report.json')
                         .read_text())['details']
    assert str(encoder) in details['encoder']
  assert (tmp_path / 'target' / 'tables.md').read_text().startswith(
      '| Setting | Method | Training Data | mAP50 ↑ | Car mAP50 ↑ |')
  proc = run('--rows=lemumo', f'--out_dir={tmp_path / "source"}')  # re-tabled as it is
  assert proc.returncode == 0 and 'done earlier' in proc.stdout, proc.stderr[-3000:]
  # A finished run copied under another seed's name is not tabled as that seed, nor a run
  # whose profile.json is another row's.
  shutil.copytree(tmp_path / 'source' / 'lemumo_seed0', tmp_path / 'source' / 'lemumo_seed2')
  proc = run('--rows=lemumo', '--seeds=2', f'--out_dir={tmp_path / "source"}')
  assert proc.returncode != 0
  assert 'finished run(s) hold other settings' in proc.stderr
  assert "probe/config.json: seed: 0 -> 2" in proc.stderr
  assert "config.json: seed: 0 -> 2" in proc.stderr
  (tmp_path / 'source' / 'lemumo_seed0' / 'profile.json').write_text('{"method": "lejepa_rgb"}')
  proc = run('--rows=lemumo', f'--out_dir={tmp_path / "source"}')
  assert proc.returncode != 0
  assert "profile.json: method: 'lejepa_rgb' -> 'lemumo'" in proc.stderr
