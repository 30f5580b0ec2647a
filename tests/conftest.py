import os

# Tests run on CPU with 4 fake devices, so every pmapped path is multi-device here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402

# Parity checks need full-precision matmuls on any backend.
jax.config.update("jax_default_matmul_precision", "highest")
