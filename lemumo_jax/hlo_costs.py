"""Per-op costs of a compiled XLA program, read from its optimized HLO text.

`compiled.cost_analysis()` gives one total per program (and none on the deviceless CUDA
target); where the FLOPs and bytes go needs the ops. `program_ops(compiled.as_text())` walks
the scheduled module and returns one `Op` per top-level instruction that does work (a fusion, a
dot, a convolution, a copy, an async slice/copy, a collective, a custom call), with:

  flops        2 x M x N x K for every dot, 2 x out x (kernel elements / out features) for every
               convolution, and one per output element of every other arithmetic op, summed over
               a fusion's fused instructions (HloCostAnalysis's convention; transcendentals
               apart). Custom calls (cuDNN, Pallas kernels, cuBLAS on GPU) count their dot if
               the call names one (`__cublas$gemm` and friends take their shapes), else 0.
  bytes        what the op reads and writes at its boundary: every operand's bytes plus the
               output's, once each (an operand a fusion reads twice counts once). In-place
               async pieces: a copy-start reads its source and writes its destination; the
               matching -done moves nothing.
  padded bytes the same with each array padded to its layout's first tile (TPU `T(8,128)`: a
               trailing [.., 1, 5] int32 is stored as [.., 8, 128]), what memory actually holds.
  hbm bytes    the padded bytes of the arrays that live in HBM: a TPU layout marks arrays
               the compiler placed in on-chip VMEM with memory space `S(1)` (prefetched by an
               async copy, or produced and consumed there); those reads and writes never reach
               HBM. On GPU (no memory spaces) every byte is an HBM byte.
  cycles       the TPU compiler's own estimate for the op (backend_config estimated_cycles),
               where it gives one.
  op_name      the JAX op path of the fused root (metadata), to find the code that made it.

Everything here is text processing: no backend is needed, so a program compiled for a TPU or
GPU target on a CPU host is read the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable

DTYPE_BYTES = {
    'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
    'f8e4m3fnuz': 1, 'f8e5m2fnuz': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
    'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 'token': 0,
}
# Opcodes that move no data of their own (views, bookkeeping) or whose work is counted where it
# lands (the -done half of an async pair, whose -start is counted).
FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'copy-done',
        'slice-done', 'all-gather-done', 'all-reduce-done', 'collective-permute-done',
        'async-done', 'after-all', 'partition-id', 'replica-id', 'opt-barrier',
        'add-dependency', 'domain', 'iota'}
# Elementwise ops HloCostAnalysis counts as transcendentals, not FLOPs.
TRANSCENDENTAL = {'exponential', 'exponential-minus-one', 'log', 'log-plus-one', 'logistic',
                  'cosine', 'sine', 'tan', 'tanh', 'rsqrt', 'sqrt', 'cbrt', 'power', 'atan2',
                  'erf'}
# Ops of a fused computation that do no arithmetic.
NO_FLOPS = FREE | {'broadcast', 'reshape', 'transpose', 'slice', 'dynamic-slice', 'concatenate',
                   'pad', 'copy', 'reverse', 'gather', 'scatter', 'dynamic-update-slice',
                   'bitcast-convert', 'custom-call', 'fusion', 'rng-bit-generator', 'sort',
                   'while', 'conditional', 'call'}

_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^{}]*(?:\([^)]*\)[^{}]*)*\})?')
_HEADER = re.compile(r'^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$')
_INSTRUCTION = re.compile(r'^\s*(ROOT )?%([\w.\-]+) = (.*)$')
_TILE = re.compile(r':T\(([0-9,]+)\)')
_SPACE = re.compile(r'S\((\d+)\)')


@dataclasses.dataclass
class Array:
  """One array of an HLO type: dtype, dims, the first layout tile (or None), memory space."""
  dtype: str
  dims: tuple[int, ...]
  minor_to_major: tuple[int, ...] | None
  tile: tuple[int, ...] | None
  memory_space: int = 0          # 0: device memory (HBM); TPU 1: VMEM; 2: semaphores/flags

  @property
  def elements(self) -> int:
    return math.prod(self.dims)

  @property
  def bytes(self) -> float:
    return self.elements * DTYPE_BYTES.get(self.dtype, 4)

  @property
  def padded_bytes(self) -> float:
    """Bytes with the most-minor dims (in layout order) rounded up to the first tile."""
    if not self.tile or not self.dims:
      return self.bytes
    order = self.minor_to_major or tuple(reversed(range(len(self.dims))))
    major_to_minor = [self.dims[d] for d in reversed(order)]
    tile = self.tile[-len(major_to_minor):]
    for i, t in enumerate(tile, start=len(major_to_minor) - len(tile)):
      major_to_minor[i] = -(-major_to_minor[i] // t) * t
    return math.prod(major_to_minor) * DTYPE_BYTES.get(self.dtype, 4)


def parse_type(text: str) -> list[Array]:
  """Every array of an HLO type string (a tuple type lists several)."""
  arrays = []
  for dtype, dims, layout in _ARRAY.findall(text):
    if dtype not in DTYPE_BYTES:
      continue
    shape = tuple(int(d) for d in dims.split(',') if d)
    minor_to_major, tile = None, None
    if layout:
      body = layout[1:-1]
      order = body.split(':')[0]
      if order.strip():
        minor_to_major = tuple(int(d) for d in order.split(',') if d.strip())
      found = _TILE.search(body)
      if found:
        tile = tuple(int(t) for t in found.group(1).split(','))
      space = _SPACE.search(body.split(':', 1)[1] if ':' in body else '')
    arrays.append(Array(dtype, shape, minor_to_major, tile,
                        int(space.group(1)) if layout and space else 0))
  return arrays


@dataclasses.dataclass
class Instruction:
  name: str
  type_text: str
  opcode: str
  operands: list[str]
  attrs: str

  @property
  def arrays(self) -> list[Array]:
    return parse_type(self.type_text)

  def attr(self, key: str) -> str | None:
    found = re.search(rf'\b{re.escape(key)}=(\{{[^}}]*\}}|[^,\s]+)', self.attrs)
    return found.group(1).lstrip('%') if found else None

  @property
  def stack_frame_id(self) -> int | None:
    found = re.search(r'stack_frame_id=(\d+)', self.attrs)
    return int(found.group(1)) if found else None

  @property
  def op_name(self) -> str:
    found = re.search(r'op_name="([^"]*)"', self.attrs)
    return found.group(1) if found else ''


def _split_type(rest: str) -> tuple[str, str]:
  """'<type> <opcode>(...' -> (type, remainder starting at the opcode)."""
  if rest.startswith('('):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  space = rest.index(' ')
  return rest[:space], rest[space + 1:]


def _parse_instruction(line: str) -> Instruction | None:
  found = _INSTRUCTION.match(line)
  if not found:
    return None
  name, rest = found.group(2), found.group(3)
  type_text, rest = _split_type(rest)
  paren = rest.index('(')
  opcode = rest[:paren]
  depth, end = 0, len(rest)
  for i in range(paren, len(rest)):
    depth += rest[i] == '('
    depth -= rest[i] == ')'
    if depth == 0:
      end = i
      break
  operands = re.findall(r'%([\w.\-]+)', rest[paren + 1:end])
  return Instruction(name, type_text, opcode, operands, rest[end + 1:])


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """HLO module text -> ({computation name: instructions in order}, entry computation name)."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if line.startswith('}'):
      current = None
      continue
    if current is not None:
      instruction = _parse_instruction(line)
      if instruction is not None:
        computations[current].append(instruction)
  if entry is None:
    raise ValueError('HLO text has no ENTRY computation')
  return computations, entry


