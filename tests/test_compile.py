"""negclip-compile: the tiny preset's training steps compiled by the TPU compiler (libtpu)
for real TPU slices, on this CPU machine, through the command's own code path."""

import ml_collections
import pytest

from negclip_jax import compile as compile_lib
from negclip_jax import configs


def _tiny(**overrides):
  c = configs.load("tiny")
  c.update(overrides)
  return ml_collections.ConfigDict(c.to_dict())


@pytest.mark.parametrize(
  "topology, num_slices, parallelism",
  [("v5e:2x2", 1, "pmap"), ("v5e:2x2", 1, "fsdp"), ("v5e:2x2", 2, "fsdp")],
)
def test_tiny_train_step_fits_a_tpu_slice(topology, num_slices, parallelism):
  tpu = compile_lib.describe_slice(topology, num_slices)
  assert len(tpu.devices) == 4 * num_slices
  assert tpu.devices[0].device_kind == "TPU v5 lite" and tpu.hbm_bytes == 16 * 2**30
  program = compile_lib.train_step_program(_tiny(parallelism=parallelism), tpu.devices)
  compiled, seconds = compile_lib.compile_program(program)
  got = {"program": program.name, **compile_lib.figures(compiled, program.examples, tpu, seconds)}
  m = compiled.memory_analysis()
  assert (got["argument_bytes"], got["output_bytes"], got["alias_bytes"], got["temp_bytes"]) == (
    m.argument_size_in_bytes,
    m.output_size_in_bytes,
    m.alias_size_in_bytes,
    m.temp_size_in_bytes,
  )
  assert got["peak_bytes"] == (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )
  assert got["fits"] and 0 < got["peak_bytes"] < tpu.hbm_bytes
  assert got["flops_per_chip"] == compiled.cost_analysis()["flops"] > 0
  raw = compiled.cost_analysis().get("optimal_seconds")
  if raw is None or raw <= 0:  # the cost model's "no answer": reported as no estimate
    assert got["cost_model_seconds"] is None and "no estimate" in compile_lib.table([got])
  else:
    assert got["cost_model_seconds"] == raw and got["examples_per_s"] == 8 / raw
  assert "| train step |" in compile_lib.table([got]) and "FITS" in compile_lib.table([got])


def test_topology_names():
  assert compile_lib.topology_name("v5e:2x4") == "v5e:2x4"
  assert compile_lib.topology_name("v5litepod-8") == "v5e:2x4"
  assert compile_lib.topology_name("v4-32") == "v4:2x2x4"  # 32 TensorCores = 16 chips
  assert compile_lib.topology_name("v6e-256") == "v6e:16x16"
  assert compile_lib.bigger_topology("v5e:2x4") == "v5e:4x4"
  assert compile_lib.bigger_topology("v4:2x2x1") == "v4:2x2x2"
  with pytest.raises(compile_lib.CompileError, match="--topology"):
    compile_lib.topology_name("v5e-3")


def test_programs_compiles_the_named_subset():
  tpu = compile_lib.describe_slice("v5e:2x2")
  names = lambda which, **o: [p.name for p in compile_lib.programs(_tiny(**o), tpu, 0, which)]
  assert names(("train",)) == ["train step"]
  assert names(("embedders",)) == ["text embedder", "image embedder"]
  cached = _tiny()
  cached.data.image_cache = True
  assert [p.name for p in compile_lib.programs(cached, tpu, 0, ("cache", "train"))] == [
    "train step",
    "image cache",
  ]
  with pytest.raises(compile_lib.CompileError, match="--programs train,steps"):
    compile_lib.programs(_tiny(), tpu, 0, ("train", "steps"))


def test_gpu_target_is_xla_h100_description_and_needs_the_cuda_plugin():
  assert compile_lib.gpu_memory_bytes("h100") == 84942979072  # the description's, 79.1 GiB
  with pytest.raises(compile_lib.CompileError, match="known GPUs are h100"):
    compile_lib.gpu_spec("a100")
  with pytest.raises(compile_lib.CompileError, match="--gpus 12"):
    compile_lib.describe_gpus("h100", 12)
  try:  # the suite has no CUDA plugin (a one-line error naming the extra); with it, 8 H100s
    gpus = compile_lib.describe_gpus("h100", 8)
  except compile_lib.CompileError as e:
    assert "negclip-jax[cuda12]" in str(e) and "\n" not in str(e)
  else:
    assert [d.device_kind for d in gpus.devices] == ["NVIDIA H100 80GB HBM3"] * 8
    assert gpus.hbm_bytes == 84942979072 and gpus.compiler_options
