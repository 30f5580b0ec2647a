"""Weights in and out: Hugging Face / OpenAI / open_clip state dicts <-> our Flax params.

Flax path ``a/b/kernel`` <-> state-dict key ``a.b.weight``: Dense kernels are [in, out]
(PyTorch Linear weights [out, in]), Conv kernels HWIO (PyTorch OIHW), `embedding` and
LayerNorm `scale` become `weight`. OpenAI naming (`transformer.resblocks.N.attn.in_proj_weight`
holding q, k, v stacked; `text_projection` stored [width, embed]), which open_clip shares,
goes through the HF naming.

Loading conventions (`load_pretrained`): the architecture comes from what the source
states -- HF ``config.json``, open_clip ``open_clip_config.json`` (GELU unless
``quick_gelu``), or the ``model_config.json`` our OpenAI-format export writes beside
``model.pt``. A bare OpenAI-named state dict states only shapes: widths, MLP widths,
depths, vocabulary, context and image size are read from them, and only the head counts
and activation follow OpenAI's CLIP (heads = width / 64, QuickGELU), unless overridden
with `text_heads=` / `vision_heads=` / `activation=` (or a whole `config=`); a width that
is not a multiple of 64 is then an error, never a guess. Hub ids resolve through the
local Hugging Face cache (`negclip_jax.hub`).

Everything is strict: a missing or unexpected key, or a shape mismatch, raises
`CheckpointMismatchError` naming the key and both shapes. Torch files are read only
through `negclip_jax.torch_io`: ``torch.load(weights_only=True)`` allowing
``argparse.Namespace`` (the ``args`` of Omni-NegCLIP / CoN-CLIP training checkpoints),
and TorchScript archives (OpenAI's released ``ViT-B-32.pt``) by unpickling their
``data.pkl`` with an unpickler that admits tensors only -- ``torch.jit.load`` never runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from negclip_jax import storage
from negclip_jax.model import clip as model_lib

logger = logging.getLogger(__name__)

# Buffers some checkpoints carry that hold no learned state.
_IGNORED_KEYS = re.compile(r"(^|\.)position_ids$")
_OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


class CheckpointMismatchError(ValueError):
  """A state dict does not match the model: names the keys and shapes at fault."""


# --------------------------------------------------------------------------- HF naming


def params_to_state_dict(params) -> dict[str, np.ndarray]:
  """Flax params -> HF `CLIPModel` state dict (numpy, PyTorch layouts)."""
  out = {}
  for path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
    value = np.asarray(value)
    if path[-1] == "kernel":
      value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
    out[_flax_path_to_key(path)] = np.array(value, order="C")  # keeps 0-d logit_scale 0-d
  return out


def state_dict_to_params(
  state_dict: Mapping[str, Any], config: model_lib.CLIPConfig, source: str = "state dict"
) -> dict:
  """HF-named state dict -> Flax params for `config`, strictly checked.

  Values may be numpy arrays or torch tensors; floats are kept in their dtype
  except bf16/fp16, which become float32.
  """
  expected = traverse_util.flatten_dict(_abstract_params(config))
  by_key = {_flax_path_to_key(p): p for p in expected}
  given = {k: v for k, v in state_dict.items() if not _IGNORED_KEYS.search(k)}
  missing = sorted(set(by_key) - set(given))
  unexpected = sorted(set(given) - set(by_key))
  if missing or unexpected:
    raise CheckpointMismatchError(
      f"{source}: does not match the CLIP config. Missing keys ({len(missing)}): "
      f"{missing[:8]}; unexpected keys ({len(unexpected)}): {unexpected[:8]}"
    )
  flat = {}
  for key, path in by_key.items():
    value = _to_numpy(given[key])
    want = tuple(expected[path].shape)
    if path[-1] == "kernel":  # compare in the state dict's own (PyTorch) layout
      want = want[::-1] if len(want) == 2 else tuple(want[i] for i in (3, 2, 0, 1))
    if tuple(value.shape) != want:
      raise CheckpointMismatchError(
        f"{source}: key {key!r} has shape {tuple(value.shape)} but the model expects {want}"
      )
    if path[-1] == "kernel":
      value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
    flat[path] = value
  return traverse_util.unflatten_dict(flat)


def _flax_path_to_key(path) -> str:
  *prefix, leaf = path
  if leaf in ("kernel", "embedding", "scale"):
    leaf = "weight"
  return ".".join([*prefix, leaf])


@functools.lru_cache(maxsize=8)
def _abstract_params(config):
  """The params tree of `config` as shapes and dtypes, without allocating it (cached)."""
  return jax.eval_shape(lambda: model_lib.init_params(model_lib.CLIP(config), jax.random.key(0)))


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor
    import torch

    value = value.detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
      value = value.float()
    return value.numpy()
  value = np.asarray(value)
  return value.astype(np.float32) if value.dtype.name in ("float16", "bfloat16") else value


# ----------------------------------------------------------------------- HF config


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> model_lib.CLIPConfig:
  """HF `CLIPConfig` dict (config.json) -> our `CLIPConfig`; missing keys take HF defaults."""
  if hf.get("model_type", "clip") != "clip":
    raise ValueError(
      f"{source}: model_type {hf.get('model_type')!r} is not a CLIP model "
      "(expected 'clip'); SigLIP, EVA-CLIP etc. are not supported"
    )
  text = hf.get("text_config") or hf.get("text_config_dict") or {}
  vision = hf.get("vision_config") or hf.get("vision_config_dict") or {}
  for key, value in (("text_config", text), ("vision_config", vision)):
    if not isinstance(value, Mapping):
      raise ValueError(f"{source}: {key}={value!r}: must be a JSON object")
  pick = lambda cls, d: {f: d[f] for f in cls.__dataclass_fields__ if f in d}
  try:
    return model_lib.CLIPConfig(
      text=model_lib.TextConfig(**pick(model_lib.TextConfig, text)),
      vision=model_lib.VisionConfig(**pick(model_lib.VisionConfig, vision)),
      projection_dim=hf.get("projection_dim", 512),
      logit_scale_init_value=hf.get(
        "logit_scale_init_value", model_lib.CLIPConfig.logit_scale_init_value
      ),
    )
  except model_lib.ModelConfigError as e:
    raise e.in_file(source, {"text.": "text_config.", "vision.": "vision_config."}) from e


def config_to_hf(config: model_lib.CLIPConfig) -> dict:
  """Our `CLIPConfig` -> kwargs of `transformers.CLIPConfig`."""
  text = dataclasses.asdict(config.text)
  text["projection_dim"] = config.projection_dim
  vision = dataclasses.asdict(config.vision)
  vision["projection_dim"] = config.projection_dim
  if text["eos_token_id"] == model_lib.OPENAI_EOS_TOKEN_ID:
    text.update(bos_token_id=0, pad_token_id=1)  # what OpenAI-converted HF configs carry
  return dict(
    text_config=text,
    vision_config=vision,
    projection_dim=config.projection_dim,
    logit_scale_init_value=config.logit_scale_init_value,
  )


def _image_processor_config(size: int) -> dict:
  """`CLIPImageProcessor` settings matching `negclip_jax.preprocess` at `size` px."""
  from negclip_jax.model import preprocess

  return {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": size},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": size, "width": size},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "image_mean": [float(m) for m in preprocess.CLIP_MEAN],
    "image_std": [float(s) for s in preprocess.CLIP_STD],
  }


# -------------------------------------------------------------------- OpenAI naming

_OPENAI_BLOCK = {
  "attn.out_proj": "self_attn.out_proj",
  "ln_1": "layer_norm1",
  "ln_2": "layer_norm2",
  "mlp.c_fc": "mlp.fc1",
  "mlp.c_proj": "mlp.fc2",
}
_OPENAI_TOP = {
  "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
  "positional_embedding": "text_model.embeddings.position_embedding.weight",
  "ln_final.weight": "text_model.final_layer_norm.weight",
  "ln_final.bias": "text_model.final_layer_norm.bias",
  "logit_scale": "logit_scale",
  "visual.class_embedding": "vision_model.embeddings.class_embedding",
  "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
  "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
  "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
  "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
  "visual.ln_post.weight": "vision_model.post_layernorm.weight",
  "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_OPENAI_TRANSPOSED = {
  "text_projection": "text_projection.weight",
  "visual.proj": "visual_projection.weight",
}
_BLOCK_RE = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ_RE = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def is_openai_state_dict(sd: Mapping[str, Any]) -> bool:
  return "visual.conv1.weight" in sd or "transformer.resblocks.0.ln_1.weight" in sd


def openai_to_hf(sd: Mapping[str, Any], source: str = "state dict") -> dict:
  """OpenAI/open_clip-named CLIP state dict -> HF-named state dict (same arrays)."""
  out = {}
  tower = lambda visual: "vision_model" if visual else "text_model"
  for key, value in sd.items():
    if key in _OPENAI_METADATA:
      continue
    if key in _OPENAI_TOP:
      out[_OPENAI_TOP[key]] = value
    elif key in _OPENAI_TRANSPOSED:
      out[_OPENAI_TRANSPOSED[key]] = value.T
    elif m := _IN_PROJ_RE.match(key):
      visual, i, kind = m.groups()
      for name, part in zip(("q_proj", "k_proj", "v_proj"), _split3(value)):
        out[f"{tower(visual)}.encoder.layers.{i}.self_attn.{name}.{kind}"] = part
    elif (m := _BLOCK_RE.match(key)) and m.group(3) in _OPENAI_BLOCK:
      visual, i, name, kind = m.groups()
      out[f"{tower(visual)}.encoder.layers.{i}.{_OPENAI_BLOCK[name]}.{kind}"] = value
    else:
      raise CheckpointMismatchError(f"{source}: unexpected OpenAI CLIP key {key!r}")
  return out


def _split3(value):
  n = value.shape[0] // 3
  return value[:n], value[n : 2 * n], value[2 * n :]


def hf_to_openai(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF-named state dict -> OpenAI naming (inverse of `openai_to_hf`)."""
  inverse_top = {v: k for k, v in _OPENAI_TOP.items()}
  inverse_t = {v: k for k, v in _OPENAI_TRANSPOSED.items()}
  inverse_block = {v: k for k, v in _OPENAI_BLOCK.items()}
  layer_re = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
  out, qkv = {}, {}
  for key, value in sd.items():
    if key in inverse_top:
      out[inverse_top[key]] = value
    elif key in inverse_t:
      out[inverse_t[key]] = np.array(value.T, order="C")
    elif m := layer_re.match(key):
      tower, i, name, kind = m.groups()
      prefix = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{i}"
      if name.startswith("self_attn.") and name != "self_attn.out_proj":
        qkv.setdefault((prefix, kind), {})[name.split(".")[1]] = value
      else:
        out[f"{prefix}.{inverse_block[name]}.{kind}"] = value
    else:
      raise CheckpointMismatchError(f"no OpenAI name for key {key!r}")
  for (prefix, kind), parts in qkv.items():
    out[f"{prefix}.attn.in_proj_{kind}"] = np.concatenate(
      [parts["q_proj"], parts["k_proj"], parts["v_proj"]], axis=0
    )
  return out


