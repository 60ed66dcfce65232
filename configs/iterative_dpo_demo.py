"""Iterative DPO on the bundled arithmetic task: rounds of sampling 4 answers per prompt from the current policy, best vs worst by the task's checker, DPO from that policy.

  jaxalign demo --workdir runs/demo --method iterative_dpo
      # SFT (reused if runs/demo/sft exists), the rounds, and held-out greedy
      # accuracy before and after (of the last round's policy).
  jaxalign train --config configs/iterative_dpo_demo.py:runs/demo --workdir runs/it_dpo
      # the rounds alone, from the SFT model in runs/demo/sft; round R trains in
      # runs/it_dpo/round_R (its pairs in pairs.jsonl), statistics in rounds.jsonl.

The recipe: demo.stage_config (what every demo stage shares: the SFT model as
init and precomputed reference, 150 steps at lr 1e-4) and the settings below;
RECORDS says how `jaxalign demo` builds the stage's data from the SFT model.
"""

from jaxalign.workflows import demo

RECORDS = demo.Records("prompts")


def get_config(arg: str = "runs/demo", seed: int = 0):
  # Rounds of sampling 4 answers per prompt from the current policy
  # (temperature 0.7), best vs worst by the task's checker, DPO with the
  # chosen answers' NLL (rpo_alpha, as iterative RPO, Pang et al. 2024) from
  # that policy. Plain DPO on such pairs (measured: 56% -> 40% -> 12% over
  # two rounds of 75 steps on 2000 prompts) lowers the chosen answers too and
  # breaks digits the pairs do not disagree on.
  c = demo.stage_config("iterative_dpo", arg, seed, loss="dpo",
                        hparams=dict(beta=0.1, rpo_alpha=1.0))
  demo.sampled_prompts(c, seed, reward="arithmetic", reward_options=dict(),
                       temperature=0.7)
  c.iterative.rounds = 2
  c.iterative.samples_per_prompt = 4
  c.iterative.steps_per_round = 50
  return c
