"""THE pretraining step compiled for TPU v5e and H100 on this (CPU) host: costs, memory, roofline.

  pip install --no-deps -r requirements-aot.txt        # libtpu + the CUDA PJRT plugin
  python -m benchmarks.aot                              # configs/waymo.py, batch 64, both targets
  python -m benchmarks.aot --targets=h100 --rows=lemumo --breakdown=lemumo
  python -m benchmarks.aot --rows=lemumo --config.model.remat=none   # any config value

Every (row, target) is `configs/common.py` METHODS[row] on top of --config, compiled by
lemumo_jax.aot.compile_step (pretrain.build + jit_train_step, the training loop's step) for one
chip of the target, in a child process of its own (--isolate). Per row and target:
  TFLOPs      FLOPs of one step: XLA's cost analysis on TPU; on the CUDA target, which reports
              none, the per-op count of lemumo_jax.hlo_costs (the 'flops from' column says which)
  transc. G   transcendentals (exp, log, sin, cos, ...)
  model GB    XLA's 'bytes accessed' (TPU cost model; n/a on CUDA)
  HBM GB      the per-op sum of the bytes each op moves to or from HBM (hlo_costs: operands and
              outputs at each op's boundary, TPU arrays padded to their tiles, VMEM-resident
              arrays excluded), what the roofline uses
  memory      XLA's memory analysis per device: arguments, outputs, temporaries, generated code,
              total = arguments + outputs - donated + temporaries + code (GB = 1e9 bytes)
  roofline    max(FLOPs / peak, HBM bytes / bandwidth) in ms, and the utilisation it implies
              (compute time / that time); TPU also: XLA's own estimate, the sum of its per-op
              cycle estimates at the chip clock (no overlap between ops)
  / rgb       estimated step, FLOPs and total memory over lejepa_rgb's on the same target
Peak figures: lemumo_jax.aot.TARGETS (with their sources). --breakdown=<row> also prints that
row's top ops by HBM bytes, by FLOPs and (TPU) by estimated cycles, each with the source line
that made it, and the totals by category (views, encoder forward/backward, ...).
"""

from __future__ import annotations

import collections
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ['JAX_PLATFORMS'] = 'cpu'  # the targets are compiled for, not run on
# libtpu takes a host-wide lock by default; compiling in several processes needs none.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from benchmarks import isolated

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/waymo.py', 'Config file; each --rows entry is applied on top of it.',
    lock_config=True)
_ROWS = flags.DEFINE_list(
    'rows', ['lejepa_rgb', 'lemumo', 'lemumo_masked', 'ft_persistent', 'lemumo_3pass'],
    'Method rows (configs/common.py METHODS); ratios are taken against lejepa_rgb.')
_TARGETS = flags.DEFINE_list('targets', ['v5e', 'h100'], 'lemumo_jax.aot.TARGETS entries.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Global batch (default: the config\'s).')
_BREAKDOWN = flags.DEFINE_list('breakdown', [], 'Rows whose per-op breakdown is printed.')
_TOP = flags.DEFINE_integer('top', 10, 'Ops per breakdown list.')
_COMPILER_OPTIONS = flags.DEFINE_list(
    'compiler_options', [], 'target:key=value XLA options for one target\'s compiles, e.g. '
    'h100:xla_gpu_enable_triton_gemm=false.')
_ISOLATE = flags.DEFINE_bool('isolate', True, 'Compile every (row, target) in a child process.')
_RESULT_FILE = flags.DEFINE_string('result_file', None, 'Internal: a child writes its row here.')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Also write the rows as JSON to this path.')
_HLO_DIR = flags.DEFINE_string('hlo_dir', None, 'Write each optimized HLO module here.')

REFERENCE_ROW = 'lejepa_rgb'


def _row_config(row: str):
  return isolated.row_config(_CONFIG.value, row, _BATCH_SIZE.value)


