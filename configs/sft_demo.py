"""The demo's SFT stage: a tiny model from scratch on the task's demonstrations.

  jaxalign demo --workdir runs/demo       # writes runs/demo/data/sft.jsonl, trains, evaluates
  jaxalign train --config configs/sft_demo.py:runs/demo --workdir runs/sft
"""

from jaxalign.workflows import demo


def get_config(arg: str = "runs/demo"):
  return demo.sft_config(data_dir=f"{arg}/data")
