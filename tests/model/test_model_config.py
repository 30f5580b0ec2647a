"""Model configs are checked before anything is built: one line naming the file and key."""

import json
import time

import pytest

from negclip_jax import rundir
from negclip_jax.eval import cli as eval_cli
from negclip_jax.model import clip as model_lib
from negclip_jax.model import convert

# (HF config.json key path, bad value as JSON text, what the error says)
BAD_VALUES = [
  (("text_config", "num_hidden_layers"), "1e9", "must be an integer"),
  (("text_config", "num_hidden_layers"), "1000000000", "must be in [1, 256]"),
  (("vision_config", "num_attention_heads"), "0", "must be in [1, "),
  (("vision_config", "num_attention_heads"), "5", "must divide hidden_size"),
  (("text_config", "hidden_size"), '"512"', "must be an integer, not str"),
  (("text_config", "hidden_size"), "-64", "must be in [1, 65536]"),
  (("text_config", "layer_norm_eps"), "1e999", "must be finite"),
  (("text_config", "num_hidden_layers"), "true", "must be an integer, not bool"),
  (("vision_config", "patch_size"), "64", "must be in [1, 32]"),
]


def _hf_config(key_path, value_json: str) -> str:
  config = convert.config_to_hf(model_lib.get_config("tiny"))
  config["model_type"] = "clip"
  config[key_path[0]][key_path[1]] = "__BAD__"
  return json.dumps(config).replace('"__BAD__"', value_json)


@pytest.mark.parametrize("key_path, value, says", BAD_VALUES)
def test_bad_hf_config_value_is_one_line_naming_file_and_key(tmp_path, key_path, value, says):
  (tmp_path / "config.json").write_text(_hf_config(key_path, value))
  started = time.monotonic()
  with pytest.raises(ValueError) as info:
    convert.load_pretrained(tmp_path)
  message = str(info.value)
  assert time.monotonic() - started < 5
  assert message.startswith(f"{tmp_path / 'config.json'}: {'.'.join(key_path)}=")
  assert says in message and "\n" not in message


def test_deeply_nested_json_is_refused_naming_the_file(tmp_path):
  (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
  with pytest.raises(ValueError, match=r"config.json: JSON nested too deeply"):
    convert.load_pretrained(tmp_path)


def test_run_dir_model_config_is_checked_and_negclip_eval_says_one_line(tmp_path, capsys):
  config = model_lib.config_to_dict(model_lib.get_config("tiny"))
  config["text"]["num_attention_heads"] = 0
  (tmp_path / rundir.MODEL_CONFIG_FILE).write_text(json.dumps(config))
  (tmp_path / rundir.CHECKPOINTS_DIR).mkdir()
  with pytest.raises(SystemExit) as info:
    eval_cli.cli(["--model", str(tmp_path), "--task", "negshapes"])
  err = capsys.readouterr().err.strip()
  assert info.value.code == 1 and len(err.splitlines()) == 1, err
  assert err.startswith(f"error: {tmp_path / rundir.MODEL_CONFIG_FILE}: text.num_attention_heads=0")


def test_presets_and_dataclass_configs_pass_the_check():
  for name in model_lib.PRESETS:
    model_lib.check_config(model_lib.get_config(name))
  with pytest.raises(model_lib.ModelConfigError, match="text.num_hidden_layers=0"):
    model_lib.CLIPConfig(text=model_lib.TextConfig(num_hidden_layers=0))
