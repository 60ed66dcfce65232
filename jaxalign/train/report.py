"""What a run tells its user: a summary of what is about to run, the first step's
compile, and what ran (also written as DIR/run_summary.json), as TRL's "Running
training" block and MaxText's config dump do.

The lines go to the `jaxalign` logger at INFO, process 0 only: the CLI shows them
(`jaxalign: ...`); a library caller sees them when it turns INFO on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import jax

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign import paths

log = logging.getLogger("jaxalign")

SUMMARY_FILE = "run_summary.json"


def _count(n: float) -> str:
  for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= size:
      return f"{n / size:.2f}{unit}"
  return str(int(n))


def layout(spec: config_lib.RunSpec) -> str:
  """padded, packed, shared prompt, or packed + shared prompt."""
  d = spec.data
  if d.packing and d.share_prompt:
    return "packed + shared prompt"
  return "packed" if d.packing else "shared prompt" if d.share_prompt else "padded"


def start_lines(spec: config_lib.RunSpec, built, *, examples: int, start: int, end: int,
                sequences_per_example: int) -> list[str]:
  """The start-of-run summary: model, parameters, mesh, data, steps, objective."""
  m, d = spec.config.model, spec.data
  total = spec.model_cfg.num_params()
  trainable = sum(int(math.prod(a.shape)) for a in jax.tree.leaves(built.abstract_state.params))
  source = f"{m.hf_path}" if m.hf_path else f"preset {m.preset}"
  lora = (f", LoRA rank {spec.lora_cfg.rank} on {','.join(spec.lora_cfg.targets)}"
          if spec.lora_cfg.enabled else "")
  cfg = spec.model_cfg
  devices = built.mesh.devices
  mesh = " ".join(f"{a}={s}" for a, s in zip(built.mesh.axis_names, devices.shape))
  tokens = d.batch_size * sequences_per_example * d.max_length
  reference = spec.config.reference.mode if spec.loss.needs_ref else "none (reference-free)"
  return [
      f"model: {source} ({cfg.n_layers} layers, d_model {cfg.d_model}, vocab "
      f"{cfg.vocab_size}), {_count(total)} parameters, {_count(trainable)} trainable{lora}",
      f"mesh: {mesh} over {devices.size} {devices.flat[0].platform} devices, "
      f"{jax.process_count()} process(es)",
      f"data: {examples} examples of {d.train_path}; batch {d.batch_size} examples x "
      f"{sequences_per_example} sequences, max_length {d.max_length} (at most {tokens} "
      f"tokens a step), {layout(spec)}",
      f"objective: loss {spec.loss_name}, reference {reference}; steps {start} -> {end} of "
      f"{spec.total_steps}" + (f" (resumed from step {start})" if start else ""),
  ]


@dataclasses.dataclass
class RunClock:
  """Times the run's phases and sums what the log steps saw, for the end summary."""
  started: float = dataclasses.field(default_factory=time.perf_counter)
  loop_started: float | None = None
  first_step_s: float | None = None
  losses: list = dataclasses.field(default_factory=list)
  real_tokens: int = 0

  def end_summary(self, spec: config_lib.RunSpec, *, start: int, final: int, last: dict,
                  stopped_by: str | None) -> dict:
    now = time.perf_counter()
    loop_s = now - (self.loop_started or now)
    steps = final - start
    evals = {k: v for k, v in last.items() if k.startswith("eval/")}
    return {
        "start_step": start, "final_step": final, "total_steps": spec.total_steps,
        "steps": steps, "runtime_s": now - self.started, "loop_s": loop_s,
        "first_step_s": self.first_step_s,
        "steps_per_sec": steps / loop_s if loop_s > 0 else None,
        "samples_per_sec": steps * spec.data.batch_size / loop_s if loop_s > 0 else None,
        "real_tokens_per_sec": self.real_tokens / loop_s if loop_s > 0 else None,
        "real_tokens": self.real_tokens,
        "train_loss_mean": (sum(self.losses) / len(self.losses)) if self.losses else None,
        "last_eval": evals or None, "stopped_by": stopped_by,
    }


def end_line(summary: dict) -> str:
  """One line of the end summary."""
  def rate(key):
    value = summary[key]
    return "n/a" if value is None else f"{value:.3g}"
  text = (f"ran steps {summary['start_step']}-{summary['final_step']} in "
          f"{summary['runtime_s']:.1f} s (loop {summary['loop_s']:.1f} s, first step with "
          f"compile {summary['first_step_s'] or 0:.1f} s): {rate('steps_per_sec')} steps/s, "
          f"{rate('samples_per_sec')} samples/s, {rate('real_tokens_per_sec')} real tokens/s")
  if summary["train_loss_mean"] is not None:
    text += f"; mean train loss {summary['train_loss_mean']:.4f}"
  for key, value in sorted((summary["last_eval"] or {}).items()):
    text += f"; {key} {value:.4g}"
  return text


def write_summary(workdir: str, summary: dict) -> None:
  if jax.process_index() == 0:
    ckpt.write_json(paths.join(workdir, SUMMARY_FILE), summary)
