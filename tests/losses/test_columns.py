"""losses/columns.py as math: LD-DPO's tail_logps and WPO's wpo_logps from flat token outputs.

The same [B, S] sequences laid out as rows (one slot a row) and as packed groups
(several slots a group, tokens of different slots interleaved along N) give the
columns of a direct NumPy computation of TRL's definitions.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import columns

B, S, T = 6, 2, 9


def _sequences(seed):
  rng = np.random.default_rng(seed)
  logps = rng.normal(size=(B, S, T)).astype(np.float32)
  log_sum_sq = rng.normal(size=(B, S, T)).astype(np.float32)
  mask = rng.uniform(size=(B, S, T)) < 0.6
  mask[0, 1] = False                                   # an empty sequence: all tail
  return logps, log_sum_sq, mask


def _expected(logps, log_sum_sq, mask):
  counts = mask.sum(-1)                                               # [B, S]
  rank = np.cumsum(mask, -1)
  tail = mask & (rank > counts.min(1)[:, None, None])
  wpo = np.where(mask, logps - log_sum_sq, 0.0).sum(-1) / np.maximum(counts, 1)
  return counts, np.where(tail, logps, 0.0).sum(-1), wpo


def _rows(logps, log_sum_sq, mask):
  flat = lambda x: jnp.asarray(x.reshape(B * S, T))
  return {"logps": flat(logps), "mask": flat(mask), "log_sum_sq": flat(log_sum_sq),
          "slot": flat(np.where(mask, 0, 1)), "rank": flat(np.cumsum(mask, -1))}


def _packed(logps, log_sum_sq, mask, groups, seed):
  """Each group's B/groups examples' tokens in one flat axis, in a random interleaving
  that keeps every sequence's order, with padding tokens between."""
  rng = np.random.default_rng(seed)
  n = B // groups * S
  out = {k: [] for k in ("logps", "mask", "log_sum_sq", "slot", "rank")}
  for g in range(groups):
    pending = [list(range(T)) for _ in range(n)]
    toks = []
    while any(pending):
      j = rng.choice([i for i, p in enumerate(pending) if p])
      toks.append((j, pending[j].pop(0)))
      if rng.uniform() < 0.2:
        toks.append((n, 0))                                           # padding
    idx = [(g * (n // S) + j // S, j % S, t) if j < n else (0, 0, 0) for j, t in toks]
    m = np.array([j < n and mask[i] for (j, _), i in zip(toks, idx)])
    out["mask"].append(m)
    out["slot"].append(np.array([j if ok else n for (j, _), ok in zip(toks, m)]))
    out["rank"].append(np.array([mask[b, s, :t + 1].sum() for b, s, t in idx]))
    out["logps"].append(np.array([logps[i] for i in idx]))
    out["log_sum_sq"].append(np.array([log_sum_sq[i] for i in idx]))
  width = max(len(m) for m in out["mask"])
  pad = lambda a, v: np.pad(a, (0, width - len(a)), constant_values=v)
  return {k: jnp.asarray(np.stack([pad(a, n if k == "slot" else 0) for a in v]))
          for k, v in out.items()}


@pytest.mark.parametrize("layout", ["rows", "packed_1", "packed_3"])
def test_tail_and_wpo_logps_equal_trl_definitions_in_every_layout(layout):
  logps, log_sum_sq, mask = _sequences(0)
  counts, want_tail, want_wpo = _expected(logps, log_sum_sq, mask)
  if layout == "rows":
    tok = _rows(logps, log_sum_sq, mask)
  else:
    tok = _packed(logps, log_sum_sq, mask, groups=int(layout[-1]), seed=1)
  got = columns.compute(("tail_logps", "wpo_logps"), tok, jnp.asarray(counts))
  np.testing.assert_allclose(got["tail_logps"], want_tail, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got["wpo_logps"], want_wpo, rtol=1e-6, atol=1e-6)
  assert np.any(want_tail != 0) and np.any(want_tail == 0)


def test_token_request_asks_for_the_vocabulary_pass_only_for_wpo():
  assert columns.token_request(()) is None
  assert columns.token_request(("tail_logps",)) == {}
  assert columns.token_request(("tail_logps", "wpo_logps")) == {"log_sum_sq": None}
  # The per-token metrics ride on the log-prob scan: "stats", no vocabulary pass.
  assert columns.token_request(("token_top1", "token_entropies")) == {"stats": None}
  with pytest.raises(ValueError, match="known"):
    columns.token_request(("nope",))
