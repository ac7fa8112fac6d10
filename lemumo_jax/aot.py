"""THE pretraining step compiled for an accelerator that this host does not have.

XLA compiles for a TPU or an NVIDIA GPU on a CPU-only host once the target's compiler is
installed (requirements-aot.txt: libtpu for TPUs, the CUDA PJRT plugin for GPUs; no driver and
no device are needed). The program is the training loop's own: `pretrain.build` +
`pretrain.jit_train_step` lowered with abstract arguments (the state's shapes from
`jax.eval_shape`, the loader's batch layout from `profiling.batch_layout`) on the target's
devices, then compiled by the target's compiler. What comes back is real accelerator
information: the optimized program, XLA's cost analysis where the backend has one (TPU), its
memory analysis, and the per-op costs of `hlo_costs`.

`roofline(...)` turns FLOPs and HBM bytes into a step-time estimate: max(FLOPs / peak,
bytes / bandwidth), what the step would take if compute and memory traffic overlapped perfectly;
utilisation = (FLOPs / peak) / that time. On a TPU the compiler also estimates every op's
cycles (backend_config estimated_cycles); their sum over the clock is XLA's own step-time
estimate, with no overlap between ops assumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from lemumo_jax import hlo_costs, profiling
from lemumo_jax.training import pretrain
from lemumo_jax.training import state as state_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Target:
  """One accelerator chip: how to get its compiler's devices, and its peak figures."""
  name: str
  platform: str                  # 'tpu' | 'cuda'
  peak_tflops: float             # bf16 dense, no sparsity
  hbm_gbps: float                # HBM bandwidth, GB/s
  hbm_gb: float                  # HBM capacity, GB (1e9 bytes)
  clock_ghz: float | None        # for the TPU compiler's cycle estimates
  source: str
  topology: str = ''             # TPU topology name
  target_config: str = ''        # GPU: GpuTargetConfig text proto (relative to this package)
  attention: str = 'xla'         # what model.attention='auto' means on this target


# Peak figures from the vendors' data sheets. TPU v5e: 197 TFLOP/s bf16, 819 GB/s, 16 GiB HBM2e
# per chip (cloud.google.com/tpu/docs/v5e); its clock follows from 4 MXUs x 128 x 128 MACs x 2
# FLOPs x f = 197 TFLOP/s, f = 1.5 GHz. H100 SXM5: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3,
# 80 GB (NVIDIA H100 Tensor Core GPU datasheet); the target config is OpenXLA's published
# device description (xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb), whose memory_bandwidth
# (3.352e12 B/s) is the one used here.
TARGETS: dict[str, Target] = {
    'v5e': Target('v5e', 'tpu', peak_tflops=197.0, hbm_gbps=819.0, hbm_gb=17.18,
                  clock_ghz=1.5, topology='v5e:1x1',
                  source='Cloud TPU v5e system architecture (cloud.google.com/tpu/docs/v5e)'),
    'h100': Target('h100', 'cuda', peak_tflops=989.0, hbm_gbps=3352.32, hbm_gb=80.0,
                   clock_ghz=None, target_config='targets/h100_sxm.txtpb', attention='cudnn',
                   source='NVIDIA H100 Tensor Core GPU datasheet (SXM5); OpenXLA h100_sxm.txtpb'),
}


def target(name: str) -> Target:
  if name not in TARGETS:
    raise ValueError(f'unknown AOT target {name!r}; choose from {sorted(TARGETS)}')
  return TARGETS[name]


def _parse_value(text: str):
  lowered = text.lower()
  if lowered in ('true', 'false'):
    return lowered == 'true'
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def compiler_options(target_name: str, entries: list[str]) -> dict:
  """--compiler_options entries that name `target_name`, as {key: value}."""
  options = {}
  for entry in entries:
    name, sep, setting = entry.partition(':')
    key, eq, value = setting.partition('=')
    if not sep or not eq or not key:
      raise ValueError(f'--compiler_options: {entry!r} is not target:key=value')
    if name == target_name:
      options[key] = _parse_value(value)
  return options


