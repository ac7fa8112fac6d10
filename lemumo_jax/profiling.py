"""Compute profile of a pretraining config: the paper's Table 6 (section 4.5; S1 "Compute-profile
reporting") for any config row, and the pieces benchmarks/step.py times with.

`python -m lemumo_jax.main --config=configs/waymo.py:lemumo --config.mode=profile` builds THE
jitted training step of pretrain.py (same model, objective, optimizer, shardings, donation),
feeds it a constant device batch and reports:
  Time (min)          estimated encoder-training time of the configured schedule: the median
                      step time (after `profile.warmup_steps`, over `profile.timed_steps`,
                      each step synchronised) x the schedule's total steps.
  SSL FLOPs (PFLOPs)  FLOPs of one train step x total steps.
  VRAM (GB)           the device's peak bytes in use (`memory_stats()['peak_bytes_in_use']`,
                      the process-wide peak); n/a where the backend reports none (CPU).
and writes everything to <workdir>/profile.json.

Conventions:
- FLOPs are XLA's count (`jax.jit(f).lower(...).compile().cost_analysis()['flops']`; a
  multiply-add is 2 FLOPs) of the SPMD-partitioned program, which is per device; they are
  multiplied by the mesh size, so they are the FLOPs executed on all devices together.
  XLA counts custom calls as 0; cuDNN fused attention (model.attention on a GPU) is added from
  the program's ops (compiled_flops).
- "SSL FLOPs" of a step = the whole jitted train step: on-device views (augment.py), encoder and
  projector forward and backward, the objective, the AdamW update. It is encoder-side in the
  paper's sense: no data preparation, no host input pipeline, no probe stage. The encoder
  forward over the step's views (global + local crops) is reported beside it.
- Memory: besides the measured peak, XLA's static estimate of the step's footprint
  (`compiled.memory_analysis()`: arguments + outputs + temporaries - donated buffers, per
  device), available on every backend; the two are not the same quantity (the measured peak
  also holds whatever else the process allocated, e.g. the initialisation, and allocator
  slack).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from lemumo_jax import files, hlo_costs
from lemumo_jax.data import augment, sources
from lemumo_jax.models import encoders
from lemumo_jax.training import pretrain
from lemumo_jax.training import state as state_lib

# bf16 dense peak TFLOP/s per device (vendor data sheets, no sparsity), matched as substrings
# of jax.devices()[0].device_kind in this order (the first match wins).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ('H100 PCIe', 756.0),
    ('H100 NVL', 835.0),
    ('H100', 989.0),     # SXM5 ('NVIDIA H100 80GB HBM3')
    ('H200', 989.0),
    ('A100', 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """Known bf16 dense peak of a device kind (PEAK_BF16_TFLOPS), or None."""
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def cost_analysis(compiled) -> dict[str, float]:
  """XLA's cost dict of a compiled executable (older JAX returned a list with one dict)."""
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):
    costs = costs[0] if costs else {}
  return dict(costs or {})


def compiled_flops(compiled, num_devices: int = 1) -> float:
  """FLOPs of one execution on all `num_devices` devices (the partitioned program x count).

  XLA's cost analysis counts a custom call as 0 FLOPs; cuDNN's fused attention (model.attention
  'cudnn', the 'auto' choice on GPUs) is added from the program's ops (hlo_costs), so the
  attention matmuls are counted whichever kernel runs them.
  """
  flops = cost_analysis(compiled).get('flops')
  if flops is None or flops < 0:
    raise RuntimeError('XLA cost analysis reported no FLOP count for this backend')
  fused_attention = sum(op.flops for op in hlo_costs.program_ops(compiled.as_text())
                        if op.target.startswith('__cudnn$fmha'))
  return (float(flops) + fused_attention) * num_devices


def memory_estimate_bytes(compiled) -> int | None:
  """XLA's static per-device footprint of an executable: arguments + outputs + temporaries -
  donated (aliased) bytes; None where the backend has no memory analysis."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if stats is None:
    return None
  # Not stats.peak_memory_in_bytes: the CPU backend leaves the temporaries out of it.
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def device_peak_bytes(devices: list[jax.Device] | None = None) -> int | None:
  """Largest `peak_bytes_in_use` over this process's devices; None where the backend keeps no
  memory statistics (CPU)."""
  peaks = []
  for device in jax.local_devices() if devices is None else devices:
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def batch_layout(data_cfg: ml_collections.ConfigDict,
                 with_seg: bool = False) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{name: (per-frame shape, dtype)} of the batch the loader hands the step: rgb [H, W, 3]
  uint8, companion [H, W] float32 (H, W = data.image_size), and seg [H, W] uint8 with
  views.with_seg."""
  height, width = (int(v) for v in data_cfg.image_size)
  layout = {'rgb': ((height, width, 3), np.uint8), 'companion': ((height, width), np.float32)}
  if with_seg:
    layout['seg'] = ((height, width), np.uint8)
  return layout


