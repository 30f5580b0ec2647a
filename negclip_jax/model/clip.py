"""Flax CLIP whose parameter tree maps one-to-one onto Hugging Face's `CLIPModel`.

A Flax path such as ``text_model/encoder/layers/3/self_attn/q_proj/kernel`` is the
state-dict key ``text_model.encoder.layers.3.self_attn.q_proj.weight`` (transposed);
`negclip_jax.convert` owns that mapping. Numerics follow
`transformers.models.clip.modeling_clip` (pre-LayerNorm blocks, causal text mask,
EOT pooling, class-token pooling with a post-LayerNorm).

Images are NHWC float32, already normalized (`negclip_jax.preprocess`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

EOT_TOKEN_ID = 49407  # "<|endoftext|>" in CLIP's BPE vocabulary (`ClipTokenizer.eot_token_id`).
OPENAI_EOS_TOKEN_ID = 2  # HF's marker for "pool at argmax(input_ids)" (OpenAI configs).


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = EOT_TOKEN_ID  # OPENAI_EOS_TOKEN_ID means argmax(input_ids).


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers and the joint embedding; checked on construction (`check_config`)."""

  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = math.log(1 / 0.07)

  def __post_init__(self):
    check_config(self)

  def replace(self, **kw) -> "CLIPConfig":
    return dataclasses.replace(self, **kw)


# Sane bounds of a model config (README "Model configs"): far above any released CLIP, low
# enough that a mistyped or hostile config.json fails at once instead of allocating for hours.
MAX_LAYERS = 256
MAX_WIDTH = 65536  # hidden, MLP and projection widths
MAX_VOCAB = 1 << 20
MAX_CONTEXT = 8192
MAX_IMAGE_SIZE = 8192
MAX_CHANNELS = 16
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


class ModelConfigError(ValueError):
  """A model config value out of type or range: `key` (e.g. "text.num_attention_heads"),
  `value`, `problem`; readers prefix the file (`in_file`)."""

  def __init__(self, key: str, value, problem: str):
    self.key, self.value, self.problem = key, value, problem
    super().__init__(f"{key}={value!r}: {problem}")

  def in_file(self, source: str, prefixes: Mapping[str, str] | None = None) -> ValueError:
    """This error naming `source` and the key as that file spells it (prefixes: {"text.":
    "text_config."})."""
    key = self.key
    for ours, theirs in (prefixes or {}).items():
      if key.startswith(ours):
        key = theirs + key[len(ours) :]
    return ValueError(f"{source}: {key}={self.value!r}: {self.problem}")


def _int_in(key: str, value, lo: int, hi: int):
  if isinstance(value, bool) or not isinstance(value, int):
    raise ModelConfigError(key, value, f"must be an integer, not {type(value).__name__}")
  if not lo <= value <= hi:
    raise ModelConfigError(key, value, f"must be in [{lo}, {hi}]")


def _number(key: str, value, positive: bool = False):
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ModelConfigError(key, value, f"must be a number, not {type(value).__name__}")
  if not math.isfinite(value) or (positive and value <= 0):
    raise ModelConfigError(key, value, "must be finite" + (" and > 0" if positive else ""))


def _check_tower(tower: str, c: TextConfig | VisionConfig):
  key = lambda name: f"{tower}.{name}"
  _int_in(key("num_hidden_layers"), c.num_hidden_layers, 1, MAX_LAYERS)
  _int_in(key("hidden_size"), c.hidden_size, 1, MAX_WIDTH)
  _int_in(key("intermediate_size"), c.intermediate_size, 1, MAX_WIDTH)
  _int_in(key("num_attention_heads"), c.num_attention_heads, 1, c.hidden_size)
  if c.hidden_size % c.num_attention_heads:
    raise ModelConfigError(
      key("num_attention_heads"), c.num_attention_heads, f"must divide hidden_size {c.hidden_size}"
    )
  if c.hidden_act not in ACTIVATIONS:
    raise ModelConfigError(key("hidden_act"), c.hidden_act, f"must be one of {ACTIVATIONS}")
  _number(key("layer_norm_eps"), c.layer_norm_eps, positive=True)


