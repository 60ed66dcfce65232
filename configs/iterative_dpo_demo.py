"""Iterative DPO on the bundled arithmetic task: rounds of sampling 4 answers per prompt from the current policy, best vs worst by the task's checker, DPO from that policy.

  jaxalign demo --workdir runs/demo --method iterative_dpo
      # SFT (reused if runs/demo/sft exists), the rounds, and held-out greedy
      # accuracy before and after (of the last round's policy).
  jaxalign train --config configs/iterative_dpo_demo.py:runs/demo --workdir runs/it_dpo
      # the rounds alone, from the SFT model in runs/demo/sft; round R trains in
      # runs/it_dpo/round_R (its pairs in pairs.jsonl), statistics in rounds.jsonl.

The recipe (rounds, samples per prompt, steps per round, beta) is
jaxalign.workflows.demo.METHODS["iterative_dpo"].
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.aligned_config("iterative_dpo", data_dir=f"{arg}/data", sft_dir=f"{arg}/sft")