def category(op) -> str:
  """The part of the step an op belongs to, from its source frames and JAX op path."""
  files = ' '.join(f for f, _, _ in op.stack)
  name = op.op_name
  if op.opcode in ('copy-start', 'slice-start'):
    return 'async copies (TPU: HBM -> VMEM prefetch)'
  if 'augment.py' in files:
    return 'views (augment.py)'
  if '/objectives/' in files:
    return 'objective'
  if '/optax/' in files or 'apply_gradients' in name:
    return 'optimizer'
  direction = 'backward' if 'transpose(' in name else 'forward'
  if 'projector' in name or 'heads.py' in files:
    return f'projector {direction}'
  for part, marker in (('attention', '/attn'), ('mlp', '/mlp'), ('norms', 'norm')):
    if marker in name:
      return f'{part} {direction}'
  if 'encoder' in name or '/models/' in files:
    return f'embeddings {direction}'
  return 'other'


def breakdown(ops, top: int) -> dict:
  """Top ops by HBM bytes, FLOPs and cycles, and totals by category (plain dicts for JSON)."""
  def row(op):
    return {'name': op.name, 'opcode': op.opcode, 'kind': op.kind, 'source': op.source(),
            'category': category(op), 'flops': op.flops, 'hbm_bytes': op.hbm_bytes,
            'bytes': op.bytes, 'cycles': op.cycles, 'shape': op.shape[:80]}
  totals = collections.defaultdict(lambda: {'ops': 0, 'flops': 0.0, 'hbm_bytes': 0.0,
                                            'cycles': 0.0})
  for op in ops:
    entry = totals[category(op)]
    entry['ops'] += 1
    entry['flops'] += op.flops
    entry['hbm_bytes'] += op.hbm_bytes
    entry['cycles'] += op.cycles or 0.0
  ranked = {key: [row(op) for op in sorted(ops, key=lambda o: -(getattr(o, key) or 0))[:top]]
            for key in ('hbm_bytes', 'flops', 'cycles')}
  return {'top': ranked, 'categories': dict(totals)}


def _measure(row: str, target_name: str) -> dict:
  from lemumo_jax import aot  # pylint: disable=g-import-not-at-top
  t = aot.target(target_name)
  config = _row_config(row)
  step = aot.compile_step(config, t, compiler_options=aot.compiler_options(target_name,
                                                                       _COMPILER_OPTIONS.value))
  result = {'row': row, **aot.summary(step), 'batch_size': int(config.train.batch_size),
            'model': {k: config.model[k] for k in ('width', 'depth', 'num_heads', 'patch_size',
                                                   'dtype', 'attention', 'remat')},
            'resolved_attention': aot.for_target(config, t).model.attention,
            'views': (f'{config.views.num_global}x{config.views.global_size} + '
                      f'{config.views.num_local}x{config.views.local_size}')}
  if row in _BREAKDOWN.value:
    result['breakdown'] = breakdown(step.ops, _TOP.value)
  if _HLO_DIR.value:
    os.makedirs(_HLO_DIR.value, exist_ok=True)
    with open(os.path.join(_HLO_DIR.value, f'{row}_{target_name}.hlo.txt'), 'w') as f:
      f.write(step.compiled.as_text())
  return result