def check_config(config: CLIPConfig) -> None:
  """ModelConfigError for the first value out of type or range (the bounds above; heads
  dividing widths; bools are not integers), before anything is built."""
  for tower, c, cls in (("text", config.text, TextConfig), ("vision", config.vision, VisionConfig)):
    if not isinstance(c, cls):
      raise ModelConfigError(tower, c, f"must be a {cls.__name__}")
    _check_tower(tower, c)
  t, v = config.text, config.vision
  _int_in("text.vocab_size", t.vocab_size, 1, MAX_VOCAB)
  _int_in("text.max_position_embeddings", t.max_position_embeddings, 1, MAX_CONTEXT)
  _int_in("text.eos_token_id", t.eos_token_id, 0, MAX_VOCAB)
  _int_in("vision.image_size", v.image_size, 1, MAX_IMAGE_SIZE)
  _int_in("vision.patch_size", v.patch_size, 1, v.image_size)
  _int_in("vision.num_channels", v.num_channels, 1, MAX_CHANNELS)
  _int_in("projection_dim", config.projection_dim, 1, MAX_WIDTH)
  _number("logit_scale_init_value", config.logit_scale_init_value)


def config_to_dict(config: CLIPConfig) -> dict:
  """`CLIPConfig` -> JSON-able dict {"text": {...}, "vision": {...}, "projection_dim", ...}."""
  return dataclasses.asdict(config)


def config_from_dict(d: Mapping[str, Any], source: str = "model config") -> CLIPConfig:
  """Inverse of `config_to_dict`; unknown or missing fields name the file."""
  try:
    return CLIPConfig(
      text=TextConfig(**d["text"]),
      vision=VisionConfig(**d["vision"]),
      **{k: v for k, v in d.items() if k not in ("text", "vision")},
    )
  except ModelConfigError as e:
    raise e.in_file(source) from e
  except (KeyError, TypeError) as e:
    raise ValueError(f"{source}: not a negclip-jax CLIP config ({type(e).__name__}: {e})") from e


def _b(patch, image_size=224, vision_width=768, vision_layers=12, heads=12):
  return CLIPConfig(
    text=TextConfig(),
    vision=VisionConfig(
      hidden_size=vision_width,
      intermediate_size=4 * vision_width,
      num_hidden_layers=vision_layers,
      num_attention_heads=heads,
      image_size=image_size,
      patch_size=patch,
    ),
    projection_dim=512,
  )


def _l(image_size):
  return CLIPConfig(
    text=TextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
    vision=VisionConfig(
      hidden_size=1024,
      intermediate_size=4096,
      num_hidden_layers=24,
      num_attention_heads=16,
      image_size=image_size,
      patch_size=14,
    ),
    projection_dim=768,
  )


def _open_clip(
  text_width,
  text_heads,
  text_layers,
  vision_width,
  vision_heads,
  vision_layers,
  vision_mlp,
  embed_dim,
):
  """open_clip's ViT-*-14 models: GELU (not quick_gelu), 224 px, patch 14, text MLP 4x, EOT
  pooling at argmax(ids); `convert.config_from_open_clip` of its model_configs JSON."""
  return CLIPConfig(
    text=TextConfig(
      hidden_size=text_width,
      intermediate_size=4 * text_width,
      num_hidden_layers=text_layers,
      num_attention_heads=text_heads,
      hidden_act="gelu",
      eos_token_id=OPENAI_EOS_TOKEN_ID,
    ),
    vision=VisionConfig(
      hidden_size=vision_width,
      intermediate_size=vision_mlp,
      num_hidden_layers=vision_layers,
      num_attention_heads=vision_heads,
      image_size=224,
      patch_size=14,
      hidden_act="gelu",
    ),
    projection_dim=embed_dim,
  )


