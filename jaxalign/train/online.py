"""Online GRAO and D²O: the train loop's batches hold completions sampled from the policy.

The data file holds prompts and the one response the dataset gives per prompt
(the "head" sequence): GRAO's reference answer y ({prompt, reference}, or
{prompt, completion}) or D²O's human negative ({prompt, rejected}). The loop
reads them as sft-format examples; before each step `OnlineSource`'s expand
function turns a batch of them into the group batch the registered loss
already consumes (the `groups` / `negatives` layout of `jaxalign.data.tokenize`):

  tokens, attention_mask, loss_mask [B, 1 + G, T]   sequence 0: the head,
                                                    1..G: sampled completions
  group_mask [B, G]; GRAO also rewards [B, G] (and answer_rewards [B] with
  loss.hparams.reference_reward="judge")

and the one jitted train step runs on it unchanged.

* GRAO samples G completions per prompt at every step from the live policy
  (the TrainState's params, on the mesh) and scores them with the configured
  reward (host side, batched): R(o_i, y) = reward(prompt, o_i, y). With
  reference_reward="zero" the answer's reward is R(y, y) = 0 (docs/losses.md, `grao`).
* D²O draws K samples per prompt for the whole data set at step 0 from the
  initial policy (the reference: the run starts from it), or, with
  online.regenerate_every = N, again from the current policy at every step
  that is a multiple of N. The sample table is kept beside the checkpoints
  (DIR/online/d2o_samples_STEP.npz) so a resumed run continues with the same
  samples.

Randomness: the rollout keys derive from the TrainState's `rng` (checkpointed)
and the step, fold_in(fold_in(rng, stream), step): a resumed run samples what
the uninterrupted run would have.
"""

import dataclasses
import logging
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from jaxalign import config as config_lib
from jaxalign import losses, rewards
from jaxalign.train import rollout

log = logging.getLogger("jaxalign")

GRAO_STREAM, D2O_STREAM = 1, 2

# Record field that holds each method's head sequence (first one present wins).
HEAD_FIELDS = {"grao": ("reference", "completion"), "d2o": ("rejected",)}


def rollout_key(rng: jax.Array, stream: int, step: int) -> jax.Array:
  """The sampling key of `step`, from the checkpointed TrainState.rng."""
  return jax.random.fold_in(jax.random.fold_in(rng, stream), step)


@dataclasses.dataclass
class OnlineSource:
  """What the train loop needs to run an online method (see the module docstring).

  Attributes:
    method: "grao" or "d2o": the loss's online scheme (LossSpec.online).
    samples_per_prompt: G / K.
    regenerate_every: D²O: 0 samples once at step 0, N every N steps.
    sampling: config.sampling as a plain dict.
    reward_name, reward_options: the reward (GRAO).
    judge_answer: GRAO reference_reward="judge": also score y against itself.
    max_length, max_prompt_length: T and P of the data.
  """
  method: str
  samples_per_prompt: int
  regenerate_every: int
  sampling: dict
  reward_name: str
  reward_options: dict
  judge_answer: bool
  max_length: int
  max_prompt_length: int
  data_format: str = "sft"

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> "OnlineSource":
    return cls(
        method=losses.get(c.loss.name).online, samples_per_prompt=int(c.online.samples_per_prompt),
        regenerate_every=int(c.online.regenerate_every), sampling=c.sampling.to_dict(),
        reward_name=c.reward.name, reward_options=c.reward.options.to_dict(),
        judge_answer=c.loss.hparams.to_dict().get("reference_reward") == "judge",
        max_length=int(c.data.max_length), max_prompt_length=int(c.data.max_prompt_length))

  def map_record(self, record: dict) -> dict:
    """A data record -> an sft record {prompt, completion: the head response}."""
    fields = HEAD_FIELDS[self.method]
    head = next((f for f in fields if f in record), None)
    if head is None:
      want = " or ".join(fields)
      return {**record, "_invalid": f"{fields[0]}: missing field (online {self.method} "
              f"reads {{prompt, {want}}})"}
    return {"prompt": record.get("prompt"), "completion": record[head],
            **{k: record[k] for k in ("source_file", "row") if k in record}}

  def bind(self, *, graphdef, tokenizer, workdir: str, examples: Sequence[dict]):
    """The loop's expand function: (state, host_batch, step) -> (batch, host metrics)."""
    if self.method == "grao":
      return _GraoExpand(self, graphdef, tokenizer)
    return _D2oExpand(self, graphdef, tokenizer, workdir, examples)


