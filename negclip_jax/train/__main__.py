"""`python -m negclip_jax.train` = `negclip-train` (`negclip_jax.train.trainer`)."""

from negclip_jax.train.trainer import cli

cli()