PRESETS = {
  "vit-b-32": _b(32),  # openai/clip-vit-base-patch32, the paper's model.
  "vit-b-16": _b(16),
  "vit-l-14": _l(224),
  "vit-l-14-336": _l(336),
  # open_clip ViT-H-14 (~1.0B parameters) and ViT-bigG-14 (~2.5B; vision MLP 1664 * 4.9231).
  "vit-h-14": _open_clip(1024, 16, 24, 1280, 16, 32, 5120, 1024),
  "vit-bigg-14": _open_clip(1280, 20, 32, 1664, 16, 48, 8192, 1280),
  # Demo: 32px images, 8px patches; trains from scratch in minutes on a CPU.
  "small": CLIPConfig(
    text=TextConfig(
      hidden_size=96,
      intermediate_size=384,
      num_hidden_layers=6,
      num_attention_heads=3,
      max_position_embeddings=32,
    ),
    vision=VisionConfig(
      hidden_size=96,
      intermediate_size=384,
      num_hidden_layers=4,
      num_attention_heads=3,
      image_size=32,
      patch_size=8,
    ),
    projection_dim=96,
  ),
  # Tests: seconds to compile and run.
  "tiny": CLIPConfig(
    text=TextConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=4,
      num_attention_heads=2,
      max_position_embeddings=16,
    ),
    vision=VisionConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=32,
      patch_size=8,
    ),
    projection_dim=16,
  ),
}


def get_config(name: str) -> CLIPConfig:
  """Returns a preset `CLIPConfig` by name (see `PRESETS`)."""
  if name not in PRESETS:
    raise KeyError(f"Unknown CLIP preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name]


def _activation(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f"Unsupported hidden_act {name!r} (quick_gelu, gelu, gelu_new)")


_normal = nn.initializers.normal


def layer_norm(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
  """LayerNorm with the two-pass variance torch uses: flax's default one-pass
  E[x^2] - E[x]^2 cancels in float32 on the residual stream and costs float32 parity."""
  return nn.LayerNorm(eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


ATTENTIONS = ("einsum", "dot_product")  # `Attention.implementation`


class Attention(nn.Module):
  """Multi-head self-attention; x [N, L, D] -> [N, L, D].

  implementation: "einsum" (the two einsums and a float32 softmax written here) or
  "dot_product" (`jax.nn.dot_product_attention`, which XLA or cuDNN may fuse; it also
  takes the softmax in float32).
  """

  hidden_size: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = "einsum"

  @nn.compact
  def __call__(self, x, mask):
    """mask: bool [N or 1, 1, L, L], True where a query may attend a key; None = all."""
    head_dim = self.hidden_size // self.num_heads
    dense = lambda name: nn.Dense(
      self.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_normal(0.02),
      name=name,
    )
    split = lambda t: t.reshape(t.shape[:2] + (self.num_heads, head_dim))
    q = split(dense("q_proj")(x)) * (head_dim**-0.5)
    k = split(dense("k_proj")(x))
    v = split(dense("v_proj")(x))
    if self.implementation == "dot_product":
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0)
      return dense("out_proj")(out.reshape(x.shape[:2] + (self.hidden_size,)))
    if self.implementation != "einsum":
      raise ValueError(f"attention implementation {self.implementation!r}; one of {ATTENTIONS}")
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # softmax in >= f32
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(x.shape[:2] + (self.hidden_size,))
    return dense("out_proj")(out)


class MLP(nn.Module):
  hidden_size: int
  intermediate_size: int
  hidden_act: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_normal(0.02))
    x = nn.Dense(self.intermediate_size, name="fc1", **kw)(x)
    x = _activation(self.hidden_act)(x)
    return nn.Dense(self.hidden_size, name="fc2", **kw)(x)


class EncoderLayer(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  hidden_size: int
  intermediate_size: int
  num_heads: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x, mask):
    ln = lambda name: layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name)
    x = x + Attention(
      self.hidden_size,
      self.num_heads,
      self.dtype,
      self.param_dtype,
      self.attention,
      name="self_attn",
    )(ln("layer_norm1")(x), mask)
    return x + MLP(
      self.hidden_size,
      self.intermediate_size,
      self.hidden_act,
      self.dtype,
      self.param_dtype,
      name="mlp",
    )(ln("layer_norm2")(x))


