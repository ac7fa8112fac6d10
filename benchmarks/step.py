"""Times THE jitted pretraining step for the paper's method rows; prints a table last.

  python -m benchmarks.step                      # configs/waymo.py: ViT-S/16, batch 64, 2x224+8x96
  python -m benchmarks.step --rows=lejepa_rgb,lemumo --batch_size=32 --steps=20
  # reduced size on a CPU (ratios only; RESULTS.md has the command used there)
  python -m benchmarks.step --batch_size=16 --config.model.width=192 --config.model.depth=4 \
      --config.model.num_heads=3 --config.views.global_size=112 --config.views.num_local=4 \
      --config.views.local_size=48 --steps=5 --warmup=2
  # the real input pipeline (grain loader + on-device views) against a constant batch
  python -m benchmarks.step --mode=input \
      --config.data.data_dir=/data/tfds/lemumo_waymo/front_320x480/1.0.0

Every row is `configs/common.py` METHODS[row] applied on top of --config and its overrides, then
THE train step the training loop runs (pretrain.build + jit_train_step, via
profiling.setup_step).

--mode=step, per row:
  step ms     median wall time of --steps steps after --warmup (each synchronised), fed one
              constant device batch (no input pipeline)
  samples/s   batch / step time
  TFLOP/s     XLA cost-analysis FLOPs of the step (all devices) / step time
  MFU         TFLOP/s / (--peak_tflops x devices); the default peak is the bf16 dense peak of
              the device kind (profiling.PEAK_BF16_TFLOPS: H100, H200, ...), else n/a
  peak GB     the device's peak bytes in use (memory_stats(); n/a on CPU)
  XLA GB      XLA's static estimate of the step's per-device footprint (every backend)
  / rgb       step time, FLOPs and memory (peak where measured, else XLA's) over lejepa_rgb's
--mode=input, per row: the grain loader alone (pipeline.pretrain_loader, host side), the step
fed by it (host batch -> global array -> views on the device -> update) and the step fed a
constant batch, as mean rates over --steps after --warmup; ratio = fed / constant (1.00: the
input pipeline keeps up with the step; the loader's threads share the host's cores).

Device peak memory is a process-wide high-water mark that cannot be reset, so by default
(--isolate) every row runs in a child process of its own.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from benchmarks import isolated

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/waymo.py', 'Config file; each --rows entry is applied on top of it.',
    lock_config=True)
_ROWS = flags.DEFINE_list(
    'rows', ['lejepa_rgb', 'lemumo', 'lemumo_masked', 'ft_persistent'],
    'Method rows (configs/common.py METHODS); ratios are taken against lejepa_rgb.')
_MODE = flags.DEFINE_enum('mode', 'step', ['step', 'input'],
                          'step: the step table; input: input pipeline vs constant batch.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Global batch (default: the config\'s).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per row.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
_PEAK_TFLOPS = flags.DEFINE_float(
    'peak_tflops', None, 'Peak TFLOP/s per device for MFU (default: from the device kind).')
_ISOLATE = flags.DEFINE_bool('isolate', True, 'Run every row in a child process.')
_RESULT_FILE = flags.DEFINE_string('result_file', None, 'Internal: a child writes its rows here.')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Also write the rows as JSON to this path.')

REFERENCE_ROW = 'lejepa_rgb'


def _row_config(row: str):
  return isolated.row_config(_CONFIG.value, row, _BATCH_SIZE.value)


def _measure_step(row: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lemumo_jax import profiling  # pylint: disable=g-import-not-at-top
  config = _row_config(row)
  setup = profiling.setup_step(config, total_steps=_WARMUP.value + _STEPS.value)
  compiled = setup.compiled()
  flops = profiling.compiled_flops(compiled, setup.mesh.size)
  times, setup = profiling.time_steps(setup, _WARMUP.value, _STEPS.value)
  step_s = float(np.median(times))
  device = jax.devices()[0]
  peak = _PEAK_TFLOPS.value or profiling.peak_tflops(device.device_kind)
  tflops = flops / step_s / 1e12
  return {'row': row, 'step_ms': step_s * 1e3, 'step_times_s': times,
          'samples_per_sec': setup.batch_size / step_s, 'step_flops': flops, 'tflops': tflops,
          'mfu': None if peak is None else tflops / (peak * setup.mesh.size),
          'peak_tflops_per_device': peak, 'peak_bytes': profiling.device_peak_bytes(),
          'xla_memory_bytes': profiling.memory_estimate_bytes(compiled),
          **_context(config, setup)}


def _measure_input(row: str) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lemumo_jax import profiling  # pylint: disable=g-import-not-at-top
  from lemumo_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = _row_config(row)
  warmup, steps = _WARMUP.value, _STEPS.value
  setup = profiling.setup_step(config, total_steps=warmup + steps)

  def loader():
    return iter(pipeline.pretrain_loader(config.data, setup.batch_size, seed=config.seed,
                                         start_step=0, num_steps=warmup + steps,
                                         with_seg=bool(config.views.get('with_seg', False))))

  batches = loader()
  for _ in range(warmup):
    next(batches)
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  loader_s = (time.perf_counter() - start) / steps
  constant, setup = profiling.time_steps(setup, warmup, steps)
  fed, setup = profiling.time_steps(setup, warmup, steps, batches=loader())
  constant_s, fed_s = float(np.mean(constant)), float(np.mean(fed))
  return {'row': row, 'loader_batches_per_sec': 1 / loader_s,
          'loader_samples_per_sec': setup.batch_size / loader_s,
          'constant_step_ms': constant_s * 1e3, 'fed_step_ms': fed_s * 1e3,
          'constant_samples_per_sec': setup.batch_size / constant_s,
          'fed_samples_per_sec': setup.batch_size / fed_s, 'fed_over_constant': constant_s / fed_s,
          'loader_over_step': constant_s / loader_s, **_context(config, setup)}


def _context(config, setup) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  v, m = config.views, config.model
  return {'device_kind': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
          'num_devices': setup.mesh.size, 'batch_size': setup.batch_size,
          'views': f'{v.num_global}x{v.global_size} + {v.num_local}x{v.local_size}',
          'model': f'width {m.width} depth {m.depth} heads {m.num_heads} '
                   f'patch {m.patch_size} {m.dtype}',
          'frames': 'x'.join(str(s) for s in config.data.image_size),
          'data': config.data.name, 'warmup': _WARMUP.value, 'steps': _STEPS.value}


def step_table(results: list[dict]) -> str:
  ref = next((r for r in results if r['row'] == REFERENCE_ROW), None)
  gb = lambda b: None if b is None else b / 1e9
  memory = lambda r: r['peak_bytes'] if r['peak_bytes'] is not None else r['xla_memory_bytes']
  lines = ['| row | step ms | samples/s | TFLOP/s | MFU | peak GB | XLA GB | step / rgb | '
           'FLOPs / rgb | memory / rgb |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(
        f'| {r["row"]} | {r["step_ms"]:.1f} | {r["samples_per_sec"]:.1f} | '
        f'{r["tflops"]:.4g} | {isolated.fmt(r["mfu"], ".1%")} | {isolated.fmt(gb(r["peak_bytes"]), ".2f")} | '
        f'{isolated.fmt(gb(r["xla_memory_bytes"]), ".3f")} | '
        f'{isolated.fmt(isolated.ratio(r["step_ms"], ref and ref["step_ms"]), ".2f")} | '
        f'{isolated.fmt(isolated.ratio(r["step_flops"], ref and ref["step_flops"]), ".2f")} | '
        f'{isolated.fmt(isolated.ratio(memory(r), ref and memory(ref)), ".2f")} |')
  return '\n'.join(lines)


def input_table(results: list[dict]) -> str:
  lines = ['| row | loader samples/s | fed step ms | constant step ms | fed samples/s | '
           'constant samples/s | fed / constant | loader / step |',
           '|---|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(
        f'| {r["row"]} | {r["loader_samples_per_sec"]:.1f} | {r["fed_step_ms"]:.1f} | '
        f'{r["constant_step_ms"]:.1f} | {r["fed_samples_per_sec"]:.1f} | '
        f'{r["constant_samples_per_sec"]:.1f} | {r["fed_over_constant"]:.2f} | '
        f'{r["loader_over_step"]:.2f} |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  isolated.check_rows(_ROWS.value)
  if _STEPS.value < 1 or _WARMUP.value < 0:
    raise app.UsageError(f'--steps must be >= 1 and --warmup >= 0, got {_STEPS.value} and '
                         f'{_WARMUP.value}')
  measure = _measure_step if _MODE.value == 'step' else _measure_input
  jobs = [({'rows': row}, f'row {row!r}', (row,)) for row in _ROWS.value]
  results = isolated.measure_all('benchmarks.step', jobs, measure, _ISOLATE.value,
                                 quiet=_RESULT_FILE.value is not None)
  if isolated.write_results(results, _RESULT_FILE.value, _JSON_OUT.value):
    return
  first = results[0]
  print(f'\n{flags.FLAGS["config"].config_filename} on {first["num_devices"]} x '
        f'{first["device_kind"]} ({first["backend"]}); batch {first["batch_size"]}, views '
        f'{first["views"]} of {first["frames"]} frames ({first["data"]}), {first["model"]}; '
        f'{first["steps"]} steps after {first["warmup"]}')
  print(step_table(results) if _MODE.value == 'step' else input_table(results), flush=True)


if __name__ == '__main__':
  app.run(main)
