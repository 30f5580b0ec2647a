"""Layer-wise negation sensitivity, as Omni-NegCLIP's `syntactic_difference_across_cliplayer.py`.

For every text block i (0-based) the output of block i (before the final LayerNorm) at
the EOT position (the pooling position) of a caption and of its negation are compared
by cosine similarity and averaged over pairs. Optionally the embedding output (the
input of block 0) too. Blocks are summarized as front / middle / back thirds
(`np.array_split` of the L blocks: 0-3, 4-7, 8-11 for L = 12, as the original).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from negclip_jax import storage
from negclip_jax.data import negshapes
from negclip_jax.data.ccneg import CCNEG_EVAL_SIZE, load_ccneg
from negclip_jax.eval import embed
from negclip_jax.eval.embed import Embedder
from negclip_jax.model import clip as model_lib
from negclip_jax.train import step as train_step

THIRDS = ("front", "middle", "back")


class _EotHiddenStates(model_lib.CLIP):
  """CLIP whose `get_text_features` is the EOT hidden state of each layer: [N, L + 1, D]
  (index 0 = embedding output, i + 1 = output of block i)."""

  def get_text_features(self, input_ids):
    states = self.get_text_hidden_states(input_ids)
    pos = model_lib.eot_positions(input_ids, self.config.text.eos_token_id)
    rows = jnp.arange(input_ids.shape[0])
    return jnp.stack([s[rows, pos] for s in states], axis=1)


@functools.lru_cache(maxsize=None)
def _eot_model(model: model_lib.CLIP) -> _EotHiddenStates:
  return _EotHiddenStates(model.config, dtype=model.dtype, param_dtype=model.param_dtype)


def summarize(block_cosine: Sequence[float]) -> dict:
  """{"cosine_front", "cosine_middle", "cosine_back"}: means over the thirds of L blocks."""
  return {
    f"cosine_{name}": float(np.mean(part))
    for name, part in zip(THIRDS, np.array_split(np.asarray(block_cosine), 3))
  }


def evaluate(
  embedder: Embedder,
  tokenizer,
  context_length: int,
  captions: Sequence[str],
  negated: Sequence[str],
  embeddings: bool = False,
) -> dict:
  """ "cosine_block_0" ... "cosine_block_{L-1}", the `summarize` keys, "n"; with
  `embeddings` also "cosine_embeddings" (first). Values are mean cosines over the pairs."""
  params = (
    train_step.unreplicate(embedder.params) if embedder.mesh is None else embedder.params
  )  # replicated [devices, ...] or already sharded
  states = Embedder(
    _eot_model(embedder.model),
    params,
    embedder.batch_size,
    progress=embedder.progress,
    mesh=embedder.mesh,
  )  # per-layer L2-normalized
  pos = embed.embed_texts(states, tokenizer, context_length, captions, "captions")
  neg = embed.embed_texts(states, tokenizer, context_length, negated, "negated captions")
  cosine = np.sum(pos * neg, -1).mean(0)  # [L + 1]
  out = {"cosine_embeddings": float(cosine[0])} if embeddings else {}
  out.update({f"cosine_block_{i}": float(c) for i, c in enumerate(cosine[1:])})
  return {**out, **summarize(cosine[1:]), "n": len(captions)}


def plot(result: dict, path: str) -> None:
  """Writes a PNG of mean cosine against block index from an `evaluate` result."""
  blocks = sorted(int(k.rsplit("_", 1)[1]) for k in result if k.startswith("cosine_block_"))
  x, y = blocks, [result[f"cosine_block_{i}"] for i in blocks]
  if "cosine_embeddings" in result:
    x, y = [-1, *x], [result["cosine_embeddings"], *y]
  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  ax.plot(x, y, marker="o")
  ax.set(
    xlabel="text block (-1 = embeddings)",
    ylabel="cos(caption, negated) at EOT",
    title=f"Negation sensitivity by block (n={result['n']})",
  )
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with storage.path(path).open("wb") as f:  # local or gs://
    fig.savefig(f, dpi=120, format="png")


def run(
  embedder: Embedder,
  tokenizer,
  context_length: int,
  *,
  data: str,
  num: int | None = None,
  seed: int = 0,
  eval_size: int = CCNEG_EVAL_SIZE,
  embeddings: bool = False,
  plot_path: str | None = None,
) -> dict:
  """`evaluate` on the CC-Neg *train* split (every record before the last `eval_size`;
  the first `num` when given), or on `num` (default 500) NegShapes presence pairs when
  data == "negshapes"; also plots to `plot_path` when given."""
  if data == "negshapes":
    pairs = negshapes.presence_task(500 if num is None else num, seed)
    captions, negated = pairs["captions"], pairs["negated"]
  else:
    records = load_ccneg(data, "", split="train", eval_size=eval_size, check_images=False)[:num]
    captions, negated = [r.caption for r in records], [r.negated for r in records]
  result = evaluate(embedder, tokenizer, context_length, captions, negated, embeddings)
  if plot_path:
    plot(result, plot_path)
  return result