def config_from_openai(
  sd: Mapping[str, Any],
  source: str = "state dict",
  *,
  text_heads: int | None = None,
  vision_heads: int | None = None,
  activation: str | None = None,
) -> model_lib.CLIPConfig:
  """Architecture of an OpenAI-named state dict: shapes, plus OpenAI's conventions.

  Widths, MLP widths, depths, vocabulary, context, patch and image size come from the
  shapes. Head counts and the activation are not in the shapes: unless given, they
  follow OpenAI's CLIP (heads = width / 64, QuickGELU), and a width that is not a
  multiple of 64 is refused.
  """
  layers = lambda prefix: len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})
  mlp = lambda prefix: sd[f"{prefix}0.mlp.c_fc.weight"].shape[0] if layers(prefix) else 0
  text_width = sd["ln_final.weight"].shape[0]
  vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
  grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
  activation = activation or "quick_gelu"
  model_lib._activation(activation)  # raises ValueError for an unknown name
  return model_lib.CLIPConfig(
    text=model_lib.TextConfig(
      vocab_size=sd["token_embedding.weight"].shape[0],
      hidden_size=text_width,
      intermediate_size=mlp("transformer.resblocks."),
      num_hidden_layers=layers("transformer.resblocks."),
      num_attention_heads=_heads(text_width, text_heads, "text", source),
      max_position_embeddings=sd["positional_embedding"].shape[0],
      hidden_act=activation,
      eos_token_id=model_lib.OPENAI_EOS_TOKEN_ID,
    ),
    vision=model_lib.VisionConfig(
      hidden_size=vision_width,
      intermediate_size=mlp("visual.transformer.resblocks."),
      num_hidden_layers=layers("visual.transformer.resblocks."),
      num_attention_heads=_heads(vision_width, vision_heads, "vision", source),
      image_size=patch * grid,
      patch_size=patch,
      hidden_act=activation,
    ),
    projection_dim=sd["text_projection"].shape[1],
  )


