"""Online GRAO on the bundled arithmetic task scored by a learned reward model instead of the
checker.

  jaxalign demo --workdir runs/demo --method grao_rm
      # SFT (reused if runs/demo/sft exists), the reward model of
      # configs/reward_model_demo.py in runs/demo/reward_model (reused if there),
      # online GRAO scored by it, and held-out greedy accuracy before and after.
  jaxalign train --config configs/grao_rm_demo.py:runs/demo --workdir runs/grao_rm
      # the GRAO stage alone, from the SFT model in runs/demo/sft, scored by the
      # reward model in runs/demo/reward_model.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("prompts")


def get_config(arg: str = "runs/demo", seed: int = 0):
  # run_demo first trains the reward model (demo.REWARD_MODEL, Bradley-Terry on
  # the SFT model's answers) in WORKDIR/reward_model; the checker only measures
  # held-out accuracy.
  c = demo.stage_config("grao_rm", arg, seed, loss="grao", hparams=dict(beta=0.5, lam=0.6))
  demo.sampled_prompts(c, seed, reward="reward_model", reward_options=dict(
      max_length=16, path=demo.reward_model_path(arg)))
  c.online.enabled = True
  c.online.samples_per_prompt = 8
  c.data.batch_size = 32
  c.total_steps = 100
  # lr 1e-4 (the checker GRAO's) exploits the reward model's errors (it ranks
  # 66.6% of held-out pairs right): 51.8% -> 7.2% with reward/mean above the
  # reference answers'; 2e-5: 51.8% -> 66.4%.
  c.optim.lr = 2e-5
  return c
