"""Runs in a subprocess with 8 CPU devices (tests/test_fsdp.py): the fsdp step against the
pmap step on the same tiny model and batches. Prints one JSON line:
{"(8, 1)": {"loss": max relative diff over steps and metrics, "params": max |diff|, ...}}.
Images come as cached embeddings (`data.image_cache=True`, the training default)."""

import json
import sys

import jax
import numpy as np
from flax import traverse_util
from test_train_step import MODEL, make_batch, run_pmap, setup

from negclip_jax.train import sharding
from negclip_jax.train import step as train_step

STEPS = 3
MESHES = ((8, 1), (2, 4), (1, 8))


def run_fsdp(step, params, tx, batches, mesh):
  fsdp = sharding.Fsdp(mesh)
  state = fsdp.init_state(params, tx)
  fn = fsdp.compile(step, state)
  metrics = []
  for b in batches:
    state, m = fn(state, jax.device_put(b, sharding.batch_sharding(mesh)))
    metrics.append(fsdp.host(m))
  return fsdp.host(state), metrics, state


def max_diff(a, b):
  a, b = (traverse_util.flatten_dict(t, sep="/") for t in (a, b))
  # Attention key biases: analytically zero gradient, so Adam amplifies float noise
  # (tests/test_multiprocess.py's assert_params_close).
  return max(
    float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max())
    for k in a
    if not k.endswith("k_proj/bias")
  )


def main():
  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.device_count() == 8, jax.devices()
  params, labels, tx, pmap_step = setup()
  batches = [make_batch(8, seed=s, pixels=False) for s in range(STEPS)]
  pmap_state, pmap_metrics = run_pmap(pmap_step, params, tx, batches, jax.devices())
  out = {}
  for shape in MESHES:
    mesh = sharding.make_mesh(shape[1])
    assert dict(mesh.shape) == {"data": shape[0], "fsdp": shape[1]}
    step = train_step.make_train_step(MODEL, labels, tx, **sharding.Fsdp(mesh).step_options)
    state, metrics, device_state = run_fsdp(step, params, tx, batches, mesh)
    emb = device_state.params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    mu = device_state.opt_state.inner_states["trainable"].inner_state[1].mu
    out[str(shape)] = {
      "loss": max(
        abs(float(m[k]) - float(p[k])) / max(abs(float(p[k])), 1e-6)
        for m, p in zip(metrics, pmap_metrics)
        for k in p
      ),
      "params": max_diff(state.params, pmap_state.params),
      "step": int(state.step),
      "embedding_shard": list(emb.addressable_shards[0].data.shape),
      "adam_mu_shard": list(
        mu["text_model"]["embeddings"]["token_embedding"]["embedding"]
        .addressable_shards[0]
        .data.shape
      ),
    }
  print(json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
