r"""negclip-compile: compile a run's programs for a TPU slice ahead of time, without a TPU.

negclip-compile --config NAME_OR_FILE [--config.KEY=VALUE ...] --topology v5e:4x8
    [--num_slices N] [--json] [--packed_rows R] [--nofixes] [--programs train,cache,embedders]
    [--nocost_model]
negclip-compile --config NAME_OR_FILE [--config.KEY=VALUE ...] --gpu h100 [--gpus 8] ...
(= python -m negclip_jax.compile; needs the `tpu` extra: pip install "negclip-jax[tpu]",
or for --gpu JAX's CUDA plugin, the `cuda12` extra: pip install "negclip-jax[cuda12]")

The TPU compiler (libtpu) runs on any machine: JAX describes the slice (`--topology`
v5e:2x4, v4:2x2x2, v5p:2x2x1, v6e:4x4, ... or an accelerator type v5litepod-8, v4-32,
v5p-8, v6e-8) and compiles for its chips. Nothing is allocated: every argument is a
`jax.ShapeDtypeStruct` with its sharding. Programs, built by the functions the run uses:

  train step      `trainer.make_step` for the config's placement (pmap: the per-device
                  step under `shard_map`, what `jax.pmap` runs; fsdp: `Fsdp.compile`'s jit),
                  the batch `negclip-train` feeds it: cached image features or pixels
                  (`config.data.image_cache`), texts at the full context (the largest
                  bucket), or packed text rows with `config.data.pack_text`
                  (`--packed_rows` per chip; default 4 b, one caption per row, the most a
                  batch can need)
  image cache     the frozen-tower pass of `image_cache` (`config.data.image_cache`)
  text embedder,  the evaluators' `eval.embed.Embedder` calls (default batch and dtype of
  image embedder  `evaluators.Evaluator`; replicated params, or sharded as fsdp trains)

`--gpu h100` compiles for `--gpus` H100 SXM GPUs (hosts of 8) instead, with JAX's CUDA
plugin and XLA's target description of the GPU (`assets/gpu_h100_sxm.txtpb`), no GPU
needed; memory per GPU is the description's `device_memory_size`.

`--programs` compiles a subset (train, cache, embedders; default all).

Per program: per-chip bytes from the compiler's `memory_analysis()` (arguments, outputs,
temporaries; peak = arguments + outputs - donated aliases + temporaries) against the chip's
HBM, FITS / DOES NOT FIT, FLOPs per chip from `cost_analysis()`, and the cost model's time
("optimal_seconds") with the examples/s and MFU it implies, or "no estimate" when the cost
model gives none (missing or not positive; always for GPUs). A program the TPU compiler
refuses (RESOURCE_EXHAUSTED: "the total memory required for HLO temporaries (16.00G)
exceeds available HBM (15.75G)") is DOES NOT FIT with the bytes it named: the temporaries,
so the peak is "at least" that (`parse_refusal`). The last line is `fits: true|false` and
the exit status 0 / 1. A train step that does not fit (or is refused) is compiled again
with each change that could make it fit (fsdp, bfloat16, remat, a bigger slice, half the
per-chip batch), and the peak each gives, or its refusal's figure, is printed. Compiles
are slow (minutes for ViT-B/32 on 2 cores), one program at a time.

Two compiles per TPU program: bytes and FITS from the compiler's default form (the program
`negclip-train` runs), the time from a second compile with sliced prefetching off
(`NO_SLICED_PREFETCH`; `--nocost_model` skips it). In the default form the cost model
prices none of the ConcatBitcast custom calls that sliced prefetching inserts and takes
1 s off `optimal_seconds` for each (the `tiny` step: -2.9996 with 3 of them; ViT-B/32 on
v5e:2x4: -301.96 with 302), so it gives no estimate. The two forms differ in memory, which
is why the bytes are not taken from the second: sliced prefetch holds more temporaries
(the `tiny` steps on v5e:2x2: 0.68 MB more, pmap 8.39 against 7.71 MB, fsdp 12.16 against
11.48; the ViT-B/32 pmap step on v5e:2x4: 1.346 against 1.290 GiB, so a peak of 2.241
against 2.185 GiB per chip, 2.5% less without sliced prefetch).
The time is the cost model's for the form without sliced prefetch (ViT-B/32: 43.5 ms),
probably a little above that of the program `negclip-train` runs: the default form's
`optimal_seconds` + 302 would be 36.2 ms if each ConcatBitcast counts exactly -1 s
(`tiny`: 0.430 against 0.460 ms); docs/performance.md has the figures.

JAX's persistent compilation cache is off here: with JAX 0.10.2 and libtpu 0.0.42.1 an
executable compiled for compile-only devices is written but cannot be read
back ("PjRtCompiler must be constructed with a Client").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from negclip_jax.eval import embed, evaluators
from negclip_jax.model import clip as model_lib
from negclip_jax.train import batch as batch_lib
from negclip_jax.train import image_cache, losses, packing, param_groups, sharding, trainer
from negclip_jax.train import step as train_step

GIB = 2**30
# Per chip, from the Google Cloud TPU documentation's system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): HBM capacity and peak bf16 compute.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
PEAK_BF16_TFLOPS = {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918}
# `--gpu` targets: XLA's target description (bundled in assets/) and the dense bf16 peak
# from NVIDIA's H100 SXM datasheet (989 TFLOP/s without sparsity).
GPU_SPECS = {"h100": "gpu_h100_sxm.txtpb"}
PEAK_BF16_TFLOPS_GPU = {"h100": 989}
GPUS_PER_HOST = 8
# Slice shapes per generation, smallest first (the "bigger slice" a fix tries is the next).
SHAPES_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
SHAPES_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8")
_ACCELERATOR_RE = re.compile(r"^(v4|v5p|v5litepod|v5e|v6e)-(\d+)$")
_TOPOLOGY_RE = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)$")
# The TPU compiler option that turns sliced prefetching off (libtpu 0.0.42.1): with it on,
# every sliced prefetch adds a ConcatBitcast custom call that the cost model cannot price,
# and `optimal_seconds` comes back as its estimate - 1 s per such call (negative).
NO_SLICED_PREFETCH = {"xla_tpu_sliced_prefetch_max_slices": 0}


class CompileError(ValueError):
  """A topology or config negclip-compile cannot take (one line)."""


# ------------------------------------------------------------------------- refusals

# The TPU compiler refuses a program that does not fit with RESOURCE_EXHAUSTED, naming the
# bytes it needed in binary units ("16.00G" = 16 GiB, rounded; "15.75G" available on a
# 16 GiB v5e chip). The form seen with libtpu 0.0.42.1 names the temporaries alone, so the
# peak is at least that:
#   "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO
#    temporaries (16.00G) exceeds available HBM (15.75G)."
_BYTES = r"([\d.]+)([KMGTPE]?)"
_TEMPORARIES = re.compile(rf"HLO temporaries \({_BYTES}\) exceeds available HBM \({_BYTES}\)")


def _bytes(number: str, unit: str) -> int:
  return round(float(number) * 1024 ** " KMGTPE".index(unit or " "))


def parse_refusal(message: str) -> dict | None:
  """The compiler's RESOURCE_EXHAUSTED refusal (an exception's text) -> {"refusal": its
  line, "required_bytes", "required_at_least" (True: the figure is the temporaries alone),
  "available_bytes"}, the figures None in a form not seen here; None for any other error."""
  lines = [x for x in message.splitlines() if "RESOURCE_EXHAUSTED" in x]
  if not lines:
    return None
  line = lines[0][lines[0].index("RESOURCE_EXHAUSTED") :].strip()
  m = _TEMPORARIES.search(message)
  return {
    "refusal": line,
    "required_bytes": _bytes(*m.group(1, 2)) if m else None,
    "required_at_least": bool(m),
    "available_bytes": _bytes(*m.group(3, 4)) if m else None,
  }


# ---------------------------------------------------------------------------- slice


def topology_name(value: str) -> str:
  """ "v5e:2x4" as given, or an accelerator type ("v5litepod-8", "v4-32": TensorCores,
  2 per v4/v5p chip) -> its topology name."""
  if _TOPOLOGY_RE.match(value):
    return value
  m = _ACCELERATOR_RE.match(value)
  if not m:
    raise CompileError(
      f"--topology {value!r}: give GENERATION:SHAPE (v5e:2x4, v4:2x2x2, v5p:2x2x1, v6e:4x4) "
      "or an accelerator type (v5litepod-8, v4-32, v5p-8, v6e-8)"
    )
  gen, count = m.group(1), int(m.group(2))
  gen = "v5e" if gen == "v5litepod" else gen
  chips = count // 2 if gen in ("v4", "v5p") else count
  shapes = SHAPES_3D if gen in ("v4", "v5p") else SHAPES_2D
  for shape in shapes:
    if math.prod(int(d) for d in shape.split("x")) == chips:
      return f"{gen}:{shape}"
  raise CompileError(f"--topology {value!r}: no known {gen} slice of {chips} chips")


def bigger_topology(name: str) -> str | None:
  """The next slice shape of the same generation (twice the chips), or None."""
  gen, shape = name.split(":")
  shapes = SHAPES_3D if len(shape.split("x")) == 3 else SHAPES_2D
  return f"{gen}:{shapes[shapes.index(shape) + 1]}" if shape in shapes[:-1] else None


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice's compile-only devices (one per chip) and its chip's figures."""

  name: str  # topology name, with "/N slices" when num_slices > 1
  generation: str
  devices: tuple

  @property
  def hbm_bytes(self) -> int:
    if self.generation in GPU_SPECS:
      return gpu_memory_bytes(self.generation)
    return HBM_GIB[self.generation] * GIB

  @property
  def peak_flops(self) -> float:
    if self.generation in GPU_SPECS:
      return PEAK_BF16_TFLOPS_GPU[self.generation] * 1e12
    return PEAK_BF16_TFLOPS[self.generation] * 1e12

  @property
  def compiler_options(self) -> dict:
    """XLA options of every compile. GPUs: no Triton GEMMs, which without a GPU to autotune
    on fail for some shapes ("Couldn't find output tile sizes"); cuBLAS runs those GEMMs."""
    return {"xla_gpu_enable_triton_gemm": False} if self.generation in GPU_SPECS else {}

  @property
  def cost_model_options(self) -> dict | None:
    """XLA options of the compile that asks the cost model for a time (TPU:
    `NO_SLICED_PREFETCH`); None for GPUs, whose compiler has no cost model."""
    return None if self.generation in GPU_SPECS else NO_SLICED_PREFETCH

  @property
  def source(self) -> str:
    """Where the memory and peak figures come from."""
    if self.generation in GPU_SPECS:
      return "memory: XLA's target description; bf16 peak: NVIDIA's datasheet"
    return "Google Cloud TPU docs"

  @property
  def local_devices(self) -> int:
    """Chips per host (a process's `jax.local_device_count()` on that slice)."""
    return sum(d.process_index == self.devices[0].process_index for d in self.devices)


