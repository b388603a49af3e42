r"""Where a compiled step's time goes: a `jax.profiler` trace summarised by kind of operation.

  python benchmarks/train_step.py --config=configs/decoder.py:tiny --profile_steps=3

traces `--profile_steps` steps and adds `ours.profile` to the JSON. `summarise(trace_dir,
hlo_text, steps)` reads the trace's XSpace with `jax.profiler.ProfileData` and attributes each XLA
op's time to a kind read from the optimised HLO (a fusion takes the kind of what it contains):

  convolution  convolutions (XLA:CPU's own or a library's, cuDNN's custom calls on GPU)
  matmul       dots, cuBLAS/cuBLASLt custom calls
  attention    cuDNN's fused attention
  reduction    fusions holding a reduce: normalisation statistics, losses, sums of gradients
  layout       pure data movement: transposes, copies, slices, concatenations, pads
  elementwise  every other fusion (activations, the optimizer update, casts)
  collective   all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all
  other        ops not found in the HLO

On GPU the device planes' "XLA Ops" lines are read (one event per op, on the device's clock); on
CPU the host threads' op events, so op time can exceed the wall time when ops run in parallel.
"""

import collections
import glob
import os
import re
from typing import Optional

import jax

_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_OPCODE = re.compile(r'\s([a-z][\w\-]*)\(')
_CALLS = re.compile(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')

_COLLECTIVES = {'all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all',
                'all-reduce-start', 'all-gather-start', 'collective-permute-start',
                'reduce-scatter-start', 'all-reduce-done', 'all-gather-done',
                'collective-permute-done'}
_MOVEMENT = {'transpose', 'copy', 'bitcast', 'reshape', 'broadcast', 'slice', 'concatenate', 'pad',
             'parameter', 'constant', 'dynamic-slice', 'dynamic-update-slice', 'reverse',
             'tuple', 'get-tuple-element', 'iota', 'copy-start', 'copy-done'}
_CONTAINERS = {'while', 'conditional', 'call', 'async-start', 'async-done'}
KINDS = ('convolution', 'matmul', 'attention', 'reduction', 'layout', 'elementwise', 'collective',
         'other')


def _parse(hlo_text: str) -> dict:
  """{computation: [(name, opcode, called computations, custom-call target)]}."""
  computations, current = collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and '=' not in line.split('(')[0]:
      current = header.group(1)
      continue
    inst = _INSTRUCTION.match(line)
    if not inst or current is None:
      continue
    name, rest = inst.groups()
    opcode = _OPCODE.search(' ' + rest)
    target = _TARGET.search(rest)
    computations[current].append((name, opcode.group(1) if opcode else '', _CALLS.findall(rest),
                                  target.group(1) if target else ''))
  return computations


def op_shapes(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: its result type without layout, e.g. 'f32[4,32,32,64]'}."""
  shapes = {}
  for line in hlo_text.splitlines():
    inst = _INSTRUCTION.match(line)
    if inst:
      opcode = _OPCODE.search(' ' + inst.group(2))
      if opcode:
        shapes[inst.group(1)] = re.sub(r'\{[^}]*\}', '', inst.group(2)[:opcode.start()]).strip()
  return shapes


def op_kinds(hlo_text: str) -> dict[str, Optional[str]]:
  """{HLO instruction name: kind (one of KINDS), or None for control flow whose body ops are
  traced themselves} for every instruction of an optimised HLO module's text."""
  computations = _parse(hlo_text)

  def contents(comp: str, seen: set) -> tuple[set, set]:
    opcodes, targets = set(), set()
    if comp in seen:
      return opcodes, targets
    seen.add(comp)
    for _, opcode, called, target in computations.get(comp, ()):
      opcodes.add(opcode)
      if target:
        targets.add(target.lower())
      if opcode == 'fusion':
        for c in called:
          sub_ops, sub_targets = contents(c, seen)
          opcodes |= sub_ops
          targets |= sub_targets
    return opcodes, targets

  kinds = {}
  for comp, instructions in computations.items():
    for name, opcode, called, target in instructions:
      if opcode in _CONTAINERS:
        kinds[name] = None
        continue
      opcodes, targets = {opcode}, {target.lower()} if target else set()
      if opcode == 'fusion':
        for c in called:
          sub_ops, sub_targets = contents(c, set())
          opcodes |= sub_ops
          targets |= sub_targets
      kinds[name] = _kind(opcodes, targets)
  return kinds


def _kind(opcodes: set, targets: set) -> str:
  if 'convolution' in opcodes or any('conv' in t for t in targets):
    return 'convolution'
  if any('fmha' in t or 'attention' in t for t in targets):
    return 'attention'
  if 'dot' in opcodes or any('gemm' in t or 'matmul' in t for t in targets):
    return 'matmul'
  if opcodes & _COLLECTIVES:
    return 'collective'
  if opcodes & {'reduce', 'reduce-window', 'select-and-scatter', 'sort', 'scatter'}:
    return 'reduction'
  if opcodes - {'fusion'} <= _MOVEMENT:
    return 'layout'
  return 'elementwise'


def xspace_file(trace_dir: str) -> str:
  """The newest `*.xplane.pb` that `jax.profiler.trace(trace_dir)` wrote."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f'no *.xplane.pb under {trace_dir}: was the trace written?')
  return files[-1]


def op_times(trace_dir: str) -> tuple[dict[str, float], str]:
  """{HLO op name: total ns} from the trace's device op lines (GPU/TPU) or, where there are none,
  the host threads' XLA op events (CPU); and which of the two ('device' or 'host')."""
  data = jax.profiler.ProfileData.from_file(xspace_file(trace_dir))
  device, host = collections.Counter(), collections.Counter()
  for plane in data.planes:
    on_device = plane.name.startswith('/device:')
    for line in plane.lines:
      if on_device and line.name != 'XLA Ops':
        continue
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get('hlo_op', event.name if on_device else None)
        if op is None or str(op).startswith('end: '):
          continue
        (device if on_device else host)[str(op)] += float(event.duration_ns)
  return (dict(device), 'device') if device else (dict(host), 'host')


def summarise(trace_dir: str, hlo_text: str, steps: int, top: int = 12) -> dict:
  """Time per step by kind of op and the `top` ops, from a trace of `steps` runs of the module
  whose optimised HLO is `hlo_text` (`compiled.as_text()`).

  Returns {'clock': 'device' | 'host', 'op_ms_per_step', 'by_kind': {kind: {'ms', 'share'}},
  'top_ops': [{'op', 'kind', 'shape', 'ms', 'share'}]}; ms are per step.
  """
  kinds, shapes = op_kinds(hlo_text), op_shapes(hlo_text)
  times, clock = op_times(trace_dir)
  by_kind, per_op = collections.Counter(), []
  for op, ns in times.items():
    kind = kinds.get(op, 'other')
    if kind is None:   # control flow: its body's ops are counted themselves
      continue
    by_kind[kind] += ns
    per_op.append((ns, op, kind))
  total = sum(by_kind.values()) or 1.0
  ms = lambda ns: round(ns / steps / 1e6, 3)
  return {
      'clock': clock,
      'op_ms_per_step': ms(total),
      'by_kind': {k: {'ms': ms(by_kind[k]), 'share': round(by_kind[k] / total, 3)}
                  for k in KINDS if by_kind[k]},
      'top_ops': [{'op': op, 'kind': kind, 'shape': shapes.get(op, ''), 'ms': ms(ns),
                   'share': round(ns / total, 3)}
                  for ns, op, kind in sorted(per_op, reverse=True)[:top]],
  }
