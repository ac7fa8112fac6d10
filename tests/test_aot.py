"""The per-op cost reader (hlo_costs), accelerator AOT compilation (aot) and its benchmark.

The per-op counts are checked against XLA's own cost analysis of the same programs on the CPU
(and on the TPU target when libtpu is installed). The TPU and CUDA compiles need the optional
wheels of requirements-aot.txt and are skipped, saying so, without them.
"""

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, tiny_config
from lemumo_jax import aot, hlo_costs

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
HAS_CUDA_PLUGIN = importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason='libtpu is not installed (pip install --no-deps -r '
    'requirements-aot.txt): the TPU target cannot be compiled for')
needs_cuda_plugin = pytest.mark.skipif(
    not HAS_CUDA_PLUGIN, reason='the CUDA PJRT plugin is not installed (pip install --no-deps '
    '-r requirements-aot.txt): the H100 target cannot be compiled for')


def _cpu_costs(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  ops = hlo_costs.program_ops(compiled.as_text())
  return compiled.cost_analysis(), hlo_costs.totals(ops), ops


def test_dot_and_conv_flops_match_xla():
  a, b = jnp.ones((64, 48)), jnp.ones((48, 32))
  costs, totals, _ = _cpu_costs(lambda x, y: x @ y, a, b)
  assert totals['flops'] == costs['flops'] == 2 * 64 * 48 * 32
  # A batched matmul and a strided patch-embedding convolution (forward and backward).
  q = jnp.ones((4, 3, 10, 8))
  costs, totals, _ = _cpu_costs(lambda x, y: jnp.einsum('bhtd,bhsd->bhts', x, y), q, q)
  assert totals['flops'] == costs['flops'] == 2 * 4 * 3 * 10 * 10 * 8
  images, kernel = jnp.ones((2, 32, 32, 3)), jnp.ones((8, 8, 3, 16))

  def embed(x, w):
    out = jax.lax.conv_general_dilated(x, w, (8, 8), 'VALID',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(out ** 2)

  conv_flops = 2 * 2 * 4 * 4 * 16 * (8 * 8 * 3)
  costs, totals, _ = _cpu_costs(embed, images, kernel)
  assert abs(totals['flops'] - costs['flops']) <= 0.01 * costs['flops']
  assert totals['flops'] >= conv_flops
  costs, totals, _ = _cpu_costs(jax.grad(embed, argnums=(0, 1)), images, kernel)
  assert abs(totals['flops'] - costs['flops']) <= 0.02 * costs['flops']


def test_elementwise_transcendentals_and_bytes_match_xla():
  x = jnp.ones((128, 256))
  fn = lambda a: jnp.sum(jnp.exp(jnp.sin(a) * 2.0 + a), axis=0)
  costs, totals, _ = _cpu_costs(fn, x)
  assert totals['transcendentals'] == costs['transcendentals'] == 2 * 128 * 256
  assert abs(totals['flops'] - costs['flops']) <= 0.05 * costs['flops']
  assert totals['bytes'] == costs['bytes accessed']
  costs, totals, _ = _cpu_costs(lambda a: jnp.exp(jnp.sin(a) * 2.0 + a), x)
  assert totals['bytes'] == costs['bytes accessed'] == 2 * 4 * 128 * 256  # one fusion: x in, out


def test_sources_name_the_line_that_made_the_op():
  def make(a, b):
    return jnp.tanh(a @ b)   # the line the matmul fusion must name
  line = make.__code__.co_firstlineno + 1
  _, _, ops = _cpu_costs(make, jnp.ones((8, 4)), jnp.ones((4, 3)))
  sources = {op.source(package='tests') for op in ops}
  assert f'test_aot.py:{line} test_sources_name_the_line_that_made_the_op.<locals>.make' in sources


# A TPU-style batched matmul: the TPU compiler writes batch dims as dilated conv windows, and
# tiles arrays T(8,128), placing some in VMEM (S(1)). Shapes as in the paper step's attention.
_TPU_MODULE = """HloModule m, is_scheduled=true

%fused (param_0: bf16[128,6,197,64], param_1: bf16[128,6,64,197]) -> bf16[128,6,197,197] {
  %param_0 = bf16[128,6,197,64]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %param_1 = bf16[128,6,64,197]{3,2,1,0:T(8,128)(2,1)} parameter(1)
  ROOT %conv = bf16[128,6,197,197]{3,2,1,0:T(8,128)(2,1)} convolution(%param_0, %param_1), window={size=128x6 stride=127x5 lhs_dilate=128x6}, dim_labels=01bf_01io->01bf
}

ENTRY %main (a: bf16[128,6,197,64], b: bf16[128,6,64,197]) -> bf16[128,6,197,197] {
  %a = bf16[128,6,197,64]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %b = bf16[128,6,64,197]{3,2,1,0:T(8,128)(2,1)} parameter(1)
  %copy-start = (bf16[128,6,64,197]{3,2,1,0:T(8,128)(2,1)S(1)}, bf16[128,6,64,197]{3,2,1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%b)
  %copy-done = bf16[128,6,64,197]{3,2,1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  ROOT %f = bf16[128,6,197,197]{3,2,1,0:T(8,128)(2,1)} fusion(%a, %copy-done), kind=kOutput, calls=%fused, backend_config={"estimated_cycles":"1000"}
}
"""


def test_tpu_batched_conv_flops_padding_and_vmem():
  ops = {op.name: op for op in hlo_costs.program_ops(_TPU_MODULE)}
  assert set(ops) == {'copy-start', 'f'}
  assert ops['f'].flops == 2 * 128 * 6 * 197 * 197 * 64
  assert ops['f'].cycles == 1000
  q, kt, out = 128 * 6 * 197 * 64, 128 * 6 * 64 * 197, 128 * 6 * 197 * 197
  assert ops['f'].bytes == 2 * (q + kt + out)
  # Padded to the (8, 128) tile of the two minor dims: 197 -> 200 rows or 256 lanes.
  padded = lambda rows, cols: 128 * 6 * (-(-rows // 8) * 8) * (-(-cols // 128) * 128) * 2
  assert ops['f'].padded_bytes == padded(197, 64) + padded(64, 197) + padded(197, 197)
  # The prefetched operand is in VMEM: the fusion's HBM traffic is a and its output; the copy
  # reads b from HBM (and writes VMEM).
  assert ops['f'].hbm_bytes == padded(197, 64) + padded(197, 197)
  assert ops['copy-start'].hbm_bytes == padded(64, 197)


def test_roofline():
  t = aot.target('h100')
  compute_bound = aot.roofline(989e12 * 1e-3, 1e9, t)
  assert compute_bound['step_ms'] == pytest.approx(1.0)
  assert compute_bound['utilisation'] == pytest.approx(1.0)
  memory_bound = aot.roofline(989e12 * 1e-3, 3352.32e9 * 4e-3, t)
  assert memory_bound['step_ms'] == pytest.approx(4.0)
  assert memory_bound['utilisation'] == pytest.approx(0.25)
  with pytest.raises(ValueError, match='unknown AOT target'):
    aot.target('v9')


def _small_config(method='lemumo'):
  config = tiny_config(method)
  config.model.dtype = 'bfloat16'
  return config


@needs_libtpu
def test_tiny_step_compiles_for_tpu_v5e():
  step = aot.compile_step(_small_config(), aot.target('v5e'))
  summary = aot.summary(step)
  assert summary['flops_source'] == 'XLA cost analysis'
  # The per-op count agrees with XLA's TPU cost model.
  assert summary['per_op_flops'] == pytest.approx(summary['flops'], rel=0.05)
  assert summary['memory']['total'] > summary['memory']['argument'] > 0
  assert summary['xla_estimate_ms'] > 0
  assert 0 < summary['roofline']['utilisation'] <= 1


@needs_cuda_plugin
def test_tiny_step_compiles_for_h100_with_cudnn_attention():
  from lemumo_jax import profiling
  config = _small_config('lejepa_rgb')
  step = aot.compile_step(config, aot.target('h100'))
  text = step.compiled.as_text()
  assert '__cudnn$fmhaSoftmax' in text and '__cudnn$fmhaSoftmaxBackward' in text
  summary = aot.summary(step)
  assert summary['flops_source'] == 'per-op count'
  # With XLA attention the H100 program's per-op count agrees with XLA's own count of the same
  # step on this CPU; cuDNN's is larger (its block stack runs on tokens padded to 8: 17 -> 24).
  config.model.attention = 'xla'
  xla_summary = aot.summary(aot.compile_step(config, aot.target('h100')))
  cpu_flops = profiling.compiled_flops(profiling.setup_step(config, 4).compiled())
  assert xla_summary['flops'] == pytest.approx(cpu_flops, rel=0.05)
  assert summary['flops'] > xla_summary['flops']


@pytest.mark.slow
@needs_libtpu
def test_benchmark_prints_the_table(tmp_path):
  out = tmp_path / 'aot.json'
  config = _small_config()
  flags = [f'--config.{k}={v}' for k, v in (
      ('data.image_size', (48, 64)), ('views.global_size', 32), ('views.local_size', 16),
      ('views.num_local', 2), ('model.img_size', 32), ('model.patch_size', 8),
      ('model.width', 32), ('model.depth', 2), ('model.num_heads', 2),
      ('projector.hidden_dim', 32), ('objective.num_slices', 16))]
  del config
  run = subprocess.run(
      [sys.executable, '-m', 'benchmarks.aot', '--config=configs/synthetic.py',
       '--rows=lejepa_rgb,lemumo', '--targets=v5e', '--batch_size=8', '--breakdown=lemumo',
       f'--json_out={out}', *flags], cwd=REPO, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert '| lemumo |' in run.stdout and 'Per-op breakdown: lemumo on v5e' in run.stdout
  results = json.loads(out.read_text())
  assert [r['row'] for r in results] == ['lejepa_rgb', 'lemumo']
  assert results[1]['breakdown']['top']['hbm_bytes']


def test_compiler_options_parsing():
  # lemumo_jax.aot, not benchmarks.aot: importing a benchmark module defines its absl flags,
  # which clash with another benchmark's in the same pytest worker.
  entries = ['h100:xla_gpu_enable_triton_gemm=false', 'v5e:xla_tpu_foo=3', 'v5e:xla_x=0.5']
  assert aot.compiler_options('h100', entries) == {'xla_gpu_enable_triton_gemm': False}
  assert aot.compiler_options('v5e', entries) == {'xla_tpu_foo': 3, 'xla_x': 0.5}
  with pytest.raises(ValueError, match='target:key=value'):
    aot.compiler_options('h100', ['xla_gpu_enable_triton_gemm=false'])


def test_remat_policies_keep_params_and_gradients():
  """model.remat changes what the backward pass keeps, not the loss or its gradients."""
  from lemumo_jax.training import pretrain
  from lemumo_jax.training import state as state_lib
  grads = {}
  for remat in ('none', 'full', 'dots'):
    config = tiny_config('lemumo')
    config.model.remat = remat
    mesh = state_lib.make_mesh()
    init_state, train_step, _ = pretrain.build(config, mesh, 4)
    state = jax.jit(init_state)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = {'rgb': rng.integers(0, 256, (8, 48, 64, 3), dtype=np.uint8),
             'companion': rng.random((8, 48, 64), dtype=np.float32)}
    new_state, metrics = jax.jit(train_step)(state, batch, jax.random.PRNGKey(1))
    grads[remat] = (jax.tree.map(np.asarray, new_state.params), float(metrics['loss']))
  for remat in ('full', 'dots'):
    assert jax.tree.structure(grads[remat][0]) == jax.tree.structure(grads['none'][0])
    assert grads[remat][1] == pytest.approx(grads['none'][1], rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 grads[remat][0], grads['none'][0])


def test_workdirs_from_before_attention_and_remat_resume(tmp_path, capsys):
  """model.attention / model.remat are how the step computes: a run recorded before they
  existed, or with other values, resumes (the change is printed), and an exported encoder's
  values do not have to match the probing run's."""
  from lemumo_jax.training import pretrain, pretrained
  old = tiny_config()
  del old.model['attention']
  del old.model['remat']
  pretrain.check_workdir_config(str(tmp_path), old)
  new = tiny_config()
  new.model.remat = 'full'
  pretrain.check_workdir_config(str(tmp_path), new)
  out = capsys.readouterr().out
  assert "model.attention: '<absent>' -> 'auto'" in out and "model.remat: '<absent>'" in out
  exported = dict(new.model.to_dict(), attention='cudnn', remat='dots')
  assert not pretrained.model_mismatches(exported, tiny_config().model)