_TABLE_ROW = re.compile(r'^(\d+) (.*)$')


def parse_stack_frames(text: str) -> dict[int, list[tuple[str, str, int]]]:
  """stack_frame_id -> [(file, function, line), ...] innermost first, from the module's
  FileNames / FunctionNames / FileLocations / StackFrames tables (empty if it has none)."""
  tables: dict[str, dict[int, str]] = {}
  current = None
  for line in text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      current = tables.setdefault(line, {})
      continue
    if current is None:
      continue
    row = _TABLE_ROW.match(line)
    if not row:
      if line.strip():
        current = None
      continue
    current[int(row.group(1))] = row.group(2)
  field = lambda body, key: int(re.search(rf'{key}=(\d+)', body).group(1))
  files = {k: v.strip('"') for k, v in tables.get('FileNames', {}).items()}
  functions = {k: v.strip('"') for k, v in tables.get('FunctionNames', {}).items()}
  locations = {k: (files.get(field(v, 'file_name_id'), '?'),
                   functions.get(field(v, 'function_name_id'), '?'), field(v, 'line'))
               for k, v in tables.get('FileLocations', {}).items()}
  frames = {k: (field(v, 'file_location_id'), field(v, 'parent_frame_id'))
            for k, v in tables.get('StackFrames', {}).items()}
  stacks: dict[int, list[tuple[str, str, int]]] = {}
  for frame_id in frames:
    stack, seen, current_id = [], set(), frame_id
    while current_id in frames and current_id not in seen:
      seen.add(current_id)
      location, parent = frames[current_id]
      stack.append(locations.get(location, ('?', '?', 0)))
      current_id = parent
    stacks[frame_id] = stack
  return stacks


