"""The paper's run (`omni_negclip_vitb32`) with the accelerator settings chosen on the TPU
compiler (docs/performance.md, "Speed choices on the TPU compiler"): bfloat16 compute
(parameters, AdamW state and the loss stay float32), fsdp and rematerialised blocks. The training recipe, data and
objective are the paper's; `omni_negclip_vitb32` stays float32, the reproduction default.

negclip-compile --config omni_negclip_vitb32_tpu --topology v5e:2x4    # check the slice first
launch/tpu_pod.sh --preflight --accelerator-type v5litepod-8 --config omni_negclip_vitb32_tpu ...
"""

from negclip_jax.configs import omni_negclip_vitb32


def get_config():
  c = omni_negclip_vitb32.get_config()
  c.dtype = "bfloat16"
  c.parallelism = "fsdp"
  c.remat = True
  return c