def _heads(width: int, heads: int | None, tower: str, source: str) -> int:
  if heads is None:
    if width % 64:
      raise ValueError(
        f"{source}: {tower} width {width} is not a multiple of 64, so OpenAI's convention "
        f"(heads = width / 64) does not apply; pass {tower}_heads= (or config=) to "
        "load_pretrained"
      )
    return width // 64
  if heads <= 0 or width % heads:
    raise ValueError(f"{source}: {tower}_heads={heads} does not divide the {tower} width {width}")
  return heads


# ------------------------------------------------------------------------- open_clip

# open_clip options that change nothing at inference, or are at the value we implement.
_OPEN_CLIP_NEUTRAL = {
  "ls_init_value": (None,),
  "attentional_pool": (False,),
  "no_ln_pre": (False,),
  "pos_embed_type": ("learnable",),
  "final_ln_after_pool": (False,),
  "act_kwargs": (None,),
  "block_type": (None, "default"),
  "qk_norm": (False,),
  "scaled_cosine_attn": (False,),
  "scale_heads": (False,),
  "scale_attn_inner": (False,),
  "scale_attn": (False,),
  "scale_fc": (False,),
  "timm_model_name": (None,),
  "hf_model_name": (None,),
  "embed_cls": (False,),
  "no_causal_mask": (False,),
  "proj_bias": (False,),
  "proj_type": ("linear",),
  "custom_text": (False,),
  "init_logit_bias": (None,),
  "multimodal_cfg": (None,),
}
_OPEN_CLIP_IGNORED = {  # training-time or tokenizer-side options
  "patch_dropout",
  "output_tokens",
  "pad_id",
  "eos_id",
  "hf_tokenizer_name",
  "tokenizer_mode",
  "tokenizer_kwargs",
  "timm_model_pretrained",
  "hf_model_pretrained",
}


