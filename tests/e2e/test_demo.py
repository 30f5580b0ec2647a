"""The quickstart runs end to end (few steps of a tiny model), writes every artifact, and
`--seed` reaches every phase."""

import json

import numpy as np
import pytest
import torch
import transformers

from negclip_jax import demo, load_pretrained, rundir
from negclip_jax.data import negshapes
from negclip_jax.eval.tasks import negshapes_task
from negclip_jax.train import losses, pipeline, trainer


def _recording(monkeypatch, module, name, phase, seen, seed_of):
  """Replaces module.name by a wrapper that appends (phase, seed) to `seen`."""
  real = getattr(module, name)

  def wrapper(*args, **kwargs):
    seen.append((phase, seed_of(*args, **kwargs)))
    return real(*args, **kwargs)

  monkeypatch.setattr(module, name, wrapper)


def test_demo_fast_writes_everything_and_follows_seed(tmp_path, monkeypatch):
  seen = []
  _recording(
    monkeypatch, negshapes, "generate_pairs", "data", seen, lambda num, seed, *a, **k: seed
  )
  _recording(monkeypatch, demo, "pretrain", "pretrain", seen, lambda *a: a[-1])
  _recording(
    monkeypatch,
    pipeline,
    "step_indices",
    "batch order",
    seen,
    lambda step, n, batch, seed, *a, **k: seed,
  )
  _recording(monkeypatch, trainer, "train", "fine-tune", seen, lambda config, workdir: config.seed)
  _recording(
    monkeypatch, negshapes_task, "generate", "evaluation", seen, lambda num, seed, *a: seed
  )
  results = demo.main(["--workdir", str(tmp_path), "--fast", "--seed", "3"])
  assert {phase for phase, _ in seen} == {
    "data",
    "pretrain",
    "batch order",
    "fine-tune",
    "evaluation",
  }
  assert {seed for _, seed in seen} == {3}, sorted(set(seen))

  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk == results and results["seed"] == 3
  for name in ("pretrained", "omni_negclip"):
    assert set(demo.METRICS) <= set(results[name])
    assert all(0.0 <= results[name][k] <= 1.0 for k in demo.METRICS)
    for task in negshapes_task.TASKS:  # every task carries its audit and standard error
      assert {f"{task}_se", f"{task}_ties", f"{task}_chance", f"{task}_n"} <= set(results[name])
  audit = "mcq_rule_text_only"  # the audit does not depend on the model
  assert results["pretrained"][audit] == results["omni_negclip"][audit]
  table = demo.table(results["pretrained"], results["omni_negclip"])
  assert "presence_hard (held-out)" in table and " +- " in table
  assert (tmp_path / "demo.png").stat().st_size > 10_000
  for export in ("pretrained/hf", "export/hf"):
    assert (tmp_path / export / "model.safetensors").is_file()
    assert (tmp_path / export / "vocab.json").is_file()
  card = (tmp_path / "export/hf/README.md").read_text()  # the model card holds the results
  rows = card.split("### negshapes\n", 1)[1].lstrip("\n").split("\n\n")[0].splitlines()[2:]
  assert f"| presence_acc | {results['omni_negclip']['presence_acc']:.4f} |" in rows
  assert rows == sorted(rows)  # sorted by metric name, not in the order computed
  assert "| base model | `pretrained/hf` |" in card and str(tmp_path) not in card
  # The fine-tuned export is a real transformers CLIP with the same text features.
  model, params = load_pretrained(tmp_path / "export/hf")
  hf = transformers.CLIPModel.from_pretrained(tmp_path / "export/hf").eval()
  ids = np.array(
    [[49406, 320, 736, 7117, 49407] + [0] * (model.config.text.max_position_embeddings - 5)],
    np.int32,
  )
  with torch.no_grad():
    out = hf.get_text_features(input_ids=torch.from_numpy(ids).long())
  want = (out if torch.is_tensor(out) else out.pooler_output).numpy()
  np.testing.assert_allclose(
    np.asarray(model.apply({"params": params}, ids, method="get_text_features")), want, atol=1e-4
  )
  rows = rundir.read_metrics(tmp_path / "finetune")
  assert rows and "L3" in rows[0]


