"""Batched sampling with a KV cache: prefill once, then one token per step.

  sp = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, n=4,
                      stop_tokens=(tokenizer.eos_token_id,))
  out = generate(graphdef, state.params, state.frozen, prompt_tokens, prompt_mask,
                 jax.random.PRNGKey(0), sp)
  out.tokens[i, :out.lengths[i]]   # completion i, of prompt out.prompt_index[i]

One jit-compiled program per shape bucket does everything on device: prefill
of the left-padded prompts, then a `lax.while_loop` that feeds each sampled
token back through `Transformer.decode` and stops as soon as every row has
produced a stop token (or at max_new_tokens). Parameters are used where they
live (e.g. the training state's, sharded on the training mesh); the rows are
split over the mesh's batch axes.

Determinism: row i (prompt i // n, sample i % n) draws token t with
``fold_in(fold_in(key, i), t)``, so a row's sample does not depend on the
batch size, the bucket padding or the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign.models import transformer

DEFAULT_BATCH_AXES = ("data", "fsdp")
MIN_PROMPT_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample (the same fields and meanings as vLLM / transformers).

  Attributes:
    max_new_tokens: tokens generated per completion at most.
    temperature: softmax temperature; 0.0 is greedy (argmax).
    top_k: keep the k most likely tokens (ties at the k-th kept); 0 is off.
    top_p: keep the smallest set of most likely tokens whose probability
      reaches top_p (nucleus sampling, after top_k); 1.0 is off.
    n: completions per prompt.
    stop_tokens: a completion ends at (and includes) the first of these.
  """
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  n: int = 1
  stop_tokens: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
    if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
      raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, "
                       f"got {self.max_new_tokens!r}")
    if not _is_int(self.n) or self.n < 1:
      raise ValueError(f"SamplingParams.n must be an int >= 1, got {self.n!r}")
    if not _is_int(self.top_k) or self.top_k < 0:
      raise ValueError(f"SamplingParams.top_k must be an int >= 0, got {self.top_k!r}")
    if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
            and self.temperature >= 0):
      raise ValueError(f"SamplingParams.temperature must be a finite float >= 0, "
                       f"got {self.temperature!r}")
    if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
      raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
    if any(t < 0 for t in self.stop_tokens):
      raise ValueError(f"SamplingParams.stop_tokens must be token ids >= 0, "
                       f"got {self.stop_tokens}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass
class Completions:
  """Generated tokens, prompt-major: rows i*n .. i*n+n-1 come from prompt i.

  Attributes:
    tokens: [B*n, max_new_tokens] int32; after a row's stop token (kept) or
      past its length, 0.
    lengths: [B*n] int32 generated tokens, the stop token included.
    prompt_index: [B*n] int32 prompt row of each completion (i // n).
    decode_steps: [] int32 tokens generated per row before the loop ended
      (< max_new_tokens when every row stopped early).
  """
  tokens: jax.Array
  lengths: jax.Array
  prompt_index: jax.Array
  decode_steps: jax.Array | None = None

  def token_lists(self) -> list[list[int]]:
    """Each completion's tokens as a Python list (stop token included)."""
    tokens, lengths = jax.device_get((self.tokens, self.lengths))
    return [list(map(int, row[:n])) for row, n in zip(np.asarray(tokens), np.asarray(lengths))]


def filter_logits(logits: jax.Array, *, top_k: int, top_p: float | jax.Array,
                  use_top_p: bool) -> jax.Array:
  """Sets logits outside the top-k / top-p (nucleus) set to -inf.

  Args:
    logits: [R, V] float32, temperature already applied.
    top_k: keep the k largest (and ties of the k-th); 0 keeps all.
    top_p: keep the fewest largest whose softmax mass reaches top_p (always
      at least one, ties at the cut kept); applied within the top-k set.
    use_top_p: False skips the top-p pass (top_p == 1).

  Returns:
    [R, V] float32.
  """
  if top_k == 0 and not use_top_p:
    return logits
  if top_k > 0:
    kept = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0]   # [R, k] descending
  else:
    kept = -jnp.sort(-logits, axis=-1)                                # [R, V] descending
  if use_top_p:
    probs = jax.nn.softmax(kept, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs                  # [R, k]
    # A token stays if the tokens strictly before it have not reached top_p.
    in_nucleus = mass_before < top_p
    cutoff = jnp.min(jnp.where(in_nucleus, kept, jnp.inf), axis=-1)  # [R]
  else:
    cutoff = kept[:, -1]
  return jnp.where(logits >= cutoff[:, None], logits, -jnp.inf)


def sample_tokens(logits: jax.Array, keys: jax.Array, *, greedy: bool,
                  temperature: float | jax.Array, top_k: int, top_p: float | jax.Array,
                  use_top_p: bool) -> jax.Array:
  """One token per row: argmax when greedy, else a draw with that row's key.

  Args:
    logits: [R, V] float32.
    keys: [R] PRNG keys (raw [R, 2] uint32 or typed), one per row.

  Returns:
    [R] int32.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p,
                         use_top_p=use_top_p)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _last_logits(model: transformer.Transformer, hidden: jax.Array) -> jax.Array:
  """[R, T, D] hidden -> [R, V] float32 logits of the last position."""
  return model.next_token_logits(hidden[:, -1])


def _generate_program(params, frozen, tokens, mask, key, temperature, top_p, stops, *,
                      graphdef, max_new_tokens: int, n: int, greedy: bool, top_k: int,
                      use_top_p: bool, row_sharding: NamedSharding | None):
  """The whole generation on device for one bucket.

  Args:
    tokens, mask: [Bb, P] int32 left-padded prompts (bucket-padded rows last).
    key: PRNG key; temperature, top_p: [] float32.
    stops: [K] int32 stop token ids, -1 for none (an argument, not a static:
      changing the stop tokens does not recompile).

  Returns:
    tokens [Bb*n, M] int32, lengths [Bb*n] int32, steps [] int32.
  """
  model = nnx.merge(graphdef, params, frozen)
  num_prompts, prompt_len = tokens.shape
  rows = num_prompts * n
  sample = functools.partial(sample_tokens, greedy=greedy, temperature=temperature,
                             top_k=top_k, top_p=top_p, use_top_p=use_top_p)

  def constrain(x, axis=0):
    """Rows (axis `axis`: 1 on the [L, B, S, KV, Dh] caches) split over the batch axes."""
    if row_sharding is None:
      return x
    spec = [P.UNCONSTRAINED] * x.ndim
    spec[axis] = row_sharding.spec[0]
    return jax.lax.with_sharding_constraint(x, NamedSharding(row_sharding.mesh, P(*spec)))

  # Prefill each distinct prompt once, then copy its cache to its n rows.
  cache = model.init_cache(num_prompts, prompt_len + max_new_tokens)
  hidden, cache = model.decode(tokens, mask, cache)
  logits = jnp.repeat(_last_logits(model, hidden), n, axis=0)         # [R, V]
  if n > 1:
    cache = cache.replace(k=jnp.repeat(cache.k, n, axis=1), v=jnp.repeat(cache.v, n, axis=1),
                          mask=jnp.repeat(cache.mask, n, axis=0))
  cache = cache.replace(k=constrain(cache.k, 1), v=constrain(cache.v, 1),
                        mask=constrain(cache.mask))
  row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(rows))
  step_keys = lambda t: jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)

  first = sample(logits, step_keys(0))                                # [R]
  out = jnp.zeros((rows, max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stops)
  lengths = jnp.ones((rows,), jnp.int32)

  def cond(carry):
    t, _, _, done, _, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    t, cache, last, done, out, lengths = carry
    hidden, cache = model.decode(last[:, None], jnp.ones((rows, 1), jnp.int32), cache)
    nxt = sample(_last_logits(model, hidden), step_keys(t))
    nxt = jnp.where(done, 0, nxt)
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], t, axis=1)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(nxt, stops)
    return t + 1, cache, nxt, done, out, lengths

  carry = (jnp.ones((), jnp.int32), cache, first, done, out, lengths)
  steps, _, _, _, out, lengths = jax.lax.while_loop(cond, body, carry)
  return out, lengths, steps


_STATIC = ("graphdef", "max_new_tokens", "n", "greedy", "top_k", "use_top_p",
           "row_sharding")
_jit_generate = jax.jit(_generate_program, static_argnames=_STATIC)


def bucket(size: int, *, minimum: int = 1, multiple: int = 1) -> int:
  """Next power of two >= max(size, minimum), rounded up to a multiple of `multiple`."""
  b = 1 << max(0, (max(size, minimum) - 1).bit_length())
  return -(-b // multiple) * multiple


def _params_mesh(params) -> Mesh | None:
  for leaf in jax.tree.leaves(params):
    s = getattr(leaf, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh.size > 1:
      return s.mesh
  return None


def _as_host_int(x, name: str) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    raise ValueError(f"{name}: pass prompts as host arrays (numpy) in multi-process runs")
  a = np.asarray(jax.device_get(x))
  if a.ndim != 2:
    raise ValueError(f"{name} must be [B, P], got shape {a.shape}")
  if not np.issubdtype(a.dtype, np.integer) and a.dtype != bool:
    raise ValueError(f"{name} must hold integers, got {a.dtype}")
  return a.astype(np.int32)


def check_prompts(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> None:
  """Raises ValueError naming the row when prompts cannot be generated from."""
  if tokens.shape != mask.shape:
    raise ValueError(f"prompt_tokens {tokens.shape} and prompt_mask {mask.shape} differ")
  if tokens.shape[0] == 0 or tokens.shape[1] == 0:
    raise ValueError(f"no prompts: prompt_tokens has shape {tokens.shape}")
  mask = mask.astype(bool)
  empty = np.flatnonzero(~mask.any(axis=1))
  if empty.size:
    raise ValueError(f"prompt row {empty[0]} has no real token (prompt_mask all 0)")
  # Left padding: once a row's mask is 1 it stays 1.
  not_left = np.flatnonzero((np.diff(mask.astype(np.int8), axis=1) < 0).any(axis=1))
  if not_left.size:
    raise ValueError(f"prompt row {not_left[0]} is not left-padded (mask has a 0 after a 1)")
  real = np.where(mask, tokens, 0)
  bad = np.argwhere((real < 0) | (real >= vocab_size))
  if bad.size:
    r, c = bad[0]
    raise ValueError(f"prompt row {r}, column {c}: token {tokens[r, c]} outside the "
                     f"vocabulary [0, {vocab_size})")


def generate(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State,
             prompt_tokens, prompt_mask, key: jax.Array, sp: SamplingParams, *,
             mesh: Mesh | None = None,
             batch_axes: str | Sequence[str] | None = DEFAULT_BATCH_AXES) -> Completions:
  """Samples `sp.n` completions for each of B left-padded prompts.

  Args:
    graphdef, params, frozen: the model split by `jaxalign.train.state.split_model`
      (e.g. a TrainState's `params` and `frozen`, used in place on their mesh).
    prompt_tokens: [B, P] int, left-padded (numpy or jax).
    prompt_mask: [B, P] int/bool, 1 on real tokens; every row needs one.
    key: PRNG key; the same key (and inputs) gives the same completions.
    sp: sampling parameters.
    mesh: where to split the rows; default the mesh the params are sharded
      on (none: wherever jit puts them).
    batch_axes: the mesh axes the rows are split over (the "batch" rule).

  Returns:
    Completions with B * n rows, prompt-major.
  """
  model_cfg = nnx.merge(graphdef, params, frozen).config
  tokens = _as_host_int(prompt_tokens, "prompt_tokens")
  mask = _as_host_int(prompt_mask, "prompt_mask")
  check_prompts(tokens, mask, model_cfg.vocab_size)
  bad_stop = [t for t in sp.stop_tokens if t >= model_cfg.vocab_size]
  if bad_stop:
    raise ValueError(f"SamplingParams.stop_tokens {bad_stop} outside the vocabulary "
                     f"[0, {model_cfg.vocab_size})")
  mesh = mesh if mesh is not None else _params_mesh(params)
  num_prompts, prompt_len = tokens.shape

  row_sharding = prompt_sharding = None
  shards = 1
  if mesh is not None and batch_axes:
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    shards = math.prod(mesh.shape[a] for a in axes)
    row_sharding = NamedSharding(mesh, P(axes))
  # Bucket shapes so that nearby sizes share one compiled program. Rows are
  # prompts * n; both must split evenly over the batch shards.
  padded_prompts = bucket(num_prompts, multiple=shards // math.gcd(shards, sp.n))
  if row_sharding is not None and padded_prompts % shards == 0:
    prompt_sharding = row_sharding
  elif mesh is not None:
    prompt_sharding = NamedSharding(mesh, P())
  padded_len = bucket(prompt_len, minimum=MIN_PROMPT_BUCKET)
  pad = ((0, padded_prompts - num_prompts), (padded_len - prompt_len, 0))
  tokens = np.pad(tokens, pad)
  mask = np.pad(mask, pad)
  mask[num_prompts:, -1] = 1        # padding prompts: one token, output discarded
  if prompt_sharding is not None:
    tokens, mask = jax.device_put((tokens, mask), prompt_sharding)

  stops = np.full(bucket(len(sp.stop_tokens), minimum=4), -1, np.int32)
  stops[:len(sp.stop_tokens)] = sp.stop_tokens
  out, lengths, steps = _jit_generate(
      params, frozen, tokens, mask, key, np.float32(max(sp.temperature, 1e-6)),
      np.float32(sp.top_p), stops, graphdef=graphdef, max_new_tokens=sp.max_new_tokens,
      n=sp.n, greedy=sp.greedy, top_k=sp.top_k, use_top_p=sp.top_p < 1.0,
      row_sharding=row_sharding)
  rows = num_prompts * sp.n
  return Completions(tokens=out[:rows], lengths=lengths[:rows],
                     prompt_index=jnp.arange(rows, dtype=jnp.int32) // sp.n,
                     decode_steps=steps)


def generate_model(model: transformer.Transformer, prompt_tokens, prompt_mask,
                   key: jax.Array, sp: SamplingParams, **kwargs) -> Completions:
  """`generate` for an nnx Transformer (split here; same compiled programs)."""
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  return generate(graphdef, params, frozen, prompt_tokens, prompt_mask, key, sp, **kwargs)
