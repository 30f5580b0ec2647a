"""Old module path, kept for one release: the tasks and `run_task` are in
`negclip_jax.eval.registry`, the CLI in `negclip_jax.eval.cli`. `python -m
negclip_jax.evaluate` still runs `negclip-eval`."""

from negclip_jax.eval.cli import cli, main  # noqa: F401
from negclip_jax.eval.registry import TASKS, Task, markdown, missing_options, run_task  # noqa: F401
from negclip_jax.rundir import load_model  # noqa: F401

if __name__ == "__main__":
  cli()
