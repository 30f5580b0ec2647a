import os

# Tests run on CPU; parity needs full-precision matmuls on any backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