def test_demo_diagnose_prints_probes_and_fit_over_steps(tmp_path, capsys):
  out = demo.main(
    ["--workdir", str(tmp_path), "--fast", "--diagnose", "--probe-num", "120", "--seed", "1"]
  )
  printed = capsys.readouterr().out
  assert "| red circle |" in printed and "presence_hard" in printed
  assert "text oracle on the frozen image features" in printed
  assert "| mcq_negation (held-out) |" in printed
  perception = out["perception"]
  assert all(0.0 <= perception[k] <= 1.0 for k in perception if "_probe_" in k)
  assert perception["n"] == 120
  assert all(0.0 <= perception[f"oracle_{t}_acc"] <= 1.0 for t in negshapes_task.TASKS)
  # step 0 (the pretrained model) and every log_every (2) of the 4 fast steps
  assert list(out["fit"]) == ["0", "2", "4"]
  assert all(0.0 <= row["presence_hard_train_acc"] <= 1.0 for row in out["fit"].values())
  assert out["fit"]["2"]["L3"] > 0
  assert json.loads((tmp_path / "diagnose.json").read_text())["fit"] == out["fit"]


def _fake_runs(accs: dict, se: float = 0.01) -> dict:
  """{variant: 3 seeds of results} with accuracy accs[variant][task] (+ seed noise)."""
  tasks = (*demo.BAR_TASKS, *demo.KEPT_TASKS)
  runs = {}
  for name, acc in accs.items():
    runs[name] = []
    for noise in (-0.01, 0.0, 0.01):
      after = {"presence_hard_heldout_chance": 0.5, "absence_hard_heldout_chance": 0.5}
      for t in tasks:
        after[f"{t}_acc"], after[f"{t}_se"] = acc.get(t, 0.5) + noise, se
      runs[name].append({"omni_negclip": after, "options": {}})
  return runs


def test_bar_table_known_answers():
  # mean_se: the larger of the seeds' s.e. (s.d. 0.01 / sqrt 3) and the items' (sqrt 3 * 0.03 / 3)
  after = [r["omni_negclip"] for r in _fake_runs({"v": {"mcq_heldout_negation": 0.7}}, 0.03)["v"]]
  assert demo.mean_se(after, "mcq_heldout_negation") == pytest.approx((0.7, 0.03 / np.sqrt(3)))
  after = [r["omni_negclip"] for r in _fake_runs({"v": {}}, 0.001)["v"]]
  assert demo.mean_se(after, "presence")[1] == pytest.approx(0.01 / np.sqrt(3))
  paper = {"presence": 0.9, "absence": 0.8, "presence_heldout": 0.85, "absence_heldout": 0.75}
  learns = {**paper, "presence_hard_heldout": 0.6, "absence_hard_heldout": 0.6}
  learns["mcq_heldout_negation"] = 0.35
  runs = _fake_runs(
    {
      "paper": {**paper, "mcq_heldout_negation": 0.1},
      "learns": learns,
      "at_chance": {**learns, "absence_hard_heldout": 0.5},  # ties with chance fail
      "forgets": {**learns, "absence": 0.6},  # loses the paper-style gain
      "inverts": {**learns, "mcq_heldout_affirmation": 0.3},  # `negation_inverted`-like
    }
  )
  rows = {r.split(" | ")[0].strip("| "): r for r in demo.bar_table(runs).splitlines()[2:]}
  assert rows["learns"].endswith("| yes |")
  assert rows["paper"].endswith("| no |") and rows["at_chance"].endswith("| no |")
  assert rows["forgets"].endswith("| no |") and "(absence)" in rows["forgets"]
  assert rows["inverts"].endswith("| no |") and "(mcq_affirmation (held-out))" in rows["inverts"]


