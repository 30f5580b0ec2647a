import atexit
import os
import shutil
import tempfile

# Tests run on CPU with 4 fake devices, so every pmapped path is multi-device here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

# One persistent compilation cache for the session, shared with every subprocess (they
# inherit the environment): the many tiny training runs compile the same programs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="negclip_jax_test_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

# Parity checks need full-precision matmuls on any backend.
jax.config.update("jax_default_matmul_precision", "highest")
