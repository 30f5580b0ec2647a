"""Weights in and out: Hugging Face / OpenAI state dicts <-> our Flax params.

Flax path ``a/b/kernel`` <-> state-dict key ``a.b.weight``: Dense kernels are [in, out]
(PyTorch Linear weights [out, in]), Conv kernels HWIO (PyTorch OIHW), `embedding` and
LayerNorm `scale` become `weight`. OpenAI naming (`transformer.resblocks.N.attn.in_proj_weight`
holding q, k, v stacked; `text_projection` stored [width, embed]) goes through the HF naming.

Everything is strict: a missing or unexpected key, or a shape mismatch, raises
`CheckpointMismatchError` naming the key and both shapes. Pickles are read only with
`torch.load(weights_only=True)`; the only extra global allowed is `argparse.Namespace`
(the `args` entry of Omni-NegCLIP / CoN-CLIP training checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from negclip_jax import model as model_lib

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


def state_dict_to_params(state_dict: Mapping[str, Any], config: model_lib.CLIPConfig,
                         source: str = "state dict") -> dict:
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
        f"{missing[:8]}; unexpected keys ({len(unexpected)}): {unexpected[:8]}")
  flat = {}
  for key, path in by_key.items():
    value = _to_numpy(given[key])
    want = tuple(expected[path].shape)
    if path[-1] == "kernel":  # compare in the state dict's own (PyTorch) layout
      want = want[::-1] if len(want) == 2 else tuple(want[i] for i in (3, 2, 0, 1))
    if tuple(value.shape) != want:
      raise CheckpointMismatchError(
          f"{source}: key {key!r} has shape {tuple(value.shape)} but the model expects {want}")
    if path[-1] == "kernel":
      value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
    flat[path] = value
  return traverse_util.unflatten_dict(flat)


def _flax_path_to_key(path) -> str:
  *prefix, leaf = path
  if leaf in ("kernel", "embedding", "scale"):
    leaf = "weight"
  return ".".join([*prefix, leaf])


def _abstract_params(config):
  """The params tree of `config` as shapes and dtypes, without allocating it."""
  return jax.eval_shape(lambda: model_lib.init_params(model_lib.CLIP(config), jax.random.key(0)))


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor
    import torch
    value = value.detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
      value = value.float()
    return value.numpy()
  value = np.asarray(value)
  return value.astype(np.float32) if value.dtype == np.float16 else value


# ----------------------------------------------------------------------- HF config


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> model_lib.CLIPConfig:
  """HF `CLIPConfig` dict (config.json) -> our `CLIPConfig`; missing keys take HF defaults."""
  if hf.get("model_type", "clip") != "clip":
    raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not a CLIP model "
                     "(expected 'clip'); SigLIP, EVA-CLIP etc. are not supported")
  text = hf.get("text_config") or hf.get("text_config_dict") or {}
  vision = hf.get("vision_config") or hf.get("vision_config_dict") or {}
  pick = lambda cls, d: {f: d[f] for f in cls.__dataclass_fields__ if f in d}
  return model_lib.CLIPConfig(
      text=model_lib.TextConfig(**pick(model_lib.TextConfig, text)),
      vision=model_lib.VisionConfig(**pick(model_lib.VisionConfig, vision)),
      projection_dim=hf.get("projection_dim", 512),
      logit_scale_init_value=hf.get("logit_scale_init_value", model_lib.CLIPConfig.logit_scale_init_value))


def config_to_hf(config: model_lib.CLIPConfig) -> dict:
  """Our `CLIPConfig` -> kwargs of `transformers.CLIPConfig`."""
  import dataclasses
  text = dataclasses.asdict(config.text)
  text["projection_dim"] = config.projection_dim
  vision = dataclasses.asdict(config.vision)
  vision["projection_dim"] = config.projection_dim
  if text["eos_token_id"] == model_lib.OPENAI_EOS_TOKEN_ID:
    text.update(bos_token_id=0, pad_token_id=1)  # what OpenAI-converted HF configs carry
  return dict(text_config=text, vision_config=vision, projection_dim=config.projection_dim,
              logit_scale_init_value=config.logit_scale_init_value)


def _image_processor_config(size: int) -> dict:
  """`CLIPImageProcessor` settings matching `negclip_jax.preprocess` at `size` px."""
  from negclip_jax import preprocess
  return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
          "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
          "crop_size": {"height": size, "width": size}, "do_rescale": True,
          "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
          "image_mean": [float(m) for m in preprocess.CLIP_MEAN],
          "image_std": [float(s) for s in preprocess.CLIP_STD]}


# -------------------------------------------------------------------- OpenAI naming

_OPENAI_BLOCK = {
    "attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
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
_OPENAI_TRANSPOSED = {"text_projection": "text_projection.weight",
                      "visual.proj": "visual_projection.weight"}
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
  return value[:n], value[n:2 * n], value[2 * n:]


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
        [parts["q_proj"], parts["k_proj"], parts["v_proj"]], axis=0)
  return out


def config_from_openai(sd: Mapping[str, Any]) -> model_lib.CLIPConfig:
  """Infers the architecture from OpenAI-named shapes, as `clip.model.build_model` does."""
  count = lambda pat: len({k.split(".")[pat.count(".")] for k in sd if k.startswith(pat)})
  vision_width = sd["visual.conv1.weight"].shape[0]
  patch = sd["visual.conv1.weight"].shape[-1]
  grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
  text_width = sd["ln_final.weight"].shape[0]
  return model_lib.CLIPConfig(
      text=model_lib.TextConfig(
          vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=text_width,
          intermediate_size=4 * text_width, num_hidden_layers=count("transformer.resblocks."),
          num_attention_heads=text_width // 64,
          max_position_embeddings=sd["positional_embedding"].shape[0],
          eos_token_id=model_lib.OPENAI_EOS_TOKEN_ID),
      vision=model_lib.VisionConfig(
          hidden_size=vision_width, intermediate_size=4 * vision_width,
          num_hidden_layers=count("visual.transformer.resblocks."),
          num_attention_heads=vision_width // 64, image_size=patch * grid, patch_size=patch),
      projection_dim=sd["text_projection"].shape[1])


# ------------------------------------------------------------------------- files


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
  """Reads `.safetensors`, or a torch pickle (`.pt`/`.bin`/`.pth`) with weights_only=True.

  Unwraps `{"model": sd, ...}` / `{"state_dict": sd}` training checkpoints and a
  DataParallel `module.` prefix.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No checkpoint file at {path}")
  if path.suffix == ".safetensors":
    from safetensors.torch import load_file
    sd = load_file(str(path))
  else:
    import torch
    try:
      with torch.serialization.safe_globals([argparse.Namespace]):
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError from the safe unpickler
      raise ValueError(
          f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}). negclip-jax never unpickles arbitrary "
          "objects; re-save the state dict with safetensors or as a plain dict of tensors.") from e
    if hasattr(sd, "state_dict") and not isinstance(sd, dict):  # a TorchScript module
      sd = sd.state_dict()
    for wrapper in ("model", "state_dict"):
      if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
        sd = sd[wrapper]
  if not isinstance(sd, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32):
  """Loads CLIP weights -> (model, params).

  `path` is a Hugging Face CLIP directory (config.json + model.safetensors or
  pytorch_model.bin), or a single HF- or OpenAI-named state-dict file (`.safetensors`,
  `.pt`, `.bin`), including `{"model": sd, "optimizer": ..., "args": Namespace}`
  checkpoints of the Omni-NegCLIP / CoN-CLIP PyTorch code.
  `dtype` is the compute dtype (e.g. jnp.bfloat16); params stay float32.
  """
  path = Path(path)
  if path.is_dir():
    config_file = path / "config.json"
    if not config_file.is_file():
      raise FileNotFoundError(f"{path} is a directory without config.json; expected a Hugging "
                              "Face CLIP directory")
    config = config_from_hf(json.loads(config_file.read_text()), str(config_file))
    for name in ("model.safetensors", "pytorch_model.bin"):
      if (path / name).is_file():
        weights = path / name
        break
    else:
      raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin found")
    params = state_dict_to_params(read_state_dict(weights), config, str(weights))
  else:
    sd = read_state_dict(path)
    if is_openai_state_dict(sd):
      config = config_from_openai(sd)
      sd = openai_to_hf(sd, str(path))
    elif "text_model.embeddings.token_embedding.weight" in sd:
      raise ValueError(f"{path}: an HF-named state dict has no architecture; put it in a "
                       "directory with its config.json and pass the directory")
    else:
      raise CheckpointMismatchError(
          f"{path}: neither OpenAI nor Hugging Face CLIP key names (first keys: {list(sd)[:5]})")
    params = state_dict_to_params(sd, config, str(path))
  params = jax.tree.map(jnp.asarray, params)
  return model_lib.CLIP(config, dtype=dtype), params


def save_pretrained(model: model_lib.CLIP, params, out_dir: str | os.PathLike,
                    format: str = "hf", tokenizer=None) -> Path:
  """Writes weights PyTorch users can load.

  format="hf": config.json + model.safetensors (+ tokenizer and preprocessor files),
    loadable by `transformers.CLIPModel.from_pretrained(out_dir)`.
  format="openai": model.pt, an OpenAI-named state dict of float tensors for
    `model.load_state_dict` in the original (OpenAI `clip`) code.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  sd = params_to_state_dict(params)
  if format == "hf":
    import transformers
    from safetensors.numpy import save_file
    transformers.CLIPConfig(**config_to_hf(model.config)).save_pretrained(out)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "preprocessor_config.json").write_text(json.dumps(
        _image_processor_config(model.config.vision.image_size), indent=2))
    if tokenizer is not None:
      tokenizer.save_pretrained(out)
  elif format == "openai":
    import torch
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in hf_to_openai(sd).items()},
               out / "model.pt")
  else:
    raise ValueError(f"format must be 'hf' or 'openai', got {format!r}")
  return out
