"""Layer-wise negation sensitivity: cosine between caption and negated-caption states.

For every text layer i (0 = embeddings output, L = last block, before the final
LayerNorm) the hidden states at the EOT position (the pooling position) of a caption
and of its negation are compared by cosine similarity, averaged over pairs.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import jax_utils
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from negclip_jax import model as model_lib
from negclip_jax.data import negshapes
from negclip_jax.data.ccneg import CCNEG_EVAL_SIZE, load_ccneg
from negclip_jax.embed import Embedder
from negclip_jax.tasks import common


class _EotHiddenStates(model_lib.CLIP):
  """CLIP whose `get_text_features` is the EOT hidden state of each layer: [N, L + 1, D]."""

  def get_text_features(self, input_ids):
    states = self.get_text_hidden_states(input_ids)
    pos = model_lib.eot_positions(input_ids, self.config.text.eos_token_id)
    rows = jnp.arange(input_ids.shape[0])
    return jnp.stack([s[rows, pos] for s in states], axis=1)


@functools.lru_cache(maxsize=None)
def _eot_model(model: model_lib.CLIP) -> _EotHiddenStates:
  return _EotHiddenStates(model.config, dtype=model.dtype, param_dtype=model.param_dtype)


def evaluate(embedder: Embedder, tokenizer, context_length: int, captions: Sequence[str],
             negated: Sequence[str]) -> dict:
  """{"cosine_layer_0", ..., "cosine_layer_L", "n"}: mean cosine over the N pairs."""
  states = Embedder(_eot_model(embedder.model), jax_utils.unreplicate(embedder.params),
                    embedder.batch_size, progress=embedder.progress)  # per-layer L2-normalized
  pos = common.embed_texts(states, tokenizer, context_length, captions, "captions")
  neg = common.embed_texts(states, tokenizer, context_length, negated, "negated captions")
  cosine = np.sum(pos * neg, -1).mean(0)  # [L + 1]
  return {**{f"cosine_layer_{i}": float(c) for i, c in enumerate(cosine)}, "n": len(captions)}


def plot(result: dict, path: str) -> None:
  """Writes a PNG of mean cosine against layer index from an `evaluate` result."""
  cosine = [result[f"cosine_layer_{i}"] for i in range(len(result) - 1)]
  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  ax.plot(range(len(cosine)), cosine, marker="o")
  ax.set(xlabel="text layer (0 = embeddings)", ylabel="cos(caption, negated) at EOT",
         title=f"Negation sensitivity by layer (n={result['n']})")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def run(embedder: Embedder, tokenizer, context_length: int, *, data: str, num: int = 500,
        seed: int = 0, eval_size: int = CCNEG_EVAL_SIZE, plot_path: str | None = None) -> dict:
  """`evaluate` on the first `num` eval pairs of a CC-Neg file, or NegShapes presence pairs
  when data == "negshapes"; also plots to `plot_path` when given."""
  if data == "negshapes":
    pairs = negshapes.presence_task(num, seed)
    captions, negated = pairs["captions"], pairs["negated"]
  else:
    records = load_ccneg(data, "", split="eval", eval_size=eval_size, check_images=False)[:num]
    captions, negated = [r.caption for r in records], [r.negated for r in records]
  result = evaluate(embedder, tokenizer, context_length, captions, negated)
  if plot_path:
    plot(result, plot_path)
  return result