def test_every_recipe_is_a_valid_distinct_variant():
  """Each recipe names known `run` options and a known objective, its image-hard data only
  with a distractor objective, and its outputs a suffix of their own."""
  tags = {}
  for name, options in demo.RECIPES.items():
    assert set(options) <= {*demo.VARIANT_TAGS, "pretrain_steps", "finetune_steps"}, name
    objective = options.get("objective", "omni_negclip")
    assert objective in losses.OBJECTIVES, name
    if options.get("image_hard_fraction"):
      assert objective in losses.DISTRACTOR_OBJECTIVES, name
    tags.setdefault(demo._setup_tag(options, options), []).append(name)
  assert all(len(names) == 1 for names in tags.values()), tags
  assert set(demo.VARIANTS) <= set(demo.RECIPES)


def test_demo_compare_recipe_prints_the_bar_and_reuses_runs(tmp_path, capsys, monkeypatch):
  argv = ["--workdir", str(tmp_path), "--fast", "--compare-seeds", "0"]
  argv += ["--recipe", "conclip_image_hard"]
  out = demo.main(argv)
  image_hard = out["runs"]["conclip_image_hard"][0]
  assert (image_hard["objective"], image_hard["image_hard_fraction"]) == ("conclip", 0.5)
  assert (tmp_path / "seed0/results_imghard0.5_conclip.json").is_file()
  printed = capsys.readouterr().out
  assert "| conclip_image_hard | 1 |" in printed and "best trivial rule" in printed
  # The same command again reuses every run: nothing trains.
  monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained again"))
  assert demo.main(argv)["runs"] == out["runs"]
  assert capsys.readouterr().out.count("Reusing conclip_image_hard, seed 0") == 1


def test_a_fine_tuning_stopped_early_ends_the_demo_before_any_evaluation(
  monkeypatch, tmp_path, capsys
):
  """SIGTERM / Ctrl-C make the trainer save and return `stopped_early`; the demo must not go
  on to evaluate (and write results for) the partly trained model."""
  from negclip_jax import demo
  from negclip_jax.train import trainer

  stopped = {"stopped_early": True, "step": 41, "total_steps": 200}
  monkeypatch.setattr(trainer, "train", lambda config, workdir: stopped)
  with pytest.raises(SystemExit) as e:
    demo.train_to_the_end(None, tmp_path / "finetune")
  assert e.value.code == 130
  assert "stopped at step 41 of 200" in capsys.readouterr().err
  monkeypatch.setattr(trainer, "train", lambda config, workdir: {**stopped, "stopped_early": False})
  assert demo.train_to_the_end(None, tmp_path / "finetune")["step"] == 41


def test_demo_flags_reach_the_fine_tuning_config_and_name_its_outputs(tmp_path, monkeypatch):
  seen = {}

  def train(config, workdir):
    seen.update(config=config, workdir=workdir)
    return {"stopped_early": True, "step": 0, "total_steps": config.total_steps}

  monkeypatch.setattr(trainer, "train", train)
  argv = ["--workdir", str(tmp_path), "--fast", "--layers", "whole", "--learning-rate", "2e-4"]
  with pytest.raises(SystemExit) as stopped:  # the fake trainer stops before any evaluation
    demo.main([*argv, "--grad-clip-norm", "0.5", "--image-hard-affirmed-fraction", "0.5"])
  assert stopped.value.code == 130
  config = seen["config"]
  assert (config.layers, config.learning_rate, config.grad_clip_norm) == ("whole", 2e-4, 0.5)
  assert config.data.negshapes_image_hard_affirmed_fraction == 0.5
  assert seen["workdir"].name == "finetune_affirmed0.5_whole_lr0.0002_clip0.5"


def test_the_shipped_config_is_the_recipe_that_passes_the_bar():
  from negclip_jax import configs

  recipe = demo.finetune_config(**demo.RECIPES["negshapes_learns_negation"])
  assert recipe.to_dict() == configs.load("negshapes_learns_negation").to_dict()
  assert recipe.to_dict() != demo.finetune_config().to_dict()