class Layers(nn.Module):
  """The block stack; children are named "0".."L-1" like `encoder.layers.{i}`.

  remat: rematerialize each block in the backward pass (`nn.remat`): only the blocks'
  inputs are kept for the gradient, their insides are recomputed (about one more forward
  of the differentiated blocks, for activation memory of one block at a time)."""

  config: Any  # TextConfig | VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask):
    """x [N, L, D], mask (see `Attention`) -> tuple of num_hidden_layers + 1 hidden states, input first."""
    c = self.config
    layer = nn.remat(EncoderLayer) if self.remat else EncoderLayer
    states = [x]
    for i in range(c.num_hidden_layers):
      x = layer(
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.hidden_act,
        c.layer_norm_eps,
        self.dtype,
        self.param_dtype,
        self.attention,
        name=str(i),
      )(x, mask)
      states.append(x)
    return tuple(states)


class Encoder(nn.Module):
  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask):
    layers = Layers(
      self.config, self.dtype, self.param_dtype, self.attention, self.remat, name="layers"
    )
    return layers(x, mask)


class TextEmbeddings(nn.Module):
  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, positions=None):
    """positions [N, L] (packed rows); default 0..L-1 in every row."""
    c = self.config
    tok = nn.Embed(
      c.vocab_size,
      c.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=_normal(0.02),
      name="token_embedding",
    )
    pos = nn.Embed(
      c.max_position_embeddings,
      c.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=_normal(0.01),
      name="position_embedding",
    )
    if positions is None:
      return tok(input_ids) + pos(jnp.arange(input_ids.shape[-1]))[None]
    return tok(input_ids) + pos(positions)


class TextTransformer(nn.Module):
  """`CLIPTextTransformer`: input_ids [N, L] int32 with L <= max_position_embeddings.

  Packed rows (`negclip_jax.packing`): with `packed=(positions, segments, pool)` each row
  holds several captions; attention is causal within a caption and blocked across them,
  and the pooled outputs are the final-LayerNorm states at the flat indices `pool`
  (any shape, into the N * L tokens), so L is free and only positions are bounded.
  """

  config: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"  # `Attention.implementation`
  remat: bool = False  # `Layers.remat`

  @nn.compact
  def __call__(self, input_ids, packed=None):
    """Returns (pooled [N, D] or pool.shape + [D], last_hidden_state [N, L, D], hidden_states)."""
    c = self.config
    positions, segments, pool = packed if packed is not None else (None, None, None)
    if packed is None and input_ids.shape[-1] > c.max_position_embeddings:
      raise ValueError(
        f"input_ids length {input_ids.shape[-1]} exceeds "
        f"max_position_embeddings={c.max_position_embeddings}"
      )
    x = TextEmbeddings(c, self.dtype, self.param_dtype, name="embeddings")(input_ids, positions)
    length = input_ids.shape[-1]
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if segments is not None:
      mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
    states = Encoder(c, self.dtype, self.param_dtype, self.attention, self.remat, name="encoder")(
      x, mask
    )
    last = layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "final_layer_norm")(
      states[-1]
    )
    if pool is not None:
      return last.reshape(-1, last.shape[-1])[pool], last, states
    pooled = last[jnp.arange(last.shape[0]), eot_positions(input_ids, c.eos_token_id)]
    return pooled, last, states