def describe_slice(topology: str, num_slices: int = 1) -> Slice:
  """`jax.experimental.topologies` devices for `topology` (any `topology_name` spelling);
  v4 as megacore (one device per chip, as TPU VMs run it)."""
  from jax.experimental import topologies

  name = topology_name(topology)
  # libtpu otherwise asks the GCE metadata server for the host's TPU, and warns when there
  # is none; a compile-only topology needs neither.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no TPU to own
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  gen = name.split(":")[0]
  options = {"chip_config_name": "megacore"} if gen == "v4" else {}
  if num_slices > 1:
    options["num_slices"] = num_slices
  try:
    devices = topologies.get_topology_desc(name, platform="tpu", **options).devices
  except (RuntimeError, ValueError) as e:  # no libtpu, or a shape it does not know
    raise CompileError(
      f'--topology {name}: {str(e).splitlines()[0]} (needs libtpu: pip install "negclip-jax[tpu]")'
    ) from e
  label = name if num_slices == 1 else f"{name} x {num_slices} slices"
  return Slice(label, gen, tuple(devices))


def gpu_spec(name: str) -> str:
  """The bundled XLA target description (GpuTargetConfigProto text) of GPU `name`."""
  import importlib.resources

  if name not in GPU_SPECS:
    raise CompileError(f"--gpu {name!r}: known GPUs are {', '.join(GPU_SPECS)}")
  return (importlib.resources.files("negclip_jax") / "assets" / GPU_SPECS[name]).read_text()