def _dims_attr(instruction: Instruction, key: str) -> tuple[int, ...]:
  value = instruction.attr(key)
  if not value:
    return ()
  return tuple(int(d) for d in value.strip('{}').split(',') if d.strip())


def _dot_flops(instruction: Instruction, shapes: dict[str, list[Array]]) -> float:
  out = instruction.arrays
  lhs = shapes.get(instruction.operands[0]) if instruction.operands else None
  if not out or not lhs:
    return 0.0
  contracting = math.prod(lhs[0].dims[d] for d in _dims_attr(instruction, 'lhs_contracting_dims'))
  return 2.0 * out[0].elements * contracting


def _window(instruction: Instruction, dims: int) -> dict[str, list]:
  """window={size=AxB stride=.. pad=lo_hixlo_hi lhs_dilate=.. rhs_dilate=..} per spatial dim."""
  found = re.search(r'window=\{([^}]*)\}', instruction.attrs)
  fields = dict(item.split('=', 1) for item in found.group(1).split()) if found else {}
  ints = lambda key, default: ([int(v) for v in fields[key].split('x')] if key in fields
                               else [default] * dims)
  pads = ([tuple(int(v) for v in p.split('_')) for p in fields['pad'].split('x')]
          if 'pad' in fields else [(0, 0)] * dims)
  return {'size': ints('size', 1), 'stride': ints('stride', 1), 'pad': pads,
          'lhs_dilate': ints('lhs_dilate', 1), 'rhs_dilate': ints('rhs_dilate', 1)}


def _valid_taps(in_size, kernel, out_size, stride, pad_lo, lhs_dilate, rhs_dilate) -> int:
  """(output position, kernel tap) pairs of one spatial dim that land on an input element (not
  on padding or a dilation hole): HloCostAnalysis's count. The TPU compiler writes batched
  matmuls as convolutions whose batch dims are such dilated windows."""
  span = (in_size - 1) * lhs_dilate + 1
  count = 0
  for k in range(kernel):
    offset = k * rhs_dilate - pad_lo
    for o in range(out_size):
      pos = o * stride + offset
      if 0 <= pos < span and pos % lhs_dilate == 0:
        count += 1
  return count


def _conv_flops(instruction: Instruction, shapes: dict[str, list[Array]]) -> float:
  """2 x output batch x output features x kernel input features x valid taps per spatial dim."""
  out = instruction.arrays
  lhs = shapes.get(instruction.operands[0]) if instruction.operands else None
  kernel = shapes.get(instruction.operands[1]) if len(instruction.operands) > 1 else None
  labels = instruction.attr('dim_labels') or ''
  if not out or not lhs or not kernel or '_' not in labels or '->' not in labels:
    return 0.0
  lhs_labels, rest = labels.split('_', 1)
  kernel_labels, out_labels = rest.split('->')
  spatial = sorted(c for c in lhs_labels if c.isdigit())
  window = _window(instruction, len(spatial))
  taps = 1
  for i, d in enumerate(spatial):
    taps *= _valid_taps(lhs[0].dims[lhs_labels.index(d)], window['size'][i],
                        out[0].dims[out_labels.index(d)], window['stride'][i],
                        window['pad'][i][0], window['lhs_dilate'][i], window['rhs_dilate'][i])
  batch = out[0].dims[out_labels.index('b')]
  features = out[0].dims[out_labels.index('f')]
  in_features = kernel[0].dims[kernel_labels.index('i')]
  return 2.0 * batch * features * in_features * taps


