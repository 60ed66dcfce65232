"""A reward model: the decoder transformer with a scalar head on its last real token.

  model = RewardModel(model_cfg, rngs=nnx.Rngs(0))
  values = model(tokens, attention_mask)            # [B] float32
  save_reward_model(model, "rm/"); load_reward_model("rm/")

A loss with a scalar head (`has_scalar_head`: the Bradley-Terry loss of
`config.loss.name = "reward_model"`) trains this model in place of the LM, in the
one train loop: the builder makes it, the step's forward yields its scores
(`sequence_scores`, [B, S]) where a policy loss gets log-probs.

A sequence is scored at its last real token (the final 1 of `attention_mask`,
so left and right padding both work): r = <h_last, w> + b. As a reward
function (`config.reward.name = "reward_model"`, options `path`, `batch_size`,
`max_length`) it tokenizes prompt + completion exactly as training does
(bos + prompt, then the completion and eos), pads each batch to fixed shapes
(one compile) and scores it on device.
"""

import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxalign.data import tokenize
from jaxalign.models import transformer

CONFIG_FILE = "model_config.json"
STATE_DIR = "state"


def has_scalar_head(spec) -> bool:
  """Whether the loss `spec` (a losses.LossSpec) trains a RewardModel rather than the LM.

  The one test of it: the builder, the step, the loop and validation all ask here.
  """
  return spec.head == "scalar"


class RewardModel(nnx.Module):
  """Transformer backbone + linear scalar head [D] -> []."""

  def __init__(self, config: transformer.ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.backbone = transformer.Transformer(config, rngs=rngs)
    d = config.d_model
    init = jax.nn.initializers.normal(d ** -0.5)
    has_mesh = not jax.sharding.get_abstract_mesh().empty
    self.head = nnx.Param(init(rngs.params(), (d,), jnp.float32), out_sharding=("embed",),
                          eager_sharding=has_mesh)
    self.bias = nnx.Param(jnp.zeros((), jnp.float32))

  def __call__(self, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """tokens, attention_mask [B, T] -> rewards [B] float32 (0 for an all-padding row)."""
    hidden = self.backbone(tokens, attention_mask)                      # [B, T, D]
    mask = attention_mask.astype(bool)
    t = mask.shape[-1]
    # Index of the last real token: T-1 minus the first 1 seen from the right.
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=-1)                   # [B]
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    values = h.astype(jnp.float32) @ self.head[...] + self.bias[...]
    return jnp.where(mask.any(-1), values, 0.0)


def sequence_scores(model: RewardModel, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(scores, counts) [B, S] of a padded [B, S, T] batch, all B*S rows in one forward.

  scores: each sequence's reward (for a pair: chosen, rejected); counts: its real
  tokens. They stand where a policy loss gets summed log-probs and scored tokens.
  """
  b, s, t = batch["tokens"].shape
  mask = batch["attention_mask"]
  values = model(batch["tokens"].reshape(b * s, t), mask.reshape(b * s, t))
  return values.reshape(b, s), mask.sum(-1)


def save_reward_model(model: RewardModel, directory: str) -> None:
  """Writes the model's config (JSON) and its variables (Orbax, no pickle)."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(model.config.to_dict(), f, indent=2, sort_keys=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, STATE_DIR), nnx.state(model), force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()


def load_reward_model(directory: str) -> RewardModel:
  """The RewardModel saved by `save_reward_model` in `directory`."""
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"reward model: no {CONFIG_FILE} in {directory}")
  with open(config_path) as f:
    config = transformer.ModelConfig.from_dict(json.load(f))
  abstract = nnx.eval_shape(lambda: RewardModel(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  checkpointer = ocp.StandardCheckpointer()
  state = checkpointer.restore(os.path.join(directory, STATE_DIR), abstract_state)
  checkpointer.close()
  return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(state, tokens, attention_mask, *, graphdef):
  return nnx.merge(graphdef, state)(tokens, attention_mask)


def encode_pairs(tokenizer, prompts: Sequence, completions: Sequence[str], *,
                 max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, attention_mask) int32 [N, max_length], right-padded.

  Each row is the prompt as training renders it (bos + text, or the chat
  template), the completion and eos; longer rows keep their last tokens.
  """
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
  tokens = np.full((len(prompts), max_length), pad, np.int32)
  mask = np.zeros((len(prompts), max_length), np.int32)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    ids = (tokenize.prompt_ids(tokenizer, p)  # the training rendering
           + tokenize.encode_text(tokenizer, c) + eos)[-max_length:]
    tokens[i, :len(ids)] = ids
    mask[i, :len(ids)] = 1
  return tokens, mask


def reward_model_fn(tokenizer=None, *, path: str, batch_size: int = 64,
                    max_length: int = 64):
  """A batched reward function scoring (prompt, completion) with the model at `path`.

  Args:
    tokenizer: the run's tokenizer (required).
    path: a directory written by `save_reward_model`.
    batch_size: rows per device call; the last batch is padded to this size.
    max_length: tokens per row (prompt + completion + eos; longer keep the end).
  """
  if tokenizer is None:
    raise ValueError("the reward_model reward needs the run's tokenizer")
  model = load_reward_model(path)
  graphdef, state = nnx.split(model)

  def fn(prompts, completions, references):
    del references
    tokens, mask = encode_pairs(tokenizer, prompts, completions, max_length=max_length)
    n = len(tokens)
    out = np.zeros((n,), np.float32)
    for start in range(0, n, batch_size):
      rows = min(batch_size, n - start)
      tb = np.zeros((batch_size, max_length), np.int32)
      mb = np.zeros((batch_size, max_length), np.int32)
      tb[:rows], mb[:rows] = tokens[start:start + rows], mask[start:start + rows]
      out[start:start + rows] = np.asarray(_score(state, tb, mb, graphdef=graphdef))[:rows]
    return out

  return fn