def gpu_memory_bytes(name: str) -> int:
  """Device memory per GPU of the target description (`device_memory_size`)."""
  return int(re.search(r"device_memory_size: (\d+)", gpu_spec(name)).group(1))


def describe_gpus(name: str, count: int = GPUS_PER_HOST) -> Slice:
  """`count` compile-only GPUs `name` (hosts of 8) from JAX's CUDA plugin; no GPU needed."""
  from jax.experimental import topologies

  spec = gpu_spec(name)
  if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
    raise CompileError(f"--gpus {count}: give 1 to 8 or a multiple of 8 (hosts of 8 GPUs)")
  per_host = min(count, GPUS_PER_HOST)
  try:
    devices = topologies.get_topology_desc(
      platform="cuda", target_config=spec, topology=f"1x{count // per_host}x{per_host}"
    ).devices
  except (NotImplementedError, RuntimeError, ValueError) as e:  # no CUDA plugin
    raise CompileError(
      f"--gpu {name}: {str(e).splitlines()[0]} (needs JAX's CUDA plugin, no GPU: "
      'pip install "negclip-jax[cuda12]")'
    ) from e
  return Slice(f"{count} x {name}", name, tuple(devices))


# ------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
  name: str
  lower: Callable[[], jax.stages.Lowered]
  examples: int  # examples (global) per call, for examples/s
  text: str = ""  # the train step's text batch: "packed, R rows per chip" or "unpacked, L tokens"