def _head(host_batch: dict) -> dict[str, np.ndarray]:
  """Sequence 0 of an sft batch: [B, T] tokens and masks."""
  return {k: np.asarray(host_batch[k])[:, 0] for k in ("tokens", "attention_mask", "loss_mask")}


def _group_batch(head: dict, seqs: tuple[np.ndarray, ...], **columns) -> dict:
  """Head [B, T] + samples [B, G, T] -> the [B, 1 + G, T] group batch with its columns."""
  batch = {k: np.concatenate([head[k][:, None], s], axis=1)
           for k, s in zip(("tokens", "attention_mask", "loss_mask"), seqs)}
  g = seqs[0].shape[1]
  batch["group_mask"] = np.ones((len(head["tokens"]), g), np.int32)
  batch.update(columns)
  return batch


def _head_texts(tokenizer, head: dict, prompt_ids) -> tuple[list[str], list[str]]:
  """Prompt and head-response texts, decoded from the tokens (special tokens dropped)."""
  prompts = [tokenizer.decode(list(map(int, p)), skip_special_tokens=True) for p in prompt_ids]
  answers = [tokenizer.decode(list(map(int, row[m.astype(bool)])), skip_special_tokens=True)
             for row, m in zip(head["tokens"], head["loss_mask"])]
  return prompts, answers


class _GraoExpand:
  """Samples G completions per prompt each step, scores them, builds the group batch."""

  def __init__(self, source: OnlineSource, graphdef, tokenizer):
    self.src, self.graphdef, self.tokenizer = source, graphdef, tokenizer
    self.sp = rollout.sampling_params(source.sampling, n=source.samples_per_prompt,
                                      eos_id=tokenizer.eos_token_id)
    self.reward = rewards.get(source.reward_name, tokenizer=tokenizer, **source.reward_options)
    self.pad_id = tokenizer.pad_token_id or 0

  def __call__(self, state, host_batch, step: int):
    start = time.perf_counter()
    g = self.src.samples_per_prompt
    head = _head(host_batch)
    prompts, prompt_mask, prompt_ids = rollout.example_prompts(
        head["tokens"], head["attention_mask"], head["loss_mask"], self.src.max_prompt_length)
    completions, lengths = rollout.sample(
        self.graphdef, state.params, state.frozen, prompts, prompt_mask,
        rollout_key(state.rng, GRAO_STREAM, step), self.sp)
    seqs = rollout.response_sequences(prompt_ids, completions, lengths, n=g,
                                      max_length=self.src.max_length, pad_id=self.pad_id)
    prompt_texts, answers = _head_texts(self.tokenizer, head, prompt_ids)
    texts = rollout.decode(self.tokenizer, completions, lengths)
    scores = rewards.score(self.reward, np.repeat(prompt_texts, g).tolist(), texts,
                           np.repeat(answers, g).tolist()).reshape(-1, g)     # [B, G]
    columns = {"rewards": scores}
    if self.src.judge_answer:
      columns["answer_rewards"] = rewards.score(self.reward, prompt_texts, answers, answers)
    stopped = _stopped(completions, lengths, self.sp)
    return _group_batch(head, seqs, **columns), {
        "rollout/seconds": time.perf_counter() - start,
        "rollout/stopped_frac": float(stopped.mean()),
    }


def _stopped(completions: np.ndarray, lengths: np.ndarray, sp) -> np.ndarray:
  """[N] whether each completion ended with a stop token (else it hit max_new_tokens)."""
  last = completions[np.arange(len(lengths)), np.maximum(lengths - 1, 0)]
  return (lengths > 0) & np.isin(last, np.asarray(sp.stop_tokens, np.int32))