def target_devices(t: Target) -> list:
  """The target's devices, from its compiler's topology (no device needed)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    if t.platform == 'tpu':
      topology = topologies.get_topology_desc(
          topology_name=t.topology, platform='tpu', chip_config_name='default',
          chips_per_host_bounds=(1, 1, 1), num_slices=1)
    else:
      with open(os.path.join(_HERE, t.target_config)) as f:
        config_text = f.read()
      topology = topologies.get_topology_desc(t.name, 'cuda', target_config=config_text,
                                              topology='1x1x1')
  except Exception as e:  # pylint: disable=broad-except  (a missing plugin raises many kinds)
    wheel = 'libtpu' if t.platform == 'tpu' else 'jax-cuda12-plugin and jax-cuda12-pjrt'
    raise RuntimeError(f'cannot compile for {t.name}: its compiler is not available ({e}); '
                       f'install {wheel}: pip install --no-deps -r requirements-aot.txt') from e
  return list(topology.devices)


def _dnn_version(t: Target) -> int:
  with open(os.path.join(_HERE, t.target_config)) as f:
    found = re.search(r'dnn_version_info \{ major: (\d+) minor: (\d+)', f.read())
  return int(found.group(1)) * 10000 + int(found.group(2)) * 100 if found else 90000


@contextlib.contextmanager
def deviceless_cudnn(t: Target):
  """JAX asks the installed cuDNN for its version and the local GPU for its compute capability
  before it lowers cuDNN attention; with no GPU, answer from the target config (cuDNN 9.8,
  compute capability 9.0 for the H100). Nothing changes outside the block."""
  if t.platform != 'cuda':
    yield
    return
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  capability = (9, 0)
  saved = (fa.check_cudnn_version, fa.check_compute_capability,
           fa.is_cuda_compute_capability_equal)
  fa.check_cudnn_version = lambda: _dnn_version(t)
  fa.check_compute_capability = lambda c: capability >= tuple(int(x) for x in c.split('.'))
  fa.is_cuda_compute_capability_equal = (
      lambda c: capability == tuple(int(x) for x in c.split('.')))
  try:
    yield
  finally:
    (fa.check_cudnn_version, fa.check_compute_capability,
     fa.is_cuda_compute_capability_equal) = saved


def for_target(config: ml_collections.ConfigDict, t: Target) -> ml_collections.ConfigDict:
  """config with model.attention='auto' resolved for the target (this host's backend is CPU, so
  'auto' would otherwise mean XLA's attention)."""
  config = config.copy_and_resolve_references()
  if config.model.get('attention', 'auto') == 'auto':
    with config.unlocked():
      config.model.attention = t.attention
  return config


@dataclasses.dataclass
class CompiledStep:
  target: Target
  compiled: Any
  lower_s: float
  compile_s: float
  ops: list[hlo_costs.Op]

  @property
  def cost_analysis(self) -> dict[str, float]:
    return profiling.cost_analysis(self.compiled)

  def memory(self) -> dict[str, int]:
    """XLA's memory analysis of the step (bytes), total = arguments + outputs - aliased
    (donated) + temporaries + generated code."""
    stats = self.compiled.memory_analysis()
    fields = {'argument': stats.argument_size_in_bytes, 'output': stats.output_size_in_bytes,
              'alias': stats.alias_size_in_bytes, 'temp': stats.temp_size_in_bytes,
              'generated_code': stats.generated_code_size_in_bytes}
    fields = {k: int(v) for k, v in fields.items()}
    fields['total'] = (fields['argument'] + fields['output'] - fields['alias'] + fields['temp']
                       + fields['generated_code'])
    return fields


def compile_step(config: ml_collections.ConfigDict, t: Target, total_steps: int = 1000,
                 compiler_options: dict[str, Any] | None = None) -> CompiledStep:
  """THE train step of `config` (pretrain.build + jit_train_step) compiled for target `t` on
  one chip, the batch config.train.batch_size. `total_steps` shapes the schedules only."""
  config = for_target(config, t)
  mesh = Mesh(np.asarray(target_devices(t)), ('data',))
  with deviceless_cudnn(t):
    init_state, train_step, view_cfg = pretrain.build(config, mesh, total_steps)
    replicated = state_lib.replicated(mesh)
    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0))
    state_sharding = jax.tree.map(lambda _: replicated, abstract)
    state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    batch_size = int(config.train.batch_size)
    sharding = state_lib.batch_sharding(mesh)
    batch = {name: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=sharding)
             for name, (shape, dtype) in profiling.batch_layout(
                 config.data, view_cfg.with_seg).items()}
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    step = pretrain.jit_train_step(train_step, mesh, state_sharding)
    start = time.perf_counter()
    lowered = step.lower(state, batch, key)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options or None)
    compile_s = time.perf_counter() - start
  return CompiledStep(target=t, compiled=compiled, lower_s=lower_s, compile_s=compile_s,
                      ops=hlo_costs.program_ops(compiled.as_text()))


