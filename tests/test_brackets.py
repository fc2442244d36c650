"""Budgets that converge: summary.json `best_final` (the best-by-validation checkpoint on every eval split) and the
`pipeline.brackets` arms (linear probe, full fine-tune), through the CLI as users call it."""
import json
import pathlib

import ml_collections as mlc
import pytest

from tpp_jax import config as config_lib
from tpp_jax import evaluate, pipeline
from tpp_jax.checkpoints import restore

from conftest import load_config

FT_ARMS = ("tpp_finetune", "baseline", "linear", "full")


@pytest.fixture
def brackets_run(smoke_pipeline) -> pathlib.Path:
  """conftest.SMOKE_PIPELINE_ARG (shared with tests/test_pipeline.py): eval_every=1 makes every step a candidate best,
  so some arm peaks before its last step (the full fine-tune does)."""
  return smoke_pipeline


def _summary(run: pathlib.Path) -> dict:
  return json.loads((run / "summary.json").read_text())


def test_brackets_are_arms_once_per_label_fraction_and_off_by_default():
  c = load_config("default", "smoke,pipeline.brackets=True,pipeline.label_fractions=(0.5,1.0),"
                             "train_extra=('^encoder/norm/',)")
  arms = pipeline.arm_configs(c, 3, pathlib.Path("/wd"))
  assert list(arms) == ["tpp", "tpp_finetune", "baseline", "linear", "full", "frac_0.5/tpp_finetune",
                        "frac_0.5/baseline", "frac_0.5/linear", "frac_0.5/full"]
  for name in ("linear", "full", "frac_0.5/linear", "frac_0.5/full"):
    a, base = arms[name], arms[name.replace("linear", "baseline").replace("full", "baseline")]
    assert a.stage == name.rsplit("/", 1)[-1] and not a.target_init
    for f in ("seed", "steps", "batch_size", "eval_every", "best_metric"):
      assert a[f] == base[f], f
    assert a.optim.to_dict() == base.optim.to_dict() and a.data.to_dict() == base.data.to_dict()
  assert arms["linear"].train_extra == () and arms["full"].train_extra == ("^encoder/norm/",)  # the probe: head only
  assert not {"linear", "full"} & set(pipeline.arm_configs(load_config("default", "smoke"), 0, pathlib.Path("/wd")))
  own = pipeline.arm_configs(load_config("default", "smoke,pipeline.brackets=True,optim.lr=6e-3,pipeline.full_lr=1e-3"),
                             0, pathlib.Path("/wd"))  # the full fine-tune's own lr; every other arm keeps optim.lr
  assert {a: c.optim.lr for a, c in own.items() if a != "tpp"} == {"tpp_finetune": 6e-3, "baseline": 6e-3,
                                                                    "linear": 6e-3, "full": 1e-3}
  with pytest.raises(config_lib.ConfigError, match="pipeline.full_lr=-1.0 must be >= 0"):
    config_lib.validate(load_config("default", "pipeline.full_lr=-1.0"))
  with pytest.raises(config_lib.ConfigError, match="pipeline.brackets=1 has the wrong type"):
    load_config("default", "pipeline.brackets=1")
  saved = mlc.ConfigDict(config_lib.with_defaults({"stage": "pipeline", "pipeline": {"brackets": 1}}))
  with pytest.raises(config_lib.ConfigError, match="pipeline.brackets=1 must be True or False"):
    config_lib.validate(saved)  # e.g. a hand-edited config.json


def test_pipeline_with_brackets_writes_best_final_equal_to_an_eval_of_the_best_checkpoint(brackets_run):
  seed = brackets_run / "seed_0"
  s = {a: _summary(seed / a) for a in ("tpp", *FT_ARMS)}
  assert {a: s[a]["stage"] for a in FT_ARMS} == {"tpp_finetune": "finetune", "baseline": "finetune",
                                                 "linear": "linear", "full": "full"}
  base = s["baseline"]
  assert s["linear"]["params"]["trainable"] == s["linear"]["params"]["head"] == base["params"]["head"]
  assert s["full"]["params"]["trainable"] > 10 * base["params"]["trainable"] and s["full"]["params"]["target"] == 0
  for a in ("linear", "full"):
    assert s[a]["steps"] == base["steps"] and s[a]["data"] == base["data"] and s[a]["target_init"] is None
  different = []
  for a in FT_ARMS:
    best, final, best_final = s[a]["best"], s[a]["final"], s[a]["best_final"]
    assert best["metric"] == "auc" and set(best_final) == set(final) == {"val", "test"}, a
    rows = [json.loads(line) for line in (seed / a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "test"] == [s[a]["steps"]], a  # best_final logs no row
    if best["step"] == s[a]["steps"]:
      assert best_final == final, a
      continue
    different.append(a)
    run = restore.load_run(seed / a, "best")  # an independent restore and evaluation of the kept best checkpoint
    assert (run.checkpoint, run.step) == ("best", best["step"])
    sources = evaluate.eval_sources(run.config, ("val", "test"))
    for split in ("val", "test"):
      got = evaluate.evaluate_split(run, sources[split])
      assert set(got) == set(best_final[split])
      for k, v in got.items():
        assert best_final[split][k] == pytest.approx(v, abs=1e-6), (a, split, k)
    assert best_final["val"]["auc"] == pytest.approx(best["value"], abs=1e-9)
    assert best_final != final
  assert different, "no arm peaked before its last step: the restore path of best_final went untested"


def test_report_shows_the_brackets_and_the_best_by_validation_tables(brackets_run):
  md = (brackets_run / "report.md").read_text()
  test = md.split("\n## Test metrics\n")[1].split("\n## ")[0]
  main, selected = test.split("\n### Selected by validation (best step): test metrics\n")
  s = {a: _summary(brackets_run / "seed_0" / a) for a in FT_ARMS}
  assert "| steps | best step | auc @ best step |" in main
  for a in FT_ARMS:
    peft = "none" if a in ("linear", "full") else "lora"
    final, best = s[a]["final"]["test"]["auc"], s[a]["best_final"]["test"]["auc"]
    steps, best_step = s[a]["steps"], s[a]["best"]["step"]
    assert f"| `{a}` | {peft} | 100% | 1 |" in main, a
    assert f"| {final:.4f} ± n/a | {steps} | {best_step} | {best:.4f} ± n/a |" in main, a
    assert f"| {best:.4f} ± n/a | {steps} | {best_step} |" in selected, a
  assert "| best step (TPP / baseline) | TPP − baseline | 95% CI | p | verdict |" in selected
  assert "**Brackets**" in md and "`linear` (linear probe" in md
  data = json.loads((brackets_run / "comparison.json").read_text())
  sel = [e for e in data["selected_by_validation"]["splits"]["test"]  # (also: 25 % labels, baseline_matched)
         if e["fraction"] == 1.0 and e["baseline"] == "baseline"]
  assert [e["metric"] for e in sel] == ["accuracy", "balanced_accuracy", "macro_f1", "auc"]
  auc = sel[-1]
  assert auc["checkpoint"] == "best" and auc["tpp_values"] == [s["tpp_finetune"]["best_final"]["test"]["auc"]]
  assert auc["tpp_best_steps"] == [s["tpp_finetune"]["best"]["step"]]
  assert auc["baseline_best_steps"] == [s["baseline"]["best"]["step"]]
  assert all(e["checkpoint"] == "final" for e in data["splits"]["test"])
