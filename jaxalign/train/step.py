"""The train step: a pure function of (state, batch), jit-compiled once.

A batch is a dict of arrays with a leading example axis B and a sequence axis
S (1 for SFT, 2 for pairs: chosen then rejected, G for groups):
  tokens, attention_mask, loss_mask: [B, S, T] int32
  ref_logps: [B, S] float32 (when reference log-probs are precomputed)
All S*B sequences go through one forward pass.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign import logprobs, losses
from jaxalign.data import packing, schema
from jaxalign.losses import columns as loss_columns
from jaxalign.models import lora, moe
from jaxalign.rewards import model as reward_model
from jaxalign.train import ref_sync as ref_sync_lib
from jaxalign.train.state import TrainState

# TRL's per-token metrics, by data format: name -> (column of losses.columns summed
# per sequence, the sequence it averages over, None: all). Each is a mean over the
# scored tokens of the whole global batch (token-weighted): the step carries the
# numerator and the count under TOKEN_SUM / TOKEN_COUNT + name through the
# micro-batches and divides once (token_metric_means).
TOKEN_METRICS = {
    # the logits' mean over the chosen (rejected) sequences' scored tokens and the vocabulary
    "pairwise": (("logits/chosen", "token_logit_means", 0),
                 ("logits/rejected", "token_logit_means", 1)),
    # the share of scored tokens whose argmax is the label; the softmax's mean entropy
    "sft": (("mean_token_accuracy", "token_top1", None),
            ("entropy", "token_entropies", None)),
}
TOKEN_SUM, TOKEN_COUNT = "_token_sum/", "_token_count/"


def batch_logps(graphdef, params, frozen, batch, *, chunk_size: int, dropout_key=None,
                batch_axes=None, columns: tuple[str, ...] = (), router: dict | None = None):
  """Per-sequence summed log-probs [B, S] and scored-token counts [B, S].

  A scalar-head model (rewards.model.RewardModel, a reward-model loss) gives its
  scores [B, S] and real-token counts in their place: the rest of the step is the same.

  `dropout_key`: the LoRA adapters' dropout key for this forward (None: none).
  batch_axes: mesh axes B is split over, kept on the log-prob chunks (logprobs.py).
  columns: names in losses.columns.COLUMNS; then a third value, {name: [B, S]}, is
    returned (padded, packed and shared-prompt batches alike).
  router: when a dict and the model has experts, filled with the router losses of
    this forward over the batch's real tokens (`router_terms`); a dense model
    leaves it empty.
  """
  model = nnx.merge(graphdef, params, frozen)
  if isinstance(model, reward_model.RewardModel):   # a scalar head: scores stand for log-probs
    if columns or packing.is_packed(batch) or packing.is_shared(batch):
      raise ValueError("a scalar-head model scores padded rows and computes no loss columns")
    return reward_model.sequence_scores(model, batch)
  if dropout_key is not None:
    lora.set_dropout_key(model, dropout_key)
  # None without columns: no per-token outputs, no extra vocabulary pass.
  token_outputs = loss_columns.token_request(columns)
  stats = None if router is None else {}
  sums, counts = _layout_logps(model, batch, chunk_size=chunk_size, batch_axes=batch_axes,
                               token_outputs=token_outputs, router_stats=stats)
  if stats:
    router.update(router_terms(stats, model.config))
  if not columns:
    return sums, counts
  return sums, counts, loss_columns.compute(columns, token_outputs, counts)


def router_terms(stats: dict, model_cfg) -> dict:
  """{"aux_loss", "router_z_loss": the router losses of pooled router statistics
  (models/moe.py), "penalty": what they add to the loss, router_aux_loss_coef * aux
  + router_z_loss_coef * z} (float32 scalars)."""
  aux, z = moe.router_losses(stats)
  return {"aux_loss": aux, "router_z_loss": z,
          "penalty": model_cfg.router_aux_loss_coef * aux + model_cfg.router_z_loss_coef * z}


def _layout_logps(model, batch, *, chunk_size, batch_axes, token_outputs, router_stats=None):
  """[B, S] log-probs and counts of a padded, shared-prompt or packed batch; fills
  `token_outputs` (a dict, or None) in losses.columns' flat form and `router_stats`
  (a dict, or None) with a mixture-of-experts model's router statistics."""
  if packing.is_packed(batch):
    return _packed_batch_logps(model, batch, chunk_size=chunk_size, batch_axes=batch_axes,
                               token_outputs=token_outputs, router_stats=router_stats)
  if packing.is_shared(batch):   # data.share_prompt
    return logprobs.shared_prompt_logps(
        model, batch["shared_prompt"], batch["shared_prompt_mask"], batch["shared_response"],
        batch["shared_response_mask"], batch["shared_response_loss"], chunk_size=chunk_size,
        batch_axes=batch_axes, token_outputs=token_outputs, router_stats=router_stats)
  b, s, t = batch["tokens"].shape
  flat = lambda x: x.reshape(b * s, t)  # one forward over all B*S rows
  sums, counts = logprobs.sequence_logps(
      model, flat(batch["tokens"]), flat(batch["attention_mask"]), flat(batch["loss_mask"]),
      chunk_size=chunk_size, batch_axes=batch_axes, token_outputs=token_outputs,
      router_stats=router_stats)
  return sums.reshape(b, s), counts.reshape(b, s)