def _abstract(shape, dtype, mesh, spec=P()):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


def abstract_model(config):
  """(model, abstract float32 params) of `config.model` at `config.dtype`; nothing allocated."""
  if config.init:
    raise CompileError(
      f"config.init={config.init!r}: negclip-compile builds the model from config.model; "
      "pass --config.init= --config.model=PRESET (the preset of that checkpoint)"
    )
  model = model_lib.CLIP(model_lib.get_config(config.model), **trainer.model_options(config))
  return model, jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))


def train_batch(config, model_config, per_chip: int, n: int, packed_rows: int | None) -> dict:
  """The global batch `negclip-train` feeds the step for n chips: {key: (shape, dtype)}."""
  b, length = per_chip * n, model_config.text.max_position_embeddings
  if packed_rows is not None:
    out = {k: ((n * packed_rows, length), batch_lib.TEXT_DTYPE) for k in packing.PACKED_KEYS[:3]}
    pool = (n, 4 * per_chip) if config.parallelism == "fsdp" else (n * 4 * per_chip,)
    out[packing.PACKED_POOL] = (pool, batch_lib.TEXT_DTYPE)  # as `Fsdp.batch` / pmap give it
  else:
    out = {k: ((b, length), batch_lib.TEXT_DTYPE) for k in batch_lib.TEXT_KEYS}
  prefixes = ["presence", "absence"] + (
    ["presence_distractor"] * (config.objective in losses.DISTRACTOR_OBJECTIVES)
  )
  for prefix in prefixes:
    if config.data.image_cache:
      out[batch_lib.image_emb_key(prefix)] = ((b, model_config.projection_dim), np.float32)
    else:
      size = model_config.vision.image_size
      out[batch_lib.pixels_key(prefix)] = ((b, size, size, 3), batch_lib.IMAGE_DTYPE)
  return out


def train_step_program(config, devices, packed_rows: int = 0) -> Program:
  """The training step exactly as `trainer.setup` builds it, lowered for `devices` (a
  slice's, or fake CPU devices as `benchmarks/memory.py` uses)."""
  trainer.validate_config(config)
  n = len(devices)
  if config.batch_size % n:
    raise CompileError(f"config.batch_size={config.batch_size} must divide by the {n} chips")
  per_chip = config.batch_size // n
  model, params = abstract_model(config)
  labels = param_groups.label_params(params, config.layers, extra_trainable=config.extra_trainable)
  schedule = trainer.schedule_from_config(config, max(config.total_steps, 1))
  tx = trainer.optimizer_from_config(config, labels, schedule)
  state = jax.eval_shape(lambda p: train_step.create_train_state(p, tx), params)
  if config.parallelism == "fsdp":
    placement = sharding.Fsdp(sharding.make_mesh(config.fsdp, devices))
    mesh, batch_spec = placement.mesh, P(sharding.BATCH_AXES)
    step = placement.compile(trainer.make_step(config, model, labels, tx, placement), state)
    state = placement.restore_target(state)
  else:  # the pmapped per-device step, as pmap runs it: under shard_map on the slice
    placement = sharding.Pmap()
    mesh, batch_spec = Mesh(np.asarray(devices), (train_step.AXIS,)), P(train_step.AXIS)
    step = train_step.shard_map_train_step(
      trainer.make_step(config, model, labels, tx, placement), mesh
    )
    state = jax.tree.map(lambda x: _abstract(x.shape, x.dtype, mesh), state)
  rows = None
  if config.data.pack_text:
    rows = packed_rows or packing.ladder_rows(4 * per_chip)
  batch = {
    k: _abstract(shape, dtype, mesh, batch_spec)
    for k, (shape, dtype) in train_batch(config, model.config, per_chip, n, rows).items()
  }
  length = model.config.text.max_position_embeddings
  text = f"packed, {rows} rows per chip" if rows else f"unpacked, {length} tokens"
  return Program("train step", lambda: step.lower(state, batch), config.batch_size, text)