def config_from_open_clip(
  cfg: Mapping[str, Any], source: str = "open_clip_config.json"
) -> model_lib.CLIPConfig:
  """open_clip config (``open_clip_config.json`` or its ``model_cfg``) -> `CLIPConfig`.

  Follows open_clip's `CLIP(**model_cfg)`: vision heads = width / head_width, MLP
  width = width * mlp_ratio, GELU unless ``quick_gelu`` is true, pooling at the EOT
  token (argmax of the ids) and the class token. Any option that changes the
  architecture otherwise (layer scale, attentional pooling, timm / HF towers, ...) is
  refused, naming the key.
  """
  model_cfg = cfg.get("model_cfg", cfg)
  vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
  _check_open_clip(
    model_cfg, {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}, source, ""
  )
  _check_open_clip(
    vision,
    {
      "layers",
      "width",
      "head_width",
      "mlp_ratio",
      "patch_size",
      "image_size",
      "pool_type",
      "norm_kwargs",
    },
    source,
    "vision_cfg.",
  )
  _check_open_clip(
    text,
    {
      "context_length",
      "vocab_size",
      "width",
      "heads",
      "layers",
      "mlp_ratio",
      "pool_type",
      "norm_kwargs",
    },
    source,
    "text_cfg.",
  )
  if vision.get("pool_type", "tok") != "tok" or text.get("pool_type", "argmax") != "argmax":
    raise ValueError(
      f"{source}: only pool_type 'tok' (vision) and 'argmax' (text) are "
      f"supported, got {vision.get('pool_type')!r} / {text.get('pool_type')!r}"
    )
  if not isinstance(vision.get("layers", 12), int):
    raise ValueError(
      f"{source}: vision_cfg.layers={vision['layers']!r} is a ResNet tower; "
      "only ViT towers are supported"
    )
  activation = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
  v_width, t_width = vision.get("width", 768), text.get("width", 512)
  head_width = vision.get("head_width", 64)
  if v_width % head_width:
    raise ValueError(
      f"{source}: vision_cfg.width {v_width} is not a multiple of head_width {head_width}"
    )
  return model_lib.CLIPConfig(
    text=model_lib.TextConfig(
      vocab_size=text.get("vocab_size", 49408),
      hidden_size=t_width,
      intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)),
      num_hidden_layers=text.get("layers", 12),
      num_attention_heads=_heads(t_width, text.get("heads", 8), "text", source),
      max_position_embeddings=text.get("context_length", 77),
      hidden_act=activation,
      layer_norm_eps=_eps(text, source, "text_cfg."),
      eos_token_id=model_lib.OPENAI_EOS_TOKEN_ID,
    ),
    vision=model_lib.VisionConfig(
      hidden_size=v_width,
      intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
      num_hidden_layers=vision.get("layers", 12),
      num_attention_heads=v_width // head_width,
      image_size=_square(vision.get("image_size", 224), source, "vision_cfg.image_size"),
      patch_size=_square(vision.get("patch_size", 16), source, "vision_cfg.patch_size"),
      hidden_act=activation,
      layer_norm_eps=_eps(vision, source, "vision_cfg."),
    ),
    projection_dim=model_cfg.get("embed_dim", 512),
    logit_scale_init_value=model_cfg.get(
      "init_logit_scale", model_lib.CLIPConfig.logit_scale_init_value
    ),
  )


