"""The passes before training (train/passes.py): a signal stops `map_examples` at a batch
boundary; the reference pass keeps its complete batches, and the rerun continues from
them to the table an uninterrupted pass makes."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import errors, sharding
from jaxalign.data import pipeline
from jaxalign.train import passes
from tests.train.helpers import resolved, tiny_config

N, BATCH = 40, 8   # 5 batches


class _SignalAfter:
  """A Preemption stand-in: `requested` turns True at its (reads + 1)-th read, once per
  batch, as if SIGTERM landed while batch `reads - 1` ran."""

  signal_name = "SIGTERM"

  def __init__(self, reads: int):
    self.reads = reads

  @property
  def requested(self) -> bool:
    self.reads -= 1
    return self.reads < 0


def _examples():
  rng = np.random.default_rng(0)
  return [{"tokens": rng.integers(0, 32, (2, 12)).astype(np.int32),
           "attention_mask": np.ones((2, 12), np.int32),
           "loss_mask": np.ones((2, 12), np.int32)} for _ in range(N)]


def _logps(batch):   # [B, 2]: a stand-in for the policy's sequence log-probs
  return jnp.log1p(jnp.sum(batch["tokens"] * batch["loss_mask"], axis=-1).astype(jnp.float32))


@pytest.fixture
def run_pass():
  spec = resolved(tiny_config())
  mesh = sharding.make_mesh(spec.mesh_shape, jax.devices())
  starts = []
  ordered = pipeline.ordered_batches

  def spy(*a, **k):   # the batch each pass starts at
    starts.append(k.get("start_batch", 0))
    return ordered(*a, **k)

  def run(**kwargs):
    return passes.map_examples(_examples(), _logps, mesh=mesh, rules=spec.rules,
                               batch_size=BATCH, desc="reference log-probs", progress=False,
                               **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pipeline, "ordered_batches", spy)
    yield run, starts


def test_a_signal_stops_the_pass_and_the_rerun_continues_to_the_same_table(tmp_path, run_pass,
                                                                           caplog):
  run, starts = run_pass
  straight = run()
  keep = passes.KeptBatches(str(tmp_path / "ref_logps.partial.npz"), {"data": "a"})
  with pytest.raises(errors.PassInterrupted) as stop:
    run(preempt=_SignalAfter(3), keep=keep)
  assert stop.value.signal_name == "SIGTERM"
  assert str(stop.value) == (
      f"during the reference log-probs pass, before training: 3 of 5 batches done, kept in "
      f"{keep.path}; rerun the same command to continue from batch 4")
  table, filled, done = keep.load(N, 5)
  assert done == 3 and filled.tolist() == [True] * 24 + [False] * 16
  np.testing.assert_array_equal(table[:24], straight[:24])
  # A second signal at once: the kept batches stay as they are.
  with pytest.raises(errors.PassInterrupted, match="3 of 5 batches done, kept in"):
    run(preempt=_SignalAfter(0), keep=keep)
  with caplog.at_level(logging.WARNING, logger="jaxalign"):
    resumed = run(keep=keep)
  assert starts == [0, 0, 3, 3]   # the rerun reads only batches 4 and 5
  assert "continuing after the 3 of 5 batches kept in" in caplog.text
  np.testing.assert_array_equal(resumed, straight)   # bit for bit


def test_kept_batches_for_another_key_are_discarded(tmp_path, run_pass, caplog):
  run, starts = run_pass
  path = str(tmp_path / "ref_logps.partial.npz")
  with pytest.raises(errors.PassInterrupted):
    run(preempt=_SignalAfter(2), keep=passes.KeptBatches(path, {"data": "a"}))
  with caplog.at_level(logging.WARNING, logger="jaxalign"):
    table = run(keep=passes.KeptBatches(path, {"data": "b"}))
  assert starts == [0, 0] and "made for other data" in caplog.text
  assert np.isfinite(table).all()
  (tmp_path / "ref_logps.partial.npz").write_bytes(b"torn")   # unreadable: start over
  with caplog.at_level(logging.WARNING, logger="jaxalign"):
    run(keep=passes.KeptBatches(path, {"data": "b"}))
  assert starts == [0, 0, 0] and "unreadable" in caplog.text


def test_a_pass_that_is_not_kept_stops_with_nothing_written(tmp_path, run_pass):
  run, _ = run_pass
  with pytest.raises(errors.PassInterrupted) as stop:
    run(preempt=_SignalAfter(2))
  assert "2 of 5 batches done, not kept" in str(stop.value)
  with pytest.raises(errors.PassInterrupted) as stop:   # the signal came before the pass
    run(preempt=_SignalAfter(0), keep=passes.KeptBatches(str(tmp_path / "p.npz"), {}))
  assert "0 of 5 batches done, nothing to keep" in str(stop.value)
  assert not list(tmp_path.iterdir())