def embed_program(
  name: str, model, params, kind: str, per_chip: int, tpu: Slice, fsdp: int | None, normalize
) -> Program:
  """One `Embedder` call on every chip: `embed.features` on per_chip items each, params
  replicated (pmap; lowered under shard_map, as pmap runs it) or sharded on an fsdp mesh."""
  n, c = len(tpu.devices), model.config
  shape = (
    (n * per_chip, c.text.max_position_embeddings)
    if kind == "text"
    else (n * per_chip, c.vision.image_size, c.vision.image_size, 3)
  )
  dtype = batch_lib.TEXT_DTYPE if kind == "text" else batch_lib.IMAGE_DTYPE
  fn = embed.features(model, kind, normalize)
  if fsdp is None:
    mesh = Mesh(np.asarray(tpu.devices), (train_step.AXIS,))
    jitted = jax.jit(
      jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(train_step.AXIS)), out_specs=P(train_step.AXIS))
    )
    p = jax.tree.map(lambda x: _abstract(x.shape, x.dtype, mesh), params)
    x = _abstract(shape, dtype, mesh, P(train_step.AXIS))
  else:
    mesh = sharding.make_mesh(fsdp, tpu.devices)
    jitted = jax.jit(fn, out_shardings=sharding.batch_sharding(mesh))
    p = sharding.with_shardings(params, sharding.state_shardings(params, mesh))
    x = _abstract(shape, dtype, mesh, P(sharding.BATCH_AXES))
  return Program(name, lambda: jitted.lower(p, x), n * per_chip)


PROGRAMS = ("train", "cache", "embedders")


def programs(config, tpu: Slice, packed_rows: int = 0, which=PROGRAMS) -> list[Program]:
  """Those of `which` (names in PROGRAMS): the train step, the image-cache pass (with
  `config.data.image_cache`) and the evaluators' text and image embedders, for `tpu`."""
  unknown = sorted(set(which) - set(PROGRAMS))
  if unknown or not which:
    raise CompileError(f"--programs {','.join(which)}: give some of {','.join(PROGRAMS)}")
  out = [train_step_program(config, tpu.devices, packed_rows)] if "train" in which else []
  if not set(which) & {"cache", "embedders"}:
    return out
  model, params = abstract_model(config)
  per_call = lambda batch: math.ceil(batch / tpu.local_devices)  # per chip, as Embedder
  fsdp = config.fsdp if config.parallelism == "fsdp" else None
  if config.data.image_cache and "cache" in which:  # always replicated on the local devices (pmap)
    out.append(
      embed_program(
        "image cache", model, params, "image", per_call(image_cache.BATCH_SIZE), tpu, None, False
      )
    )
  if "embedders" not in which:
    return out
  evaluator = evaluators.Evaluator("compile", "compile")  # the defaults config.evals takes
  eval_model = model.clone(dtype=embed.DTYPES[evaluator.dtype])
  for kind in ("text", "image"):
    out.append(
      embed_program(
        f"{kind} embedder",
        eval_model,
        params,
        kind,
        per_call(evaluator.batch_size),
        tpu,
        fsdp,
        True,
      )
    )
  return out


# -------------------------------------------------------------------------- figures


def peak_bytes(m) -> int:
  """Peak bytes per device of a `memory_analysis()`: arguments + outputs - donated aliases
  + temporaries."""
  return (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )


def cost_analysis(compiled) -> dict:
  """`compiled.cost_analysis()` as one dict ({} when the compiler gives none)."""
  cost = compiled.cost_analysis() or {}
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def timing(optimal_seconds, examples: int, flops: float | None, tpu: Slice | None) -> dict:
  """The cost model's step time and the examples/s and MFU it implies; None for each when
  it gives no estimate (`optimal_seconds` missing or not positive; `tpu` is then unused)."""
  ok = optimal_seconds is not None and optimal_seconds > 0
  seconds = float(optimal_seconds) if ok else None
  return {
    "cost_model_seconds": seconds,  # None: no estimate
    "optimal_seconds": None if optimal_seconds is None else float(optimal_seconds),  # as said
    "examples_per_s": examples / seconds if seconds else None,
    "mfu": flops / seconds / tpu.peak_flops if seconds and flops else None,
  }


