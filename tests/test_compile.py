"""negclip-compile: the tiny preset's training steps compiled by the TPU compiler (libtpu)
for real TPU slices, on this CPU machine, through the command's own code path."""

import importlib.util
import json
import subprocess
import sys

import helpers
import jax
import ml_collections
import pytest

from negclip_jax import compile as compile_lib
from negclip_jax import configs
from negclip_jax.train import packing


@pytest.fixture(autouse=True)
def _no_compilation_cache():
  """As `negclip-compile` runs (its module doc): a compile-only executable cannot be read
  back from JAX's persistent cache, so a program compiled twice would warn."""
  was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", was)


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


def test_cost_model_time_comes_from_a_compile_without_sliced_prefetch():
  """The compiler's default form (what negclip-train runs) gives the bytes; its cost model
  gives no time (sliced prefetch), so the time is the no-sliced-prefetch compile's."""
  tpu = compile_lib.describe_slice("v5e:2x2")
  program = compile_lib.train_step_program(_tiny(), tpu.devices)
  got = compile_lib.measure(program, tpu)
  default, _ = compile_lib.compile_program(program)
  no_slice, _ = compile_lib.compile_program(program, compile_lib.NO_SLICED_PREFETCH)
  assert default.cost_analysis()["optimal_seconds"] <= 0  # the default form: no estimate
  m = default.memory_analysis()
  assert (got["temp_bytes"], got["peak_bytes"]) == (m.temp_size_in_bytes, compile_lib.peak_bytes(m))
  assert no_slice.memory_analysis().temp_size_in_bytes != m.temp_size_in_bytes  # not its bytes
  seconds = no_slice.cost_analysis()["optimal_seconds"]
  assert got["cost_model_seconds"] == seconds > 0
  assert got["examples_per_s"] == program.examples / seconds == 8 / seconds
  assert got["mfu"] == got["flops_per_chip"] / seconds / 197e12
  assert got["cost_model_options"] == {"xla_tpu_sliced_prefetch_max_slices": 0}
  text = compile_lib.table([got])
  assert f"{8 / seconds:,.0f}" in text and "no estimate" not in text


RECORDED_REFUSAL = (  # benchmarks/tpu_memory_rows.jsonl: vit-bigg-14, batch 128, v5e-8, pmap
  "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
  "required for HLO temporaries (16.00G) exceeds available HBM (15.75G)."
)


def test_parse_refusal_reads_the_compilers_figures():
  got = compile_lib.parse_refusal("Traceback ...\n" + RECORDED_REFUSAL + "\n")
  assert got == {
    "refusal": RECORDED_REFUSAL.split(": ", 1)[1],
    "required_bytes": 16 * 2**30,
    "required_at_least": True,  # the temporaries alone: the peak is more
    "available_bytes": round(15.75 * 2**30),
  }
  assert compile_lib.parse_refusal("INTERNAL: something else") is None
  other = compile_lib.parse_refusal("RESOURCE_EXHAUSTED: a form not seen here")
  assert other["required_bytes"] is None and not other["required_at_least"]
  row = {"program": "train step", **compile_lib.refused(got, _v5e_2x2().hbm_bytes, 1.0)}
  assert compile_lib.memory_columns(row) == ("no figure", "16.00", "at least 16.00")
  assert (
    compile_lib.fit_text(row) == "DOES NOT FIT (refused by the compiler: needs at least 16.00 GiB)"
  )


def _v5e_2x2():
  return compile_lib.describe_slice("v5e:2x2")


def test_a_step_the_compiler_refuses_does_not_fit_and_its_fixes_are_compiled():
  """The tiny step at batch 65536 (16384 per chip): the TPU compiler refuses it (tens of GiB
  of logits); negclip-compile reports DOES NOT FIT with the compiler's figure, and a fix the
  compiler refuses too shows its own figure."""
  config = _tiny(batch_size=65536)
  result = compile_lib.run(config, "v5e:2x2", which=("train",), try_fixes=False)
  (row,) = result["programs"]
  assert not result["fits"] and not row["fits"] and row["peak_bytes"] is None
  assert row["required_at_least"] and row["required_bytes"] > row["hbm_bytes"]
  assert row["refusal"].startswith("RESOURCE_EXHAUSTED: ")
  assert row["text"] == f"packed, {packing.ladder_rows(4 * 16384)} rows per chip"
  assert f"({row['required_bytes'] / 2**30:.2f}G)" in row["refusal"]
  tpu = _v5e_2x2()
  quick = [
    c for c in compile_lib.fix_candidates(config, tpu) if {"parallelism", "batch_size"} & set(c[1])
  ]
  result["fixes"] = compile_lib.fixes(config, tpu, 1, candidates=quick)
  assert [f["change"] for f in result["fixes"]] == [
    "--config.parallelism=fsdp",
    "--config.batch_size=32768 (half the per-chip batch)",
  ]
  for fix in result["fixes"]:
    assert not fix["fits"] and fix["required_bytes"] > tpu.hbm_bytes and "refusal" in fix
  text = compile_lib.report(config, json.loads(json.dumps(result)))  # as --json writes it
  required = f"{row['required_bytes'] / 2**30:.2f}"
  assert f"| no figure | {required} | at least {required} | 16 | DOES NOT FIT" in text
  assert f"train step: the compiler refused it: {row['refusal']}" in text
  for fix in result["fixes"]:
    needs = f"needs at least {fix['required_bytes'] / 2**30:.2f} GiB"
    assert f"  try {fix['change']}: DOES NOT FIT (refused by the compiler: {needs})" in text
  assert text.splitlines()[-1] == "fits: false"


def test_cli_reports_a_refused_step_as_json_and_exits_1():
  proc = subprocess.run(
    [sys.executable, "-m", "negclip_jax.compile", "--config=tiny", "--config.batch_size=65536"]
    + ["--topology=v5e:2x2", "--programs=train", "--nofixes", "--json"],
    capture_output=True,
    text=True,
    env=helpers.subprocess_env(),
    timeout=300,
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  result = json.loads(proc.stdout)
  (row,) = result["programs"]
  assert result["fits"] is False and row["fits"] is False
  assert row["required_bytes"] > row["hbm_bytes"] and row["required_at_least"] is True


def test_memory_table_shows_a_refused_row_as_does_not_fit(tmp_path):
  """benchmarks/tpu_memory_table.py --markdown: a row the compiler refused (an error row
  recorded before negclip-compile reported refusals) is DOES NOT FIT with its figure."""
  spec = importlib.util.spec_from_file_location(
    "tpu_memory_table", helpers.ROOT / "benchmarks" / "tpu_memory_table.py"
  )
  table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(table)
  row = {"model": "vit-bigg-14", "batch": 128, "slice": "v5e-8", "parallelism": "pmap"}
  rows = tmp_path / "rows.jsonl"
  rows.write_text(json.dumps({**row, "status": "error", "error": RECORDED_REFUSAL}) + "\n")
  args = table.parse_args(["--out", str(rows), "--models", "vit-bigg-14", "--batches", "128"])
  text = table.markdown(args)
  assert (
    "| vit-bigg-14 | 128 | v5e-8 (v5e:2x4, 8) | pmap | packed* | 16 | no figure | 16.00 | at least 16.00 | "
    "**DOES NOT FIT** (16; refused by the compiler) |" in text
  )
  assert "RESOURCE_EXHAUSTED" not in text  # not listed as an error