class _D2oExpand:
  """D²O's K self-samples per prompt: a table over the data set, (re)sampled on schedule."""

  def __init__(self, source: OnlineSource, graphdef, tokenizer, workdir: str,
               examples: Sequence[dict]):
    self.src, self.graphdef, self.tokenizer = source, graphdef, tokenizer
    self.sp = rollout.sampling_params(source.sampling, n=source.samples_per_prompt,
                                      eos_id=tokenizer.eos_token_id)
    self.pad_id = tokenizer.pad_token_id or 0
    self.examples = examples
    self.dir = os.path.join(workdir, "online")
    self.table_step: int | None = None
    self.tokens = self.lengths = None    # [N, K, M], [N, K]

  def sample_step(self, step: int) -> int:
    """The step whose samples a batch at `step` uses."""
    every = self.src.regenerate_every
    return 0 if every == 0 else (step // every) * every

  def path(self, step: int) -> str:
    return os.path.join(self.dir, f"d2o_samples_{step}.npz")

  def _sample_table(self, state, step: int) -> None:
    """Samples K completions for every prompt of the data set from the policy."""
    # Step 0 samples the reference (the initial policy); later steps the current one.
    params = state.ref_params if step == 0 and state.ref_params is not None else state.params
    key = rollout_key(state.rng, D2O_STREAM, step)
    # One pass over the examples (a lazy source tokenizes each row once).
    heads = {k: [] for k in ("tokens", "attention_mask", "loss_mask")}
    for ex in self.examples:
      for k, rows in heads.items():
        rows.append(np.asarray(ex[k])[0])
    heads = {k: np.stack(rows) for k, rows in heads.items()}
    prompts, mask, _ = rollout.example_prompts(heads["tokens"], heads["attention_mask"],
                                               heads["loss_mask"], self.src.max_prompt_length)
    n, k, m = len(prompts), self.src.samples_per_prompt, self.sp.max_new_tokens
    tokens = np.zeros((n, k, m), np.int32)
    lengths = np.zeros((n, k), np.int32)
    chunk = int(self.src.sampling["batch_size"])
    for c, lo in enumerate(range(0, n, chunk)):
      idx = np.minimum(np.arange(lo, lo + chunk), n - 1)  # fixed shape: one compile
      comp, lens = rollout.sample(self.graphdef, params, state.frozen, prompts[idx], mask[idx],
                                  jax.random.fold_in(key, c), self.sp, local=False)
      rows = min(chunk, n - lo)
      tokens[lo:lo + rows] = comp.reshape(chunk, k, m)[:rows]
      lengths[lo:lo + rows] = lens.reshape(chunk, k)[:rows]
    self.tokens, self.lengths, self.table_step = tokens, lengths, step
    if jax.process_index() == 0:
      os.makedirs(self.dir, exist_ok=True)
      tmp = self.path(step) + ".tmp.npz"
      np.savez(tmp, tokens=tokens, lengths=lengths)
      os.replace(tmp, self.path(step))

  def _load_table(self, step: int) -> bool:
    if not os.path.exists(self.path(step)):
      return False
    with np.load(self.path(step), allow_pickle=False) as f:
      tokens, lengths = f["tokens"], f["lengths"]
    if tokens.shape[:2] != (len(self.examples), self.src.samples_per_prompt):
      raise RuntimeError(f"{self.path(step)} holds samples of shape {tokens.shape[:2]}, the "
                         f"run needs ({len(self.examples)}, {self.src.samples_per_prompt})")
    self.tokens, self.lengths, self.table_step = tokens, lengths, step
    return True

  def _ensure_table(self, state, step: int) -> dict[str, float]:
    want = self.sample_step(step)
    if self.table_step == want:
      return {}
    start = time.perf_counter()
    if want == step:
      self._sample_table(state, step)
    elif not self._load_table(want):
      raise RuntimeError(f"resuming at step {step} needs the D2O samples drawn at step {want} "
                         f"({self.path(want)}), which are missing")
    return {"rollout/seconds": time.perf_counter() - start, "rollout/sampled_at": float(want)}

  def __call__(self, state, host_batch, step: int):
    host_metrics = self._ensure_table(state, step)
    head = _head(host_batch)
    _, _, prompt_ids = rollout.example_prompts(head["tokens"], head["attention_mask"],
                                               head["loss_mask"], self.src.max_prompt_length)
    # Grain numbers elements across epochs (epoch e of N examples: e*N + i).
    index = np.asarray(host_batch["index"]) % len(self.examples)
    k, m = self.src.samples_per_prompt, self.sp.max_new_tokens
    seqs = rollout.response_sequences(
        prompt_ids, self.tokens[index].reshape(-1, m), self.lengths[index].reshape(-1), n=k,
        max_length=self.src.max_length, pad_id=self.pad_id)
    return _group_batch(head, seqs), host_metrics


def source_for(spec: config_lib.RunSpec) -> Any:
  """The loop's OnlineSource for `spec` (its online flag), or None offline."""
  return OnlineSource.from_config(spec.config) if spec.online else None
