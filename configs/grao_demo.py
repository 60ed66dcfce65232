"""Online GRAO on the bundled arithmetic task: 8 completions per prompt sampled from the live policy at every step, scored by the task's checker against the reference answer.

  jaxalign demo --workdir runs/demo --method grao
      # SFT (reused if runs/demo/sft exists), online grao training, and held-out
      # greedy accuracy before and after.
  jaxalign train --config configs/grao_demo.py:runs/demo --workdir runs/grao
      # the grao stage alone, from the SFT model in runs/demo/sft; its prompts and
      # reference answers come from the bundled task (toy:sft, no annotator habit).

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model. The
offline form (groups sampled once before training) is configs/grao_offline_demo.py
(`jaxalign demo --method grao_offline`).
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("prompts")


def get_config(arg: str = "runs/demo", seed: int = 0):
  # 8 completions per prompt sampled from the live policy at every step; the
  # paper's ternary judge as exact match against the reference answer: a right
  # answer ties with it (0), a wrong one loses (-1).
  c = demo.stage_config("grao", arg, seed, loss="grao", hparams=dict(beta=0.5, lam=0.6))
  demo.sampled_prompts(c, seed, reward="arithmetic",
                       reward_options=dict(correct=0.0, wrong=-1.0))
  c.online.enabled = True
  c.online.samples_per_prompt = 8
  c.data.batch_size = 32
  c.total_steps = 100
  c.optim.lr = 1e-4   # measured: lr 3e-5 reaches 79%, 1e-4 89%
  return c
