"""COFS-DPO over two domains of the bundled task: addition, then subtraction.

  jaxalign demo --method continual --workdir runs/continual
      # SFT on both operations, per-domain on-policy pairs, then sequential
      # LoRA-DPO, sequential OFS-DPO and COFS-DPO, and the forgetting matrix.
  jaxalign train --config configs/cofs_dpo_demo.py:runs/continual --workdir runs/cofs
      # the COFS-DPO run alone, on the SFT model and data that the demo wrote:
      # OFS-DPO on domain 1 then domain 2 (runs/cofs/stage_{0,1}), each domain's
      # fast module stored in runs/cofs/modules/, and the combination weights
      # searched on the held-out validation pairs (runs/cofs/cofs.json).

The recipe is jaxalign.workflows.demo_continual.continual_config("cofs_dpo").
"""

from jaxalign.workflows import demo_continual


def get_config(arg: str = "runs/continual"):
  return demo_continual.continual_config("cofs_dpo", arg)
