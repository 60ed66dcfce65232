"""The two stages of `jaxalign demo`, as runnable recipes.

  jaxalign train --config configs/demo.py:sft --workdir runs/demo_sft \
      --config.data.train_path=runs/demo/data/sft.jsonl
  jaxalign train --config configs/demo.py:dpo --workdir runs/demo_dpo \
      --config.data.train_path=runs/demo/data/pairs.jsonl --config.init_from=runs/demo_sft

`jaxalign demo --workdir runs/demo` writes those data files and runs both.
"""

from jaxalign import demo


def get_config(arg: str = "dpo"):
  if arg == "sft":
    return demo.sft_config(data_dir="data")
  if arg == "dpo":
    return demo.dpo_config(data_dir="data", sft_dir="")
  raise ValueError(f"configs/demo.py takes 'sft' or 'dpo', got {arg!r}")