def tables(results: list[dict]) -> str:
  """One cost table and one memory table per target."""
  gb = lambda b: None if b is None else b / 1e9
  out = []
  for target_name in dict.fromkeys(r['target'] for r in results):
    rows = [r for r in results if r['target'] == target_name]
    ref = next((r for r in rows if r['row'] == REFERENCE_ROW), None)
    first = rows[0]
    out.append(f'\n{target_name} ({first["peak_tflops"]:g} TFLOP/s bf16, '
               f'{first["hbm_gbps"]:g} GB/s, {first["hbm_gb"]:g} GB); batch '
               f'{first["batch_size"]}, views {first["views"]}, model {first["model"]}')
    out.append('| row | TFLOPs | flops from | transc. G | model GB | HBM GB | bytes/FLOP | '
               'roofline ms | util | XLA est ms | XLA est util | compile s | step / rgb | '
               'FLOPs / rgb |')
    out.append('|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
      roof = r['roofline']
      est = r['xla_estimate_ms']
      est_util = None if est is None else roof['compute_ms'] / est
      out.append(
          f'| {r["row"]} | {r["flops"] / 1e12:.3f} | {r["flops_source"]} | '
          f'{r["transcendentals"] / 1e9:.2f} | {isolated.fmt(gb(r["cost_model_bytes"]), ".1f")} | '
          f'{r["hbm_bytes"] / 1e9:.1f} | {roof["bytes_per_flop"]:.4f} | '
          f'{roof["step_ms"]:.1f} | {roof["utilisation"]:.0%} | {isolated.fmt(est, ".1f")} | '
          f'{isolated.fmt(est_util, ".0%")} | {r["compile_s"]:.0f} | '
          f'{isolated.fmt(isolated.ratio(roof["step_ms"], ref and ref["roofline"]["step_ms"]), ".3f")} | '
          f'{isolated.fmt(isolated.ratio(r["flops"], ref and ref["flops"]), ".3f")} |')
    out.append(f'ridge point: {first["roofline"]["ridge_bytes_per_flop"]:.4f} bytes/FLOP\n')
    out.append('| row | arguments GB | outputs GB | donated GB | temporaries GB | code GB | '
               'total GB | memory / rgb |')
    out.append('|---|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
      m = r['memory']
      out.append(
          f'| {r["row"]} | {m["argument"] / 1e9:.2f} | {m["output"] / 1e9:.2f} | '
          f'{m["alias"] / 1e9:.2f} | {m["temp"] / 1e9:.2f} | {m["generated_code"] / 1e9:.3f} | '
          f'{m["total"] / 1e9:.2f} | '
          f'{isolated.fmt(isolated.ratio(m["total"], ref and ref["memory"]["total"]), ".3f")} |')
  return '\n'.join(out)


def breakdown_text(result: dict) -> str:
  b = result['breakdown']
  lines = [f'\nPer-op breakdown: {result["row"]} on {result["target"]}']
  lines.append('| category | ops | TFLOPs | HBM GB | est. ms |')
  lines.append('|---|---:|---:|---:|---:|')
  clock = {'v5e': 1.5e9}.get(result['target'])
  for name, c in sorted(b['categories'].items(), key=lambda kv: -kv[1]['hbm_bytes']):
    est = c['cycles'] / clock * 1e3 if clock and c['cycles'] else None
    lines.append(f'| {name} | {c["ops"]} | {c["flops"] / 1e12:.3f} | {c["hbm_bytes"] / 1e9:.2f} | '
                 f'{isolated.fmt(est, ".2f")} |')
  for key, title in (('hbm_bytes', 'HBM bytes'), ('flops', 'FLOPs'), ('cycles', 'cycles')):
    ranked = [r for r in b['top'][key] if r[key]]
    if not ranked:
      continue
    lines.append(f'\ntop {len(ranked)} by {title}')
    lines.append('| op | category | source | GFLOPs | HBM MB | Mcycles | shape |')
    lines.append('|---|---|---|---:|---:|---:|---|')
    for r in ranked:
      lines.append(f'| {r["name"]} ({r["opcode"]} {r["kind"]}) | {r["category"]} | '
                   f'{r["source"]} | {r["flops"] / 1e9:.1f} | {r["hbm_bytes"] / 1e6:.1f} | '
                   f'{isolated.fmt(r["cycles"] and r["cycles"] / 1e6, ".2f")} | `{r["shape"]}` |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  from lemumo_jax import aot  # pylint: disable=g-import-not-at-top
  isolated.check_rows(_ROWS.value)
  bad = [t for t in _TARGETS.value if t not in aot.TARGETS]
  if bad:
    raise app.UsageError(f'--targets: unknown {bad}; choose from {sorted(aot.TARGETS)}')
  for target_name in _TARGETS.value:
    try:  # malformed entries fail before anything compiles
      aot.compiler_options(target_name, _COMPILER_OPTIONS.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  jobs = [({'rows': row, 'targets': target_name}, f'row {row!r} on {target_name}',
           (row, target_name)) for target_name in _TARGETS.value for row in _ROWS.value]
  results = isolated.measure_all('benchmarks.aot', jobs, _measure, _ISOLATE.value,
                                 quiet=_RESULT_FILE.value is not None)
  if isolated.write_results(results, _RESULT_FILE.value, _JSON_OUT.value):
    return
  print(f'\n{flags.FLAGS["config"].config_filename}, compiled on this host for each target')
  print(tables(results))
  for result in results:
    if 'breakdown' in result:
      print(breakdown_text(result))
  sys.stdout.flush()


if __name__ == '__main__':
  app.run(main)