# --- packed batches (data.packing; layout in jaxalign/data/packing.py) -------------
def _packed_batch_logps(model, batch, *, chunk_size, batch_axes, token_outputs=None,
                        router_stats=None):
  """[B, S] log-probs and counts of a packed batch: its G groups' slots, in example order."""
  b, s = batch["packed_lengths"].shape
  g = batch["packed_tokens"].shape[0]
  # data.share_prompt too: units of one prompt and its responses (packing.pack_shared_batch).
  shared = {k[len("packed_"):]: batch[k] for k in packing.PACKED_SHARED_KEYS if k in batch}
  sums, counts = logprobs.packed_sequence_logps(
      model, batch["packed_tokens"], batch["packed_attention_mask"], batch["packed_loss_mask"],
      batch["packed_segment_ids"], batch["packed_positions"], batch["packed_slot"],
      (b // g) * s, chunk_size=chunk_size, batch_axes=batch_axes, token_outputs=token_outputs,
      router_stats=router_stats, **shared)  # [G, B_g * S]
  return sums.reshape(b, s), counts.reshape(b, s)


def real_tokens(batch) -> jax.Array:
  """Real (non-padding) tokens of a padded, packed or shared-prompt batch (a shared
  prompt counted once per sequence, as in the padded layout)."""
  if packing.is_shared(batch):
    return batch["shared_lengths"].sum().astype(jnp.float32)
  if packing.is_packed_shared(batch):
    return batch["packed_lengths"].sum().astype(jnp.float32)
  key = "packed_attention_mask" if packing.is_packed(batch) else "attention_mask"
  return batch[key].sum().astype(jnp.float32)
# ------------------------------------------------------------------------------


def _policy_logps(graphdef, params, frozen, batch, *, chunk_size, modules, dropout_key,
                  batch_axes=None, columns=(), router: dict | None = None):
  """[B, S] log-probs and counts; with `modules`, each module's [B, S] side by side.

  With `columns` (single policy only) a third value holds them, as batch_logps.
  router: filled as batch_logps' (with modules: each term's mean over their forwards).
  """
  if not modules:
    return batch_logps(graphdef, params, frozen, batch, chunk_size=chunk_size,
                       dropout_key=dropout_key, batch_axes=batch_axes, columns=columns,
                       router=router)
  if columns:
    raise ValueError("per-sequence loss columns are not supported with LoRA modules")
  routers = [None if router is None else {} for _ in modules]
  outs = [batch_logps(graphdef, params[m], frozen, batch, chunk_size=chunk_size,
                      dropout_key=None if dropout_key is None
                      else jax.random.fold_in(dropout_key, i), batch_axes=batch_axes,
                      router=routers[i])
          for i, m in enumerate(modules)]
  if router is not None and routers[0]:
    router.update({k: sum(r[k] for r in routers) / len(routers) for k in routers[0]})
  return jnp.concatenate([o[0] for o in outs], axis=1), outs[0][1]


def _objective_of(frozen, ref_params, loss_state, batch, dropout_key=None, *, graphdef,
                  loss_call: Callable, chunk_size: int, ref_graphdef=None,
                  modules: tuple[str, ...] = (), batch_axes=None):
  """params -> (loss, (metrics, new loss state)) on `batch`; the reference is fixed.

  No reference forward runs unless there is a reference (ref_params, the LoRA
  base graph, or a precomputed column): a reference-free loss gets ref_logps None.
  """
  columns = tuple(getattr(loss_call, "columns", ()))
  # The policy's per-token metrics ride on its log-prob scan (not with LoRA modules).
  token_metrics = () if modules else tuple(getattr(loss_call, "token_metrics", ()))
  policy_columns = columns + tuple(dict.fromkeys(
      c for _, c, _ in token_metrics if c not in columns))
  ref_columns = None

  def ref_forward(gd, p, f):
    out = batch_logps(gd, p, f, batch, chunk_size=chunk_size, batch_axes=batch_axes,
                      columns=columns)
    return jax.lax.stop_gradient(out[0]), (jax.lax.stop_gradient(out[2]) if columns else None)

  if ref_params is not None:
    ref_logps, ref_columns = ref_forward(graphdef, ref_params, frozen)
  elif ref_graphdef is not None:
    # LoRA: the reference is the base with adapters off -- the frozen weights alone.
    ref_logps, ref_columns = ref_forward(ref_graphdef, frozen, nnx.State({}))
  else:
    ref_logps = batch.get("ref_logps")
  # Columns that describe the sequences stay here; every other one goes to the loss.
  extra = {k: v for k, v in batch.items() if k not in schema.SEQUENCE_KEYS}

  def objective(p):
    router = {}   # a mixture-of-experts policy's router losses (the reference adds none)
    out = _policy_logps(graphdef, p, frozen, batch, chunk_size=chunk_size,
                        modules=modules, dropout_key=dropout_key,
                        batch_axes=batch_axes, columns=policy_columns, router=router)
    logps, counts = out[0], out[1]
    inputs = losses.LossInputs(logps=logps, ref_logps=ref_logps, lengths=counts, batch=extra,
                               columns={k: out[2][k] for k in columns},
                               ref_columns=ref_columns)
    loss, metrics, new_state = loss_call(inputs, loss_state)
    metrics = {**metrics, **_token_metric_sums(token_metrics, out, counts)}
    if router:   # TRL: loss += router_aux_loss_coef * aux_loss, logged as aux_loss
      loss = loss + router["penalty"]
      metrics = {**metrics, "aux_loss": router["aux_loss"],
                 "router_z_loss": router["router_z_loss"]}
    return loss, (metrics, new_state)

  return objective


def _token_metric_sums(token_metrics, out, counts) -> dict:
  """{TOKEN_SUM + name, TOKEN_COUNT + name: float32 []} of the policy's columns `out[2]`
  ([B, S] per-sequence sums) and counts [B, S] (the numerator and the scored tokens)."""
  sums = {}
  for name, column, seq in token_metrics:
    values, n = jax.lax.stop_gradient(out[2][column]), counts
    if seq is not None:
      values, n = values[:, seq], n[:, seq]
    sums[TOKEN_SUM + name] = values.sum()
    sums[TOKEN_COUNT + name] = n.sum().astype(jnp.float32)
  return sums


def token_metric_means(metrics: dict) -> dict:
  """`metrics` with each TOKEN_SUM / TOKEN_COUNT pair replaced by its mean (0 where the
  batch scores no token of the sequences it averages over)."""
  out = {k: v for k, v in metrics.items() if not k.startswith((TOKEN_SUM, TOKEN_COUNT))}
  for k in metrics:
    if k.startswith(TOKEN_SUM):
      name = k[len(TOKEN_SUM):]
      count = metrics[TOKEN_COUNT + name]
      out[name] = jnp.where(count > 0, metrics[k] / jnp.maximum(count, 1.0), 0.0)
  return out


def _micro_step(params, frozen, ref_params, loss_state, batch, dropout_key=None, *, graphdef,
                loss_call: Callable, chunk_size: int, ref_graphdef=None,
                modules: tuple[str, ...] = (), batch_axes=None):
  """Loss metrics, gradients and the loss's new running state for one micro-batch."""
  objective = _objective_of(frozen, ref_params, loss_state, batch, dropout_key,
                            graphdef=graphdef, loss_call=loss_call, chunk_size=chunk_size,
                            ref_graphdef=ref_graphdef, modules=modules, batch_axes=batch_axes)
  (loss, (metrics, new_state)), grads = jax.value_and_grad(objective, has_aux=True)(params)
  metrics = {**metrics, "loss": loss,
             "tokens/real": real_tokens(batch)}
  return metrics, grads, new_state


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef, tx,
               schedule: optax.Schedule, loss_call: Callable, chunk_size: int,
               accum_steps: int = 1, skip_nonfinite: bool = False, ref_graphdef=None,
               modules: tuple[str, ...] = (), module_lr_scales: dict | None = None,
               lora_dropout: bool = False, batch_axes=None,
               ref_sync: tuple[int, float] | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update from a global batch (split into `accum_steps` micro-batches).

  Micro-batches hold equal numbers of examples, so the mean of their per-example
  means is the full-batch mean: accumulation does not bias losses or metrics.
  A loss's running state is threaded through the micro-batches in order.

  LoRA: `ref_graphdef` (the base graph) computes the reference from the frozen
  base alone; `modules` names the adapters of a multi-module loss (params
  {name: adapters}, one forward each), `module_lr_scales` their learning rate
  relative to `schedule` (metrics lr/<name>); `lora_dropout` draws the
  adapters' dropout masks from fold_in(state.rng, step[, micro-batch]).
  `ref_sync` = (every, alpha): TR-DPO, state.ref_params moves toward the updated
  policy every `every` updates (train/ref_sync.py).
  """
  micro = functools.partial(_micro_step, state.params, state.frozen, state.ref_params,
                            graphdef=graphdef, loss_call=loss_call, chunk_size=chunk_size,
                            ref_graphdef=ref_graphdef, modules=modules, batch_axes=batch_axes)
  step_key = jax.random.fold_in(state.rng, state.step) if lora_dropout else None
  if accum_steps == 1:
    metrics, grads, loss_state = micro(state.loss_state, batch, step_key)
  else:
    split = jax.tree.map(
        lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

    def body(carry, xs):
      mb, i = xs
      sums, loss_state = carry
      key = None if step_key is None else jax.random.fold_in(step_key, i)
      metrics, grads, loss_state = micro(loss_state, mb, key)
      return (jax.tree.map(jnp.add, sums, (metrics, grads)), loss_state), None

    first = jax.tree.map(lambda x: x[0], split)
    zeros = jax.tree.map(jnp.zeros_like,
                         jax.eval_shape(micro, state.loss_state, first, step_key)[:2])
    ((metrics, grads), loss_state), _ = jax.lax.scan(
        body, (zeros, state.loss_state), (split, jnp.arange(accum_steps)))
    # Sums over micro-batches -> means, except counts which stay sums (and the
    # per-token metrics' numerators and counts, divided below).
    counts = ("num_tokens", "tokens/", TOKEN_SUM, TOKEN_COUNT)   # summed, not averaged
    metrics = {k: v if k.startswith(counts) else v / accum_steps for k, v in metrics.items()}
    grads = jax.tree.map(lambda g: g / accum_steps, grads)

  metrics = token_metric_means(metrics)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  param_norm = optax.tree.norm(params)
  # The new parameters are checked too, so a saved checkpoint is always finite.
  is_finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
               & jnp.isfinite(param_norm))
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(
        lambda a, b: jnp.where(is_finite, a, b), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    loss_state = keep(loss_state, state.loss_state)
  metrics = {**metrics, "grad_norm": grad_norm, "param_norm": param_norm,
             "learning_rate": schedule(state.step)}
  for name in modules:
    scale = (module_lr_scales or {}).get(name, 1.0)
    metrics[f"lr/{name}"] = schedule(state.step) * scale
    metrics[f"{name}/grad_norm"] = optax.tree.norm(grads[name])
  ref_params = state.ref_params
  if ref_sync is not None:
    ref_params = ref_sync_lib.sync_reference(ref_params, params, state.step + 1,
                                             every=ref_sync[0], alpha=ref_sync[1])
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, loss_state=loss_state,
      ref_params=ref_params,
      num_nonfinite=state.num_nonfinite + (~is_finite).astype(jnp.int32))
  return new_state, metrics


class _LossCall(functools.partial):
  """functools.partial carrying `columns`: the per-sequence columns the step computes
  for the loss, and `token_metrics`: the TOKEN_METRICS entries it logs."""
  columns: tuple[str, ...] = ()
  token_metrics: tuple[tuple[str, str, int | None], ...] = ()


def make_loss_call(spec: losses.LossSpec, hparams: dict[str, Any], *,
                   token_metrics: bool = True) -> Callable:
  """Binds a registry entry and its hyperparameters: (inputs, state) -> (loss, metrics, state).

  The result's `columns` names the extra per-sequence columns (losses.columns.COLUMNS)
  the step computes for this loss and these hyperparameters; its `token_metrics`,
  TRL's per-token metrics of the loss's data format (TOKEN_METRICS), none with
  `token_metrics=False` (config.token_metrics).
  """
  call = _LossCall(_loss_call, spec.call, spec.fn, dict(hparams))
  call.columns = spec.column_names(hparams)
  # A scalar head (reward model) has no token logits.
  call.token_metrics = (TOKEN_METRICS.get(spec.data, ())
                        if spec.head == "lm" and token_metrics else ())
  return call


def _loss_call(call, fn, hparams, inputs, loss_state):
  return call(fn, inputs, loss_state, **hparams)


def jit_train_step(*, graphdef, tx, schedule, loss_call, chunk_size, accum_steps,
                   skip_nonfinite, state_shardings, batch_sharding, replicated,
                   ref_graphdef=None, modules=(), module_lr_scales=None, lora_dropout=False,
                   ref_sync=None):
  """The one jitted step, with explicit shardings and the state donated.

  The log-prob chunks stay split like the batch's leading dimension.
  """
  fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                         loss_call=loss_call, chunk_size=chunk_size, accum_steps=accum_steps,
                         skip_nonfinite=skip_nonfinite, ref_graphdef=ref_graphdef,
                         modules=modules, module_lr_scales=module_lr_scales,
                         lora_dropout=lora_dropout, batch_axes=leading_axes(batch_sharding),
                         ref_sync=ref_sync)
  return jax.jit(fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef, loss_call: Callable,
              chunk_size: int, ref_graphdef=None, modules: tuple[str, ...] = (),
              batch_axes=None) -> dict[str, jax.Array]:
  """The training loss and its metrics on a held-out batch: no gradients, no update.

  The same objective as `train_step` (reference, OFS modules, the loss's running
  state as it stands, which is not advanced), without LoRA dropout.
  Returns the loss's metrics plus "loss" and "tokens/real".
  """
  objective = _objective_of(state.frozen, state.ref_params, state.loss_state, batch, None,
                            graphdef=graphdef, loss_call=loss_call, chunk_size=chunk_size,
                            ref_graphdef=ref_graphdef, modules=modules, batch_axes=batch_axes)
  loss, (metrics, _) = objective(state.params)
  return {**token_metric_means(metrics), "loss": loss,
          "tokens/real": real_tokens(batch)}   # any layout (held-out batches are padded)


def jit_eval_step(*, graphdef, loss_call, chunk_size, state_shardings, batch_sharding,
                  replicated, ref_graphdef=None, modules=()):
  """`eval_step` jitted with the train step's shardings; nothing is donated."""
  fn = functools.partial(eval_step, graphdef=graphdef, loss_call=loss_call,
                         chunk_size=chunk_size, ref_graphdef=ref_graphdef, modules=modules,
                         batch_axes=leading_axes(batch_sharding))
  return jax.jit(fn, in_shardings=(state_shardings, batch_sharding), out_shardings=replicated)


def leading_axes(batch_sharding):
  """Mesh axes of a NamedSharding's leading dimension (None if not split or not named)."""
  spec = getattr(batch_sharding, "spec", None)
  return spec[0] if spec else None


def batch_logps_only(graphdef, params, frozen, batch, *, chunk_size: int,
                     batch_axes=None) -> jax.Array:
  """[B, S] summed log-probs (for precomputing reference columns)."""
  return batch_logps(graphdef, params, frozen, batch, chunk_size=chunk_size,
                     batch_axes=batch_axes)[0]


def prompt_embeddings(graphdef, params, frozen, batch) -> jax.Array:
  """[B, D] mean of the final hidden states over each example's prompt tokens.

  The prompt is read from sequence 0 (every sequence of an example shares it):
  real tokens that are not scored response tokens.
  """
  model = nnx.merge(graphdef, params, frozen)
  tokens, attention = batch["tokens"][:, 0], batch["attention_mask"][:, 0]
  hidden = model(tokens, attention)                                     # [B, T, D]
  prompt = (attention.astype(bool) & ~batch["loss_mask"][:, 0].astype(bool))
  m = prompt.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
