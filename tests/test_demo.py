"""The quickstart runs end to end (few steps of a tiny model) and writes every artifact."""

import json

import numpy as np
import torch
import transformers

from negclip_jax import demo, load_pretrained


def test_demo_fast_writes_everything(tmp_path):
  results = demo.main(["--workdir", str(tmp_path), "--fast"])
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk == results
  for name in ("pretrained", "omni_negclip"):
    assert set(demo.METRICS) <= set(results[name])
    assert all(0.0 <= results[name][k] <= 1.0 for k in demo.METRICS)
  assert (tmp_path / "demo.png").stat().st_size > 10_000
  for export in ("pretrained/hf", "export/hf"):
    assert (tmp_path / export / "model.safetensors").is_file()
    assert (tmp_path / export / "vocab.json").is_file()
  # The fine-tuned export is a real transformers CLIP with the same text features.
  model, params = load_pretrained(tmp_path / "export/hf")
  hf = transformers.CLIPModel.from_pretrained(tmp_path / "export/hf").eval()
  ids = np.array([[49406, 320, 736, 7117, 49407] + [0] * (model.config.text.max_position_embeddings - 5)], np.int32)
  with torch.no_grad():
    out = hf.get_text_features(input_ids=torch.from_numpy(ids).long())
  want = (out if torch.is_tensor(out) else out.pooler_output).numpy()
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids, method="get_text_features")),
                             want, atol=1e-4)
  rows = [json.loads(l) for l in (tmp_path / "finetune/metrics.jsonl").read_text().splitlines()]
  assert rows and "L3" in rows[0]
  assert {f"eval_{k}" for k in demo.METRICS} <= set(rows[-1])  # the final evaluation