def _check_open_clip(cfg: Mapping[str, Any], supported: set, source: str, where: str):
  for key, value in cfg.items():
    if key in supported or key in _OPEN_CLIP_IGNORED:
      continue
    if key not in _OPEN_CLIP_NEUTRAL or value not in _OPEN_CLIP_NEUTRAL[key]:
      raise ValueError(
        f"{source}: open_clip option {where}{key}={value!r} is not supported by negclip-jax's CLIP"
      )


def _square(size, source: str, key: str) -> int:
  if isinstance(size, int):
    return size
  if len(size) == 2 and size[0] == size[1]:
    return int(size[0])
  raise ValueError(f"{source}: {key}={size!r} is not square")


def _eps(cfg: Mapping[str, Any], source: str, where: str) -> float:
  norm = cfg.get("norm_kwargs") or {}
  if set(norm) - {"eps"}:
    raise ValueError(f"{source}: {where}norm_kwargs={norm!r}: only 'eps' is supported")
  return norm.get("eps", 1e-5)


# ---------------------------------------------------------------- negclip-jax export

EXPORT_CONFIG = "model_config.json"
"""Written beside ``model.pt`` by `save_pretrained(format="openai")`:
``{"weights": "model.pt", "config": dataclasses.asdict(CLIPConfig)}``, i.e. what an
OpenAI state dict cannot express (heads, activation, EOT rule, LayerNorm eps)."""


def _export_config_beside(weights: epath.Path) -> model_lib.CLIPConfig | None:
  """The config an OpenAI-format export wrote beside `weights`, if it names that file."""
  sidecar = weights.parent / EXPORT_CONFIG
  if not sidecar.is_file():
    return None
  meta = read_json_object(sidecar)
  if meta.get("weights") != weights.name:
    return None
  return model_lib.config_from_dict(meta.get("config", {}), str(sidecar))