def constant_host_batch(data_cfg: ml_collections.ConfigDict, global_batch_size: int,
                        seed: int = 0, with_seg: bool = False) -> dict[str, np.ndarray]:
  """This host's rows of a random batch in the loader's layout (batch_layout): rgb uint8,
  companion float32 in [0, 1), seg uint8 labels in [0, 4); b = global / process_count rows."""
  if global_batch_size % jax.process_count():
    raise ValueError(f'batch_size {global_batch_size} is not divisible by the '
                     f'{jax.process_count()} hosts')
  rows = global_batch_size // jax.process_count()
  rng = np.random.default_rng(seed + jax.process_index())
  batch = {}
  for name, (shape, dtype) in batch_layout(data_cfg, with_seg).items():
    shape = (rows, *shape)
    if name == 'companion':
      batch[name] = rng.random(shape, dtype=np.float32)
    else:
      batch[name] = rng.integers(0, 256 if name == 'rgb' else 4, shape, dtype=dtype)
  return batch


@dataclasses.dataclass
class StepSetup:
  """THE jitted train step of a config, a fresh state and a constant device batch."""
  config: ml_collections.ConfigDict
  mesh: Any
  step_fn: Any           # jitted (state, batch, key) -> (state, metrics); state donated
  state: state_lib.TrainState
  batch: dict[str, jax.Array]
  key: jax.Array
  batch_size: int
  total_steps: int
  _compiled: Any = None

  def compiled(self):
    """The step compiled for these shapes and shardings (once); time_steps runs this."""
    if self._compiled is None:
      self._compiled = self.step_fn.lower(self.state, self.batch, self.key).compile()
    return self._compiled


def setup_step(config: ml_collections.ConfigDict, total_steps: int) -> StepSetup:
  """THE pretraining step of pretrain.train (pretrain.build, jit_train_step) for a batch of
  config.train.batch_size, with a freshly initialised state; `total_steps` only shapes the
  schedules (learning rate, EMA-teacher momentum)."""
  batch_size = int(config.train.batch_size)
  mesh = state_lib.make_mesh()
  init_state, train_step, view_cfg = pretrain.build(config, mesh, total_steps)
  init_key, step_key = jax.random.split(jax.random.PRNGKey(config.seed))
  state_sharding = jax.tree.map(lambda _: state_lib.replicated(mesh),
                                jax.eval_shape(init_state, init_key))
  state = jax.jit(init_state, out_shardings=state_sharding)(init_key)
  step_fn = pretrain.jit_train_step(train_step, mesh, state_sharding)
  batch = state_lib.global_batch(mesh, constant_host_batch(config.data, batch_size, config.seed,
                                                           with_seg=view_cfg.with_seg))
  return StepSetup(config=config, mesh=mesh, step_fn=step_fn, state=state, batch=batch,
                   key=step_key, batch_size=batch_size, total_steps=total_steps)