def _attention_flops(instruction: Instruction, shapes: dict[str, list[Array]],
                     backward: bool) -> float:
  """cuDNN fused attention (q, k, v in [B, T, N, H] as JAX lowers them): the two matmuls of the
  forward, 4 B N T S H, or the four of the backward, 8 B N T S H, as XLA counts the same
  attention written with dots (the backward's recomputation of the logits is not counted)."""
  q = shapes.get(instruction.operands[0]) if instruction.operands else None
  k = shapes.get(instruction.operands[1]) if len(instruction.operands) > 1 else None
  if not q or not k or len(q[0].dims) != 4:
    return 0.0
  batch, length, heads, head_dim = q[0].dims
  return (8.0 if backward else 4.0) * batch * heads * length * k[0].dims[1] * head_dim


def _custom_call_flops(instruction: Instruction, shapes: dict[str, list[Array]]) -> float:
  target = instruction.attr('custom_call_target') or ''
  if target.startswith('"__cudnn$conv'):
    return _conv_flops(instruction, shapes)
  if target.startswith('"__cudnn$fmha'):
    return _attention_flops(instruction, shapes, backward='Backward' in target)
  if 'gemm' not in target.lower() and 'matmul' not in target.lower():
    return 0.0
  config = re.search(r'backend_config=(\{.*\})', instruction.attrs)
  try:
    dims = json.loads(config.group(1)).get('gemm_backend_config', {}).get(
        'dot_dimension_numbers', {}) if config else {}
  except ValueError:
    dims = {}
  lhs = shapes.get(instruction.operands[0]) if instruction.operands else None
  out = instruction.arrays
  if not lhs or not out or not dims:
    return 0.0
  contracting = math.prod(lhs[0].dims[int(d)] for d in dims.get('lhs_contracting_dimensions', []))
  return 2.0 * out[0].elements * contracting


def _arithmetic(computations, name: str, memo: dict) -> tuple[float, float]:
  """(flops, transcendentals) of a (fused) computation, fused calls included."""
  if name in memo:
    return memo[name]
  flops = transcendentals = 0.0
  instructions = computations.get(name, [])
  shapes = {i.name: i.arrays for i in instructions}
  for instruction in instructions:
    f, t = _instruction_arithmetic(computations, instruction, shapes, memo)
    flops += f
    transcendentals += t
  memo[name] = (flops, transcendentals)
  return memo[name]


def _instruction_arithmetic(computations, instruction, shapes, memo) -> tuple[float, float]:
  opcode = instruction.opcode
  if opcode == 'dot':
    return _dot_flops(instruction, shapes), 0.0
  if opcode == 'convolution':
    return _conv_flops(instruction, shapes), 0.0
  if opcode == 'custom-call':
    return _custom_call_flops(instruction, shapes), 0.0
  if opcode in ('fusion', 'call', 'async-start'):
    called = instruction.attr('calls') or instruction.attr('to_apply')
    return _arithmetic(computations, called, memo) if called else (0.0, 0.0)
  if opcode in ('reduce', 'reduce-window'):
    operand = shapes.get(instruction.operands[0]) if instruction.operands else None
    return (float(operand[0].elements) if operand else 0.0), 0.0
  if opcode in NO_FLOPS or opcode.endswith('-start') or opcode.endswith('-done'):
    return 0.0, 0.0
  elements = sum(a.elements for a in instruction.arrays)
  return (0.0, float(elements)) if opcode in TRANSCENDENTAL else (float(elements), 0.0)


@dataclasses.dataclass
class Op:
  """One top-level instruction of the entry computation and what it costs (module docstring)."""
  name: str
  opcode: str
  kind: str            # fusion kind (kLoop, kOutput, kCustom, ...) or ''
  flops: float
  transcendentals: float
  bytes: float
  padded_bytes: float
  hbm_bytes: float
  cycles: float | None
  op_name: str
  shape: str
  target: str = ''     # a custom call's target ('__cudnn$fmhaSoftmax', ...)
  stack: tuple[tuple[str, str, int], ...] = ()   # (file, function, line), innermost first

  def source(self, package: str = 'lemumo_jax') -> str:
    """'file.py:line function' of the innermost frame in `package` (else the innermost)."""
    frames = [f for f in self.stack if f'/{package}/' in f[0]] or list(self.stack)
    if not frames:
      return '?'
    path, function, line = frames[0]
    return f'{path.rsplit("/", 1)[-1]}:{line} {function}'