# ------------------------------------------------------------------------- files


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
  """Reads `.safetensors`, or a torch file through `negclip_jax.torch_io.load`.

  Torch files are read without running code from them: ``torch.save`` pickles with
  ``weights_only=True``, TorchScript archives (OpenAI's released ``ViT-B-32.pt``) by
  reading their tensors only. Unwraps `{"model": sd, ...}` / `{"state_dict": sd}`
  training checkpoints and a DataParallel `module.` prefix.
  """
  path = storage.path(path)
  if not path.is_file():
    raise FileNotFoundError(
      f"{path}: no such file or directory (expected a training run directory, one of its "
      "checkpoints, a Hugging Face CLIP directory or a checkpoint file)"
    )
  if path.suffix == ".safetensors":
    from safetensors import SafetensorError
    from safetensors.numpy import load, load_file  # no torch needed (bfloat16 via ml_dtypes)

    try:
      sd = load(path.read_bytes()) if storage.is_remote(path) else load_file(str(path))
    except SafetensorError as e:
      raise ValueError(f"{path}: unreadable safetensors file ({e}); truncated?") from e
  else:
    try:
      from negclip_jax import torch_io
    except ImportError as e:
      raise ImportError(f"{path}: {e}") from e
    sd = torch_io.load(
      path, hint="re-save the state dict with safetensors or as a plain dict of tensors"
    )
    for wrapper in ("model", "state_dict"):
      if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
        sd = sd[wrapper]
  if not isinstance(sd, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module.") :]: v for k, v in sd.items()}
  return sd


def read_json_object(file: epath.Path) -> dict:
  """A JSON object from `file`; ValueError naming the file otherwise."""
  try:
    value = json.loads(file.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{file}: not valid UTF-8 JSON ({e})") from e
  except RecursionError as e:
    raise ValueError(f"{file}: JSON nested too deeply to be a config") from e
  if not isinstance(value, dict):
    raise ValueError(f"{file}: expected a JSON object, got a {type(value).__name__}")
  return value


# Directory layouts, first match wins: marker file, its config reader, weight files by preference.
_LAYOUTS = (
  (
    "config.json",
    lambda f: config_from_hf(read_json_object(f), str(f)),
    ("model.safetensors", "pytorch_model.bin"),
  ),
  (
    "open_clip_config.json",
    lambda f: config_from_open_clip(read_json_object(f), str(f)),
    ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
  ),
  (
    EXPORT_CONFIG,
    lambda f: model_lib.config_from_dict(read_json_object(f).get("config", {}), str(f)),
    ("model.pt",),
  ),
)


def _describe_dir(path: epath.Path) -> tuple[epath.Path, model_lib.CLIPConfig]:
  """(weights file, stated config) of a model directory."""
  for marker, read_config, weight_names in _LAYOUTS:
    if (path / marker).is_file():
      try:
        config = read_config(path / marker)
      except model_lib.ModelConfigError as e:
        raise e.in_file(str(path / marker)) from e
      except (TypeError, ZeroDivisionError, OverflowError) as e:  # arithmetic on bad values
        raise ValueError(f"{path / marker}: bad value ({type(e).__name__}: {e})") from e
      for name in weight_names:
        if (path / name).is_file():
          return path / name, config
      raise FileNotFoundError(f"{path}: has {marker} but none of {list(weight_names)}")
  raise FileNotFoundError(
    f"{path} is a directory without config.json (Hugging Face), open_clip_config.json "
    f"(open_clip) or {EXPORT_CONFIG} (negclip-jax OpenAI-format export)"
  )


def load_pretrained(
  path: str | os.PathLike,
  dtype=jnp.float32,
  *,
  config: model_lib.CLIPConfig | None = None,
  text_heads: int | None = None,
  vision_heads: int | None = None,
  activation: str | None = None,
):
  """Loads CLIP weights -> (model, params).

  Args:
    path: a Hugging Face Hub id (``openai/clip-vit-base-patch32``; see `negclip_jax.hub`)
      or a local
      * Hugging Face CLIP directory: config.json + model.safetensors / pytorch_model.bin;
      * open_clip directory: open_clip_config.json + open_clip_model.safetensors /
        open_clip_pytorch_model.bin;
      * `save_pretrained(format="openai")` directory or its model.pt (the config is read
        from model_config.json beside it);
      * OpenAI-named state-dict file: ``.safetensors``, a ``torch.save`` pickle (also
        ``{"model": sd, "optimizer": ..., "args": Namespace}`` checkpoints of the
        Omni-NegCLIP / CoN-CLIP code), or a TorchScript archive (OpenAI's released
        ``ViT-B-32.pt``), read without running any of its code.
    dtype: compute dtype (e.g. jnp.bfloat16); params stay float32.
    config: the architecture, replacing whatever the source states or implies; the
      weights are still checked against it key by key and shape by shape.
    text_heads, vision_heads, activation: for a bare OpenAI-named state dict only,
      which carries no architecture beyond its shapes: replace OpenAI's conventions
      (heads = width / 64, "quick_gelu"; activation is one of model.TextConfig's
      `hidden_act` names, e.g. "gelu" for open_clip models trained without QuickGELU).
  Raises:
    FileNotFoundError: nothing at `path` (nor in the Hugging Face cache).
    ValueError: an unreadable or unsafe file, an unsupported architecture, or
      overrides for a source that states its architecture.
    CheckpointMismatchError: weights that do not match the architecture.
  """
  conventions = {
    k: v
    for k, v in dict(
      text_heads=text_heads, vision_heads=vision_heads, activation=activation
    ).items()
    if v is not None
  }
  if config is not None and conventions:
    raise ValueError(f"pass either config= or {sorted(conventions)}, not both")
  from negclip_jax.model import hub

  path = hub.resolve(path)
  if path.is_dir() and storage.is_partial(path):
    raise ValueError(
      f"{path} is a half-written export (it holds {storage.PARTIAL_MARKER}: the export was "
      "interrupted); export again"
    )
  if path.is_dir():
    weights, stated = _describe_dir(path)
  else:
    weights, stated = path, _export_config_beside(path) if path.is_file() else None
  if stated is not None and conventions:
    raise ValueError(
      f"{path} states its architecture; {sorted(conventions)} apply only to "
      "bare OpenAI state dicts (pass config= to replace a stated one)"
    )
  sd = read_state_dict(weights)
  source = str(weights)
  config = config or stated
  if is_openai_state_dict(sd):
    if config is None:
      config = config_from_openai(sd, source, **conventions)
      logger.info(
        "%s: no architecture metadata; heads and activation from %s",
        source,
        conventions or "OpenAI's conventions (heads = width / 64, QuickGELU)",
      )
    sd = openai_to_hf(sd, source)
  elif "text_model.embeddings.token_embedding.weight" not in sd:
    raise CheckpointMismatchError(
      f"{source}: neither OpenAI nor Hugging Face CLIP key names (first keys: {list(sd)[:5]})"
    )
  elif config is None:
    raise ValueError(
      f"{source}: an HF-named state dict has no architecture; put it in a "
      "directory with its config.json and pass the directory, or pass config="
    )
  params = jax.tree.map(jnp.asarray, state_dict_to_params(sd, config, source))
  return model_lib.CLIP(config, dtype=dtype), params


def hf_tokenizer(config: model_lib.CLIPConfig, tokenizer=None):
  """The tokenizer an HF export of a `config` model carries: `tokenizer`, else the bundled
  OpenAI one; ValueError when its vocabulary does not fit the model's."""
  from negclip_jax.model.tokenizer import default_tokenizer

  tokenizer = default_tokenizer() if tokenizer is None else tokenizer
  if tokenizer.vocab_size > config.text.vocab_size:
    raise ValueError(
      f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
      f"{config.text.vocab_size}; pass save_pretrained(..., tokenizer=) the model's own "
      "(e.g. ClipTokenizer.from_pretrained(its directory))"
    )
  return tokenizer


def save_pretrained(
  model: model_lib.CLIP, params, out_dir: str | os.PathLike, format: str = "hf", tokenizer=None
) -> epath.Path:
  """Writes weights PyTorch users can load; `load_pretrained(out_dir)` reads both back.

  format="hf": config.json + model.safetensors, the preprocessor files and the tokenizer
    files of `tokenizer` (default: the bundled OpenAI vocabulary, when the model's vocabulary
    has its size; else a ValueError asks for the model's own), loadable by
    `transformers.CLIPModel.from_pretrained(out_dir)` and `CLIPProcessor.from_pretrained`.
  format="openai": model.pt, an OpenAI-named state dict of float tensors for
    `model.load_state_dict` in the original (OpenAI `clip`) code, and model_config.json
    (`EXPORT_CONFIG`) with the full config, which the state dict cannot express.

  Files are written one by one into `out_dir`; `negclip_jax.export` publishes a whole
  folder at once (`storage.publish_dir`).
  """
  if format == "hf":
    tokenizer = hf_tokenizer(model.config, tokenizer)  # checked before anything is written
  out = storage.path(out_dir)  # local or gs://
  out.mkdir(parents=True, exist_ok=True)
  sd = params_to_state_dict(params)
  if format == "hf":
    import transformers
    from safetensors.numpy import save

    (out / "config.json").write_text(
      transformers.CLIPConfig(
        **config_to_hf(model.config), architectures=["CLIPModel"]
      ).to_json_string()
    )
    # One upload to a bucket; locally an ordinary file (the umask's mode, not safetensors' 0600).
    (out / "model.safetensors").write_bytes(save(sd, metadata={"format": "pt"}))
    (out / "preprocessor_config.json").write_text(
      json.dumps(_image_processor_config(model.config.vision.image_size), indent=2)
    )
    tokenizer.save_pretrained(out, context_length=model.config.text.max_position_embeddings)
  elif format == "openai":
    import torch

    with (out / "model.pt").open("wb") as f:
      torch.save({k: torch.from_numpy(np.array(v)) for k, v in hf_to_openai(sd).items()}, f)
    (out / EXPORT_CONFIG).write_text(
      json.dumps(
        {"weights": "model.pt", "config": model_lib.config_to_dict(model.config)}, indent=2
      )
    )
  else:
    raise ValueError(f"format must be 'hf' or 'openai', got {format!r}")
  return out