def time_steps(setup: StepSetup, warmup: int, steps: int,
               batches=None) -> tuple[list[float], StepSetup]:
  """Runs `warmup` then `steps` steps, each synchronised; returns the timed steps' wall seconds.

  `batches`: an iterator of host batches (the real input pipeline; the time then includes
  waiting for the next batch and its transfer), or None for the constant device batch.
  The state advances (it is donated), so `setup.state` is replaced.
  """
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}')
  times = []
  state, step = setup.state, setup.compiled()
  for i in range(warmup + steps):
    start = time.perf_counter()
    if batches is None:
      batch = setup.batch
    else:
      host_batch = next(batches, None)
      if host_batch is None:
        raise RuntimeError(f'the input pipeline stopped after {i} of {warmup + steps} batches')
      batch = state_lib.global_batch(setup.mesh, host_batch)
    state, metrics = step(state, batch, setup.key)
    jax.block_until_ready((state.step, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  setup.state = state
  return times, setup


def encoder_forward_flops(config: ml_collections.ConfigDict, params: Any, mesh,
                          batch_size: int) -> float:
  """FLOPs of the encoder forward over one step's views: the global crops [Vg * B, G, G, .]
  and the local crops [Vl * B, L, L, .] (two calls, as ssl.JepaModel makes them)."""
  view_cfg = augment.ViewConfig.from_config(config.views)
  encoder = encoders.build_encoder(config.model)
  sharding = state_lib.batch_sharding(mesh)
  channels = int(config.model.companion_channels)
  total = 0.0
  for count, size in ((view_cfg.num_global, view_cfg.global_size),
                      (view_cfg.num_local, view_cfg.local_size)):
    if count == 0:
      continue
    rgb = jax.ShapeDtypeStruct((count * batch_size, size, size, 3), np.float32, sharding=sharding)
    companion = jax.ShapeDtypeStruct((count * batch_size, size, size, channels), np.float32,
                                     sharding=sharding)
    forward = jax.jit(lambda p, r, c: encoder.apply({'params': p}, r, c, train=False))
    total += compiled_flops(forward.lower(params, rgb, companion).compile(), mesh.size)
  return total


def schedule_steps(config: ml_collections.ConfigDict) -> int:
  """Total steps of the configured schedule: train.num_steps, or train.num_epochs over
  profile.num_records (if > 0) or the dataset's train split size."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  num_records = int(config.profile.num_records)
  if num_records <= 0:
    try:
      num_records = int(sources.dataset_metadata(config.data)['splits']['train'])
    except (FileNotFoundError, ValueError) as e:
      raise ValueError(
          f'mode=profile needs the schedule length: set config.data.data_dir, or '
          f'config.profile.num_records (train records per epoch), or config.train.num_steps '
          f'({e})') from e
  return pretrain.total_train_steps(config, num_records)


def _fmt(value: float | None, spec: str) -> str:
  return 'n/a' if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
  """Table 6's columns, then the per-step details."""
  gb = lambda b: None if b is None else b / 1e9
  lines = [
      f'Compute profile: {result["method"]} on {result["num_devices"]} x {result["device_kind"]}'
      f' ({result["backend"]}); batch {result["batch_size"]}, {result["total_steps"]} steps; '
      f'median of {result["timed_steps"]} steps after {result["warmup_steps"]}',
      '',
      '| Method | Time (min) | SSL FLOPs (PFLOPs) | VRAM (GB) |',
      '|---|---|---|---|',
      f'| {result["method"]} | {result["time_min"]:.2f} | {result["ssl_pflops_total"]:.4g} | '
      f'{_fmt(gb(result["peak_bytes"]), ".2f")} |',
      '',
      '| step (ms) | step GFLOPs | encoder fwd GFLOPs | samples/s | XLA step memory (GB) |',
      '|---|---|---|---|---|',
      f'| {result["step_ms"]:.1f} | {result["step_flops"] / 1e9:.4g} | '
      f'{result["encoder_forward_flops"] / 1e9:.4g} | {result["samples_per_sec"]:.1f} | '
      f'{_fmt(gb(result["xla_memory_bytes"]), ".3f")} |',
  ]
  return '\n'.join(lines)


def check_workdir_row(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to profile a row into a workdir that holds another row's run or profile (its
  profile.json would be tabled as that row's compute), naming the file."""
  for name in ('config.json', 'profile.json'):
    path = os.path.join(workdir, name)
    recorded = files.read_json(path, 'restore it, or use another --workdir')
    method = recorded.get('method') if isinstance(recorded, dict) else None
    if method not in (None, config.method):
      raise ValueError(f'{path} is of row {method!r}, not of this run\'s {config.method!r}: '
                       f'profile {config.method!r} into its own --workdir (or profile '
                       f'{method!r} with --config=<dataset>.py:{method})')


def profile(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """mode=profile: times and costs THE train step of `config`; prints Table 6's row and writes
  <workdir>/profile.json. Returns the same dict."""
  check_workdir_row(config, workdir)
  warmup, timed = int(config.profile.warmup_steps), int(config.profile.timed_steps)
  if warmup < 0 or timed < 1:
    raise ValueError(f'config.profile.warmup_steps must be >= 0 and config.profile.timed_steps '
                     f'>= 1, got {warmup} and {timed}')
  total_steps = schedule_steps(config)
  setup = setup_step(config, total_steps)
  step_flops = compiled_flops(setup.compiled(), setup.mesh.size)
  xla_memory = memory_estimate_bytes(setup.compiled())
  enc_flops = encoder_forward_flops(config, setup.state.params['encoder'], setup.mesh,
                                    setup.batch_size)
  times, setup = time_steps(setup, warmup, timed)
  step_s = float(np.median(times))
  device = jax.devices()[0]
  result = {
      'method': config.method,
      'backend': jax.default_backend(),
      'device_kind': device.device_kind,
      'num_devices': setup.mesh.size,
      'num_processes': jax.process_count(),
      'batch_size': setup.batch_size,
      'views': {'num_global': config.views.num_global, 'global_size': config.views.global_size,
                'num_local': config.views.num_local, 'local_size': config.views.local_size},
      'model': config.model.to_dict(),
      'total_steps': total_steps,
      'warmup_steps': warmup,
      'timed_steps': timed,
      'step_times_s': times,
      'step_ms': step_s * 1e3,
      'samples_per_sec': setup.batch_size / step_s,
      'time_min': step_s * total_steps / 60.0,
      'step_flops': step_flops,
      'encoder_forward_flops': enc_flops,
      'ssl_pflops_total': step_flops * total_steps / 1e15,
      'encoder_forward_pflops_total': enc_flops * total_steps / 1e15,
      'peak_bytes': device_peak_bytes(),
      'xla_memory_bytes': xla_memory,
  }
  print(format_table(result), flush=True)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'profile.json')
    files.write_json_atomic(path, result)
    print(f'Profile written to {path}', flush=True)
  return result