def roofline(flops: float, hbm_bytes: float, t: Target) -> dict[str, float]:
  """Step-time estimate max(FLOPs / peak, bytes / bandwidth) and the utilisation it implies."""
  compute_s = flops / (t.peak_tflops * 1e12)
  memory_s = hbm_bytes / (t.hbm_gbps * 1e9)
  step_s = max(compute_s, memory_s)
  return {'compute_ms': compute_s * 1e3, 'memory_ms': memory_s * 1e3, 'step_ms': step_s * 1e3,
          'utilisation': compute_s / step_s if step_s > 0 else 0.0,
          'bytes_per_flop': hbm_bytes / flops if flops else float('inf'),
          'ridge_bytes_per_flop': t.hbm_gbps * 1e9 / (t.peak_tflops * 1e12)}


def summary(step: CompiledStep) -> dict[str, Any]:
  """Everything the benchmark table prints for one compiled step (module docstring).

  FLOPs and transcendentals: XLA's cost analysis where the backend has one (TPU), else the
  per-op count of hlo_costs (the CUDA target reports none), `flops_source` says which. Bytes:
  XLA's 'bytes accessed' (TPU) and the per-op sum (every backend); the roofline uses the
  per-op HBM bytes (hlo_costs.Op.hbm_bytes: arrays in HBM, padded to their tiles), and the
  cost model's figure is printed beside it (RESULTS.md reconciles the two).
  """
  t = step.target
  costs = step.cost_analysis
  per_op = hlo_costs.totals(step.ops)
  has_costs = costs.get('flops', -1) >= 0 and 'bytes accessed' in costs
  flops = float(costs['flops']) if has_costs else per_op['flops']
  result = {
      'target': t.name, 'platform': t.platform,
      'flops': flops, 'flops_source': 'XLA cost analysis' if has_costs else 'per-op count',
      'per_op_flops': per_op['flops'],
      'transcendentals': (float(costs.get('transcendentals', 0.0)) if has_costs
                          else per_op['transcendentals']),
      'cost_model_bytes': float(costs['bytes accessed']) if has_costs else None,
      'per_op_bytes': per_op['bytes'], 'hbm_bytes': per_op['hbm_bytes'],
      'memory': step.memory(), 'lower_s': step.lower_s, 'compile_s': step.compile_s,
      'xla_estimate_ms': (per_op['cycles'] / (t.clock_ghz * 1e9) * 1e3
                          if per_op['cycles'] and t.clock_ghz else None),
      'peak_tflops': t.peak_tflops, 'hbm_gbps': t.hbm_gbps, 'hbm_gb': t.hbm_gb,
  }
  result['roofline'] = roofline(flops, per_op['hbm_bytes'], t)
  if has_costs:
    result['cost_model_roofline'] = roofline(flops, result['cost_model_bytes'], t)
  return result