def figures(compiled, examples: int, tpu: Slice, compile_s: float) -> dict:
  """Per-chip bytes, FITS, FLOPs and the cost model's time of one compiled program."""
  m = compiled.memory_analysis()
  peak = peak_bytes(m)
  cost = cost_analysis(compiled)
  flops = float(cost["flops"]) if "flops" in cost else None  # None: no cost analysis (GPU)
  return {
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
    "peak_bytes": int(peak),
    "hbm_bytes": tpu.hbm_bytes,
    "fits": bool(peak <= tpu.hbm_bytes),
    "flops_per_chip": flops,
    **timing(cost.get("optimal_seconds"), examples, flops, tpu),
    "cost_model_options": tpu.compiler_options,  # the compile the time is from
    "compile_s": round(compile_s, 1),
  }


MEMORY_KEYS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes")


def refused(refusal: dict, hbm_bytes: int, compile_s: float | None) -> dict:
  """The figures of a program the compiler refused for want of memory (`parse_refusal`) on
  a chip of `hbm_bytes`: DOES NOT FIT, the bytes it named, no other figure."""
  return {
    **dict.fromkeys(MEMORY_KEYS),
    "hbm_bytes": hbm_bytes,
    "fits": False,
    "flops_per_chip": None,
    **timing(None, 0, None, None),
    "cost_model_options": None,
    "compile_s": None if compile_s is None else round(compile_s, 1),
    **refusal,
  }


def compile_program(program: Program, options=None) -> tuple[jax.stages.Compiled, float]:
  """(the compiled program, seconds lowering and compiling took); `options`: XLA's."""
  t0 = time.perf_counter()
  compiled = program.lower().compile(options)
  return compiled, time.perf_counter() - t0


def measure(program: Program, tpu: Slice, progress=None, cost_model=True) -> dict:
  """Compiles `program` for `tpu` -> `figures` (with "program"), or `refused` when the
  compiler refuses it for want of memory. Bytes and FITS are the compile `negclip-train`
  runs (the compiler's defaults); with `cost_model`, where that compile's cost model gives
  no time (TPU: sliced prefetch, see the module doc), the time, examples/s and MFU are from
  a second compile with `tpu.cost_model_options` (its "cost_model_options", "cost_model_s")."""
  say = progress or (lambda _: None)
  say(f"compiling {program.name} for {tpu.name} ...")
  named = {"program": program.name, **({"text": program.text} if program.text else {})}
  t0 = time.perf_counter()
  try:
    compiled, seconds = compile_program(program, tpu.compiler_options)
  except jax.errors.JaxRuntimeError as e:
    refusal = parse_refusal(str(e))
    if refusal is None:
      raise
    return {**named, **refused(refusal, tpu.hbm_bytes, time.perf_counter() - t0)}
  row = {**named, **figures(compiled, program.examples, tpu, seconds)}
  del compiled
  options = tpu.cost_model_options
  if cost_model and row["cost_model_seconds"] is None and options is not None:
    say(f"compiling {program.name} for {tpu.name} with {options} for the cost model's time ...")
    try:
      compiled, seconds = compile_program(program, {**tpu.compiler_options, **options})
    except jax.errors.JaxRuntimeError as e:  # refused in that form: no estimate
      if parse_refusal(str(e)) is None:
        raise
      return row
    row.update(
      timing(
        cost_analysis(compiled).get("optimal_seconds"), program.examples, row["flops_per_chip"], tpu
      )
    )
    row.update(cost_model_options=options, cost_model_s=round(seconds, 1))
  return row


def fix_candidates(config, tpu: Slice) -> list[tuple[str, dict, str | None]]:
  """Each change that could make the train step fit: (the flag to give, config overrides,
  a bigger topology or None)."""
  candidates = []
  if config.parallelism == "pmap" and config.global_negatives:
    candidates.append(("--config.parallelism=fsdp", {"parallelism": "fsdp"}, None))
  if config.dtype == "float32":
    candidates.append(("--config.dtype=bfloat16", {"dtype": "bfloat16"}, None))
  if not config.get("remat", False):
    candidates.append(("--config.remat=true", {"remat": True}, None))
  gpu = tpu.generation in GPU_SPECS  # no bigger-slice fix for GPUs
  bigger = None if gpu else bigger_topology(topology_name(tpu.name.split(" ")[0]))
  if bigger:
    candidates.append((f"--topology {bigger}", {}, bigger))
  half = config.batch_size // 2
  if half and half % len(tpu.devices) == 0:
    candidates.append(
      (f"--config.batch_size={half} (half the per-chip batch)", {"batch_size": half}, None)
    )
  return candidates