def eot_positions(input_ids, eos_token_id: int):
  """[N, L] -> [N] pooling index, as `CLIPTextTransformer` picks it."""
  if eos_token_id == OPENAI_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class VisionEmbeddings(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    want = (c.image_size, c.image_size, c.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
      raise ValueError(
        f"pixel_values has shape {pixel_values.shape}; the model expects "
        f"[N, {c.image_size}, {c.image_size}, {c.num_channels}] (NHWC, normalized)"
      )
    width = c.hidden_size
    cls = self.param("class_embedding", _normal(width**-0.5), (width,), self.param_dtype)
    patches = nn.Conv(
      width,
      (c.patch_size, c.patch_size),
      strides=(c.patch_size, c.patch_size),
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_normal(0.02),
      name="patch_embedding",
    )(pixel_values.astype(self.dtype))
    n = patches.shape[0]
    patches = patches.reshape(n, -1, width)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (n, 1, width))
    x = jnp.concatenate([cls, patches], axis=1)
    num_positions = (c.image_size // c.patch_size) ** 2 + 1
    pos = nn.Embed(
      num_positions,
      width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=_normal(0.02),
      name="position_embedding",
    )
    return x + pos(jnp.arange(num_positions))[None]


class VisionTransformer(nn.Module):
  """`CLIPVisionTransformer`: pixel_values [N, H, W, 3] -> pooled [N, D]."""

  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"  # `Attention.implementation`
  remat: bool = False  # `Layers.remat`

  @nn.compact
  def __call__(self, pixel_values):
    c = self.config
    ln = lambda name: layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, name)
    x = VisionEmbeddings(c, self.dtype, self.param_dtype, name="embeddings")(pixel_values)
    x = ln("pre_layrnorm")(x)  # sic: Hugging Face's spelling.
    x = Encoder(c, self.dtype, self.param_dtype, self.attention, self.remat, name="encoder")(
      x, None
    )[-1]
    return ln("post_layernorm")(x[:, 0])


class CLIP(nn.Module):
  """CLIP with Hugging Face `CLIPModel` parameter names.

  Methods (use with `model.apply({"params": p}, x, method=...)`):
    get_text_features(input_ids [N, L] int32) -> [N, projection_dim] (not normalized)
    get_packed_text_features(ids, positions, segments, pool) -> pool.shape + [projection_dim]
      (packed rows [R, T], `negclip_jax.packing`)
    get_image_features(pixel_values [N, H, W, 3] f32) -> [N, projection_dim]
    get_text_hidden_states(input_ids) -> tuple of L_text + 1 arrays [N, L, D]
    __call__(input_ids, pixel_values) -> (image_features, text_features, logit_scale)
  `logit_scale` is stored in log space, like the PyTorch original.
  """

  config: CLIPConfig
  dtype: Dtype = jnp.float32  # compute dtype; params are param_dtype
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"  # `Attention.implementation`: "einsum" | "dot_product"
  remat: bool = False  # rematerialize each transformer block in the backward pass

  def setup(self):
    c = self.config
    options = (self.dtype, self.param_dtype, self.attention, self.remat)
    self.text_model = TextTransformer(c.text, *options)
    self.vision_model = VisionTransformer(c.vision, *options)
    proj = lambda: nn.Dense(
      c.projection_dim,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_normal(0.02),
    )
    self.text_projection = proj()
    self.visual_projection = proj()
    self.logit_scale = self.param(
      "logit_scale", nn.initializers.constant(c.logit_scale_init_value), (), self.param_dtype
    )

  @property
  def _feature_dtype(self):  # float32, or float64 for a float64 model (parity runs)
    return jnp.promote_types(self.dtype, jnp.float32)

  def get_text_features(self, input_ids):
    pooled, _, _ = self.text_model(input_ids)
    return self.text_projection(pooled).astype(self._feature_dtype)

  def get_packed_text_features(self, input_ids, positions, segments, pool):
    pooled, _, _ = self.text_model(input_ids, (positions, segments, pool))
    return self.text_projection(pooled).astype(self._feature_dtype)

  def get_image_features(self, pixel_values):
    return self.visual_projection(self.vision_model(pixel_values)).astype(self._feature_dtype)

  def get_text_hidden_states(self, input_ids):
    _, _, states = self.text_model(input_ids)
    return states

  def __call__(self, input_ids, pixel_values):
    return (
      self.get_image_features(pixel_values),
      self.get_text_features(input_ids),
      self.logit_scale,
    )


def init_params(model: CLIP, rng: jax.Array) -> dict:
  """Random parameters for `model` (abstract-free, on the default device)."""
  c = model.config
  ids = jnp.zeros((1, c.text.max_position_embeddings), jnp.int32)
  pixels = jnp.zeros((1, c.vision.image_size, c.vision.image_size, c.vision.num_channels))
  return jax.jit(model.init)(rng, ids, pixels)["params"]