def _io_bytes(instruction: Instruction,
              shapes: dict[str, list[Array]]) -> tuple[float, float, float]:
  """(bytes, padded bytes, HBM bytes) the instruction reads and writes (module docstring)."""
  if instruction.opcode in FREE:
    return 0.0, 0.0, 0.0
  arrays = instruction.arrays
  if instruction.opcode in ('copy-start', 'slice-start'):
    # (destination, source, context) for copy-start; ((source), destination, context) for
    # slice-start: the op reads the source operand and writes the destination.
    arrays = [arrays[0] if instruction.opcode == 'copy-start' else arrays[1]]
  seen, operand_arrays = set(), []
  for operand in instruction.operands:
    if operand not in seen:
      seen.add(operand)
      operand_arrays.extend(shapes.get(operand, []))
  if instruction.opcode in ('slice-start', 'dynamic-slice', 'slice'):
    # Reads only the slice it writes (from the source's memory space).
    space = operand_arrays[0].memory_space if operand_arrays else 0
    operand_arrays = [dataclasses.replace(a, memory_space=space) for a in arrays]
  everything = arrays + operand_arrays
  return (sum(a.bytes for a in everything), sum(a.padded_bytes for a in everything),
          sum(a.padded_bytes for a in everything if a.memory_space == 0))


def program_ops(text: str) -> list[Op]:
  """The entry computation's ops with their costs (module docstring), in schedule order."""
  computations, entry = parse_module(text)
  stacks = parse_stack_frames(text)
  memo: dict[str, tuple[float, float]] = {}
  instructions = computations[entry]
  shapes = {i.name: i.arrays for i in instructions}
  ops = []
  for instruction in instructions:
    if instruction.opcode in FREE:
      continue
    flops, transcendentals = _instruction_arithmetic(computations, instruction, shapes, memo)
    if instruction.opcode in ('while', 'conditional'):
      flops, transcendentals = _control_flow(computations, instruction, memo)
    nbytes, padded, hbm = _io_bytes(instruction, shapes)
    cycles = re.search(r'"estimated_cycles":"([0-9]+)"', instruction.attrs)
    ops.append(Op(name=instruction.name, opcode=instruction.opcode,
                  kind=instruction.attr('kind') or '', flops=flops,
                  transcendentals=transcendentals, bytes=nbytes, padded_bytes=padded,
                  hbm_bytes=hbm,
                  cycles=float(cycles.group(1)) if cycles else None,
                  op_name=instruction.op_name, shape=instruction.type_text,
                  target=(instruction.attr('custom_call_target') or '').strip('"'),
                  stack=tuple(stacks.get(instruction.stack_frame_id, ()))))
  return ops


def _control_flow(computations, instruction, memo) -> tuple[float, float]:
  """A while loop's body x its known trip count (1 if unknown); a conditional's largest branch."""
  if instruction.opcode == 'while':
    body = instruction.attr('body')
    trips = re.search(r'"known_trip_count":\{"n":"([0-9]+)"', instruction.attrs)
    flops, transcendentals = _arithmetic(computations, body, memo) if body else (0.0, 0.0)
    n = int(trips.group(1)) if trips else 1
    return flops * n, transcendentals * n
  branches = re.findall(r'%([\w.\-]+)', instruction.attr('branch_computations') or '')
  costs = [_arithmetic(computations, b, memo) for b in branches] or [(0.0, 0.0)]
  return max(costs)


def totals(ops: Iterable[Op]) -> dict[str, float]:
  ops = list(ops)
  cycles = [op.cycles for op in ops if op.cycles is not None]
  return {'flops': sum(op.flops for op in ops),
          'transcendentals': sum(op.transcendentals for op in ops),
          'bytes': sum(op.bytes for op in ops),
          'padded_bytes': sum(op.padded_bytes for op in ops),
          'hbm_bytes': sum(op.hbm_bytes for op in ops),
          'cycles': sum(cycles) if cycles else None}


def source_of(op_name: str, depth: int = 3) -> str:
  """A short label for an op's JAX path: its last `depth` meaningful components."""
  parts = [p for p in re.split(r'/', op_name) if p and not p.startswith('jit(train_step')]
  return '/'.join(parts[-depth:]) if parts else '?'