def fixes(
  config, tpu: Slice, num_slices: int, packed_rows: int = 0, progress=None, candidates=None
) -> list:
  """Each of `candidates` (default `fix_candidates`) compiled: [{change, peak_bytes, fits}],
  or {change, fits: False, refusal, required_bytes, ...} where the compiler refuses it."""
  out = []
  for change, overrides, topology in candidates or fix_candidates(config, tpu):
    c = ml_collections.ConfigDict(config.to_dict())
    c.update(overrides)
    target = describe_slice(topology, num_slices) if topology else tpu
    try:
      r = measure(train_step_program(c, target.devices, packed_rows), target, progress, False)
    except CompileError as e:
      out.append({"change": change, "error": str(e)})
      continue
    keys = ("peak_bytes", "fits", "required_bytes", "required_at_least", "refusal")
    out.append({"change": change, **{k: r[k] for k in keys if k in r}})
  return out


# --------------------------------------------------------------------------- output


def _gib(x: int) -> str:
  return f"{x / GIB:.2f}"


def _tflop(flops: float | None) -> str:
  return "no figure" if flops is None else f"{flops / 1e12:.3g}"


def memory_columns(r: dict) -> tuple[str, str, str]:
  """(arguments, temporaries, peak) in GiB of a `measure` row; for a program the compiler
  refused, the bytes it named: the temporaries and "at least" that peak, or the peak."""
  if "refusal" not in r:
    return _gib(r["argument_bytes"]), _gib(r["temp_bytes"]), _gib(r["peak_bytes"])
  if r["required_bytes"] is None:
    return "no figure", "no figure", "no figure"
  required = _gib(r["required_bytes"])
  return "no figure", required, f"at least {required}"


def fit_text(r: dict) -> str:
  """FITS, DOES NOT FIT, or DOES NOT FIT with the refusal's figure (a row or a fix)."""
  if "refusal" in r and r["required_bytes"] is None:
    return "DOES NOT FIT (refused by the compiler)"
  if "refusal" in r:
    what = "at least " * r["required_at_least"] + f"{_gib(r['required_bytes'])} GiB"
    return f"DOES NOT FIT (refused by the compiler: needs {what})"
  return "FITS" if r["fits"] else "DOES NOT FIT"


def table(rows: list[dict]) -> str:
  """Markdown table of `measure` results (GiB per chip)."""
  lines = [
    "| program | arguments GiB | temporaries GiB | peak GiB | HBM GiB | fits | TFLOP per chip | "
    "cost-model s | examples/s | MFU | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    timing = (
      f"{r['cost_model_seconds']:.4g} | {r['examples_per_s']:,.0f} | "
      + ("no figure" if r["mfu"] is None else f"{r['mfu']:.0%}")
      if r["cost_model_seconds"]
      else "no estimate | no estimate | no estimate"
    )
    compile_s = r["compile_s"] + r.get("cost_model_s", 0)
    lines.append(
      f"| {r['program']} | {' | '.join(memory_columns(r))} | {r['hbm_bytes'] // GIB} | "
      f"{fit_text(r)} | {_tflop(r['flops_per_chip'])} | {timing} | {compile_s:.0f} |"
    )
  return "\n".join(lines)


def run(
  config,
  topology: str,
  num_slices: int = 1,
  packed_rows: int = 0,
  try_fixes=True,
  progress=None,
  which=PROGRAMS,
  gpu: str | None = None,
  gpus: int = GPUS_PER_HOST,
  cost_model: bool = True,
) -> dict:
  """Compiles the programs `which` of `config` for the slice (or `gpus` GPUs `gpu`) ->
  {"slice", "programs", "fits", "fixes"}."""
  tpu = describe_gpus(gpu, gpus) if gpu else describe_slice(topology, num_slices)
  progs = programs(config, tpu, packed_rows, which)
  rows = [measure(p, tpu, progress, cost_model) for p in progs]
  fits = all(r["fits"] for r in rows)
  result = {
    "slice": tpu.name,
    "chips": len(tpu.devices),
    "chip": tpu.devices[0].device_kind,
    "hbm_gib_per_chip": round(tpu.hbm_bytes / GIB, 2),
    "peak_bf16_tflops_per_chip": tpu.peak_flops / 1e12,
    "figures_from": tpu.source,
    "programs": rows,
    "fits": fits,
  }
  if rows[0]["program"] == "train step" and not rows[0]["fits"] and try_fixes:
    result["fixes"] = fixes(config, tpu, num_slices, packed_rows, progress)
  return result


