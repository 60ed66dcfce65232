"""Online GRAO and D2O: sampling from the live policy inside the train loop."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign import rewards
from jaxalign import sharding
from jaxalign.data import pipeline, toy
from jaxalign.train import resume, rundir
from jaxalign.train import online as online_lib
from jaxalign.workflows import run
from jaxalign import errors
from tests.train.helpers import read_metrics, tiny_config

GRAO_METRICS = ("loss", "loss/exploration", "loss/imitation", "loss/alignment", "reward/mean",
                "reward/std", "reward/ref", "adv/ref", "frac_zero_std_groups",
                "completion_length/mean", "rollout/seconds", "grad_norm")


def parity_reward(prompt, completion, reference):
  """Zero-variance groups for prompts that start with an even digit (every sample and,
  with reference_reward="judge", the answer score 0.5); the others are never constant:
  the answer scores 1 and a sample of the untrained policy is not the answer."""
  if prompt[:1] in "02468":
    return 0.5
  return 1.0 if completion == reference else 0.0


rewards.register("test_parity", rewards.per_example(parity_reward))


def online_config(loss="grao", **overrides):
  # One device: the loop and the engine are mesh-agnostic, and compiling for the
  # 8-device mesh costs several times more (jaxalign/sampling's tests cover it).
  base = {"total_steps": 4, "data.train_path": "toy:sft?n=16&seed=0", "checkpoint.every": 2,
          "mesh.shape": (1, 1, 1), "loss.name": loss, "online.enabled": True,
          "online.samples_per_prompt": 3, "sampling.max_new_tokens": 4}
  if loss == "grao":
    base["reward.name"] = "test_parity"
  else:
    base.update({"reference.mode": "frozen", "sampling.batch_size": 8})
  c = tiny_config("sft", **{**base, **overrides})
  c.loss.hparams = ml_collections.ConfigDict(
      dict(reference_reward="judge") if loss == "grao" else {})
  return c


def _train(cfg, workdir, **kwargs):
  return run.train(cfg, workdir, progress=False, devices=jax.devices()[:1], **kwargs)


def _params(workdir, cfg):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  _, params, _ = rundir.load_run_params(str(workdir), cfg, mesh=mesh)
  return jax.tree.leaves(jax.device_get(params))


@pytest.fixture(scope="module")
def grao_run(tmp_path_factory):
  """4 steps of online GRAO (checkpoints at 2 and 4); also the policy later tests sample."""
  workdir = tmp_path_factory.mktemp("grao") / "straight"
  _train(online_config(), str(workdir))
  return workdir


def _expected_zero_std_fractions(steps: int) -> list[float]:
  """Per step, the fraction of the batch's prompts starting with an even digit.

  The batches are the loop's: the pipeline shuffles positions by seed and length only.
  """
  prompts = [r["prompt"] for r in toy.ArithmeticTask().sft_records(16, seed=0)]
  it = iter(pipeline.make_dataset([{"i": np.int64(i)} for i in range(16)], seed=0,
                                  batch_size=8))
  return [float(np.mean([prompts[i][0] in "02468" for i in next(it)["i"]]))
          for _ in range(steps)]


def test_online_grao_trains_with_finite_metrics_and_zero_variance_groups(grao_run):
  rows = read_metrics(grao_run)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    for key in GRAO_METRICS:
      assert np.isfinite(r[key]), (key, r)
  # Samples come from the policy: lengths are those of real completions (1..4 tokens).
  assert all(1.0 <= r["completion_length/mean"] <= 4.0 for r in rows)
  assert any(r["loss/exploration"] != 0 for r in rows)
  # Exactly the constant-reward groups are detected as zero-variance (and stay finite).
  expected = _expected_zero_std_fractions(4)
  assert [r["frac_zero_std_groups"] for r in rows] == expected
  assert any(0 < f < 1 for f in expected)


def test_online_grao_resumes_bit_identically(grao_run, tmp_path):
  cfg = online_config()
  first = _train(cfg, str(tmp_path), stop_after=2)
  assert first.final_step == 2
  _train(cfg, str(tmp_path))
  straight, resumed = read_metrics(grao_run), read_metrics(tmp_path)
  for key in ("loss", "reward/mean", "completion_length/mean", "grad_norm"):
    np.testing.assert_array_equal([r[key] for r in resumed], [r[key] for r in straight], key)
  for a, b in zip(_params(grao_run, cfg), _params(tmp_path, cfg)):
    np.testing.assert_array_equal(a, b)


def test_d2o_samples_at_step_0_and_again_every_n_steps(tmp_path):
  cfg = online_config("d2o", **{"online.regenerate_every": 2,
                                "data.train_path": "toy:negatives?n=16&k=1"})
  _train(cfg, str(tmp_path))
  rows = read_metrics(tmp_path)
  # The table is (re)sampled before steps 0 and 2 (logged as steps 1 and 3), not between.
  assert {r["step"]: r["rollout/sampled_at"] for r in rows
          if "rollout/sampled_at" in r} == {1: 0.0, 3: 2.0}
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["rewards/margins"]) for r in rows)
  assert sorted(os.listdir(tmp_path / "online")) == ["d2o_samples_0.npz", "d2o_samples_2.npz"]
  a, b = (np.load(tmp_path / "online" / f) for f in ("d2o_samples_0.npz", "d2o_samples_2.npz"))
  assert a["tokens"].shape == b["tokens"].shape == (16, 3, 4)
  assert not np.array_equal(a["tokens"], b["tokens"])  # new samples from the new policy


def test_d2o_sample_schedule():
  static = online_lib.OnlineSource.from_config(online_config("d2o"))
  every3 = online_lib.OnlineSource.from_config(
      online_config("d2o", **{"online.regenerate_every": 3}))
  steps = range(8)
  assert [online_lib._D2oExpand(static, None, _Tok(), "", []).sample_step(s)
          for s in steps] == [0] * 8
  assert [online_lib._D2oExpand(every3, None, _Tok(), "", []).sample_step(s)
          for s in steps] == [0, 0, 0, 3, 3, 3, 6, 6]


class _Tok:
  eos_token_id, pad_token_id = 2, 0


@pytest.mark.parametrize("overrides,key", [
    ({"reference.mode": "precompute"}, "config.reference.mode"),
    ({"sampling.max_new_tokens": 8}, "config.sampling.max_new_tokens"),
    ({"online.samples_per_prompt": 0}, "config.online.samples_per_prompt"),
])
def test_bad_online_configs_name_the_key(overrides, key):
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(online_config("d2o", **overrides), 1)


def test_resume_refuses_a_changed_reward_or_sampling():
  saved = online_config().to_dict()
  resume.check_resume_config(saved, online_config(), where="here")
  for key, value in (("reward.name", "exact_match"), ("sampling.temperature", 0.5)):
    with pytest.raises(errors.ResumeMismatchError, match=key.replace(".", r"\.")):
      resume.check_resume_config(saved, online_config(**{key: value}), where="here")
  with pytest.raises(errors.ResumeMismatchError, match="online.samples_per_prompt 3 -> 5"):
    resume.check_resume_config(saved, online_config(**{"online.samples_per_prompt": 5}),
                             where="here")
  # Checkpoints written before these sections existed still resume.
  old = {k: v for k, v in saved.items() if k not in ("reward", "online", "sampling")}
  resume.check_resume_config(old, online_config("grao", **{"online.enabled": False}),
                           where="here")


def test_grao_data_without_a_reference_names_the_row(tmp_path):
  path = tmp_path / "prompts.jsonl"
  path.write_text('{"prompt": "1+1=", "reference": "2"}\n{"prompt": "2+2="}\n')
  cfg = online_config(**{"data.train_path": str(path)})
  from jaxalign.data.formats import DataError
  with pytest.raises(DataError, match=r"prompts\.jsonl:2: .*reference: missing field"):
    _train(cfg, str(tmp_path / "run"))


def _steps(run_dir):
  return [r["step"] for r in read_metrics(run_dir)]


def test_iterative_rounds_checkpoint_and_resume_at_the_right_round(grao_run, tmp_path):
  cfg = tiny_config(**{"mesh.shape": (1, 1, 1), "data.train_path": "toy:sft?n=32&seed=1",
                       "init_from": str(grao_run), "checkpoint.every": 1,
                       "reference.mode": "frozen"})  # no separate reference pass to compile
  cfg.iterative.update(dict(rounds=2, samples_per_prompt=3, steps_per_round=2))
  cfg.sampling.max_new_tokens = 4
  cfg.reward.name = "tests.rewards.test_rewards:length_reward"
  first = _train(cfg, str(tmp_path), stop_after=2)   # round 0 only
  assert first.final_step == 2
  assert _steps(tmp_path / "round_0") == [1, 2] and not (tmp_path / "round_1").exists()

  last = _train(cfg, str(tmp_path))
  assert last.final_step == 2
  # Round 0 was not run again; round 1 sampled from its policy and trained from it.
  assert _steps(tmp_path / "round_0") == [1, 2] and _steps(tmp_path / "round_1") == [1, 2]
  assert [json.loads(line)["round"] for line in open(tmp_path / "rounds.jsonl")] == [0, 1]
  pairs = [json.loads(line) for line in open(tmp_path / "round_1" / "pairs.jsonl")]
  assert pairs and all(p["reward_chosen"] > p["reward_rejected"] for p in pairs)
  assert all(len(p["chosen"]) > len(p["rejected"]) for p in pairs)  # the length reward
  assert rundir.resolved_config(str(tmp_path / "round_1"))["init_from"] == str(
      tmp_path / "round_0")
  assert _train(cfg, str(tmp_path)).final_step == 2   # all done: nothing runs again
  assert _steps(tmp_path / "round_1") == [1, 2]
  assert len(open(tmp_path / "rounds.jsonl").readlines()) == 2


def test_generate_candidates_writes_aft_training_data(grao_run, tmp_path):
  from jaxalign import cli
  from jaxalign.data import toy

  problems = toy.ArithmeticTask().problems(16, seed=4)
  questions = tmp_path / "questions.jsonl"
  questions.write_text("".join(json.dumps({"prompt": p.prompt, "reference": p.answer}) + "\n"
                               for p in problems))
  out = tmp_path / "aft.jsonl"
  assert cli.main(["generate-candidates", f"--checkpoint={grao_run}",
                   f"--questions={questions}", "--k=3", f"--out={out}",
                   "--max-new-tokens=4", "--reward=exact_match"]) == 0
  records = [json.loads(line) for line in open(out)]
  assert len(records) >= 8
  # The same samples as `jaxalign generate` with the same seed, then labelled.
  sampled = tmp_path / "generated.jsonl"
  assert cli.main(["generate", f"--checkpoint={grao_run}", f"--prompts={questions}", "--n=3",
                   f"--out={sampled}", "--max-new-tokens=4"]) == 0
  generated = {r["prompt"]: [c for c in r["completions"] if c.strip()]
               for r in map(json.loads, open(sampled))}
  assert all(generated[r["prompt"]] == r["completions"] for r in records)
  for r in records:
    assert 1 <= len(r["completions"]) == len(r["labels"]) <= 3
    assert r["labels"] == [rewards.verifiable.exact_match(r["prompt"], c, r["reference"]) > 0
                           for c in r["completions"]]
  # The aft reader takes it as it is, and training on it runs.
  cfg = tiny_config(**{"mesh.shape": (1, 1, 1), "data.train_path": str(out),
                       "data.group_size": 3, "total_steps": 2})
  cfg.loss.name = "aft"
  cfg.loss.hparams = ml_collections.ConfigDict()
  result = _train(cfg, str(tmp_path / "aft"))
  assert result.final_step == 2 and np.isfinite(result.last_metrics["loss"])
  assert json.loads((tmp_path / "aft" / "data_stats.json").read_text())["skipped"] == 0