# ------------------------------------------------------------------------------ CLI

_TOPOLOGY = flags.DEFINE_string(
  "topology", None, "TPU slice: v5e:2x4, v4:2x2x2, v5p:2x2x1, v6e:4x4, or v5litepod-8, v4-32"
)
_GPU = flags.DEFINE_enum("gpu", None, list(GPU_SPECS), "A GPU instead of --topology.")
_GPUS = flags.DEFINE_integer("gpus", GPUS_PER_HOST, "GPUs with --gpu (hosts of 8).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices (multislice over DCN).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the tables.")
_PACKED_ROWS = flags.DEFINE_integer(
  "packed_rows", 0, "Packed text rows per chip (with pack_text); 0: 4 x per-chip batch."
)
_FIXES = flags.DEFINE_bool("fixes", True, "If the step does not fit, compile each fix.")
_PROGRAMS = flags.DEFINE_list("programs", list(PROGRAMS), f"Programs to compile: {PROGRAMS}.")
_COST_MODEL = flags.DEFINE_bool(
  "cost_model",
  True,
  "TPU: where the cost model gives no time, compile the program again with sliced prefetch "
  "off for it (twice the compile time); --nocost_model: bytes only.",
)


def report(config, result: dict) -> str:
  """The plain output of `run`'s result: a header, the table, refusals, fixes, `fits:`."""
  c = config
  lines = [
    f"{c.model} ({c.parallelism}, {c.dtype}, batch {c.batch_size}, layers {c.layers}) on "
    f"{result['slice']}: {result['chips']} x {result['chip']}, "
    f"{result['hbm_gib_per_chip']:g} GiB HBM and {result['peak_bf16_tflops_per_chip']:g} bf16 "
    f"TFLOP/s per chip ({result['figures_from']}); per chip:",
    table(result["programs"]),
  ]
  for r in result["programs"]:
    if "refusal" in r:
      lines.append(f"{r['program']}: the compiler refused it: {r['refusal']}")
    if r.get("cost_model_s") is not None:
      options = ", ".join(f"{k}={v}" for k, v in r["cost_model_options"].items())
      lines.append(f"{r['program']}: cost-model time from a second compile with {options}")
  for fix in result.get("fixes", []):
    if "error" in fix:
      figure = fix["error"]
    elif "refusal" in fix:
      figure = fit_text(fix)
    else:
      figure = f"peak {_gib(fix['peak_bytes'])} GiB per chip: {fit_text(fix)}"
    lines.append(f"  try {fix['change']}: {figure}")
  lines.append(f"fits: {str(result['fits']).lower()}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config  # negclip-train's --config flag (with --config.KEY=VALUE)
  say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not _JSON.value else None
  try:
    result = run(
      config,
      _TOPOLOGY.value,
      _NUM_SLICES.value,
      _PACKED_ROWS.value,
      _FIXES.value,
      say,
      tuple(_PROGRAMS.value),
      _GPU.value,
      _GPUS.value,
      _COST_MODEL.value,
    )
  except (CompileError, trainer.ConfigError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(result, indent=1) if _JSON.value else report(config, result))
  sys.exit(0 if result["fits"] else 1)


def cli():
  """Console script `negclip-compile` (= python -m negclip_jax.compile)."""
  jax.config.update("jax_platforms", "cpu")  # the slice is compile-only; run nothing on it
  jax.config.update("jax_enable_compilation_cache", False)  # see the module doc
  flags.mark_flags_as_required(["config"])
  flags.mark_flags_as_mutual_exclusive(["topology", "gpu"], required=True)
  names = ("config", "topology", "gpu", "gpus", "num_slices", "json", "packed_rows", "fixes")
  names += ("programs", "cost_model")
  app.run(main, flags_parser=lambda argv: trainer.parse_flags(argv, __doc__, names))


if __name__ == "__main__":
  cli()
