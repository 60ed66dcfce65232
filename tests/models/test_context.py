"""Context parallelism (jaxalign/models/context.py): a mesh with a "context" axis
splits every sequence; the step's loss, metrics and gradients equal the unsplit
step's, for the padded, packed and packed shared-prompt layouts, pairs and groups,
with fsdp and tensor axes in the mesh too.

The unsplit references are tests/data/test_packing.py's own step values (mesh
(1, 8, 1): 8-way fsdp), so a suite run compiles them once for both files.
"""
import jax
import numpy as np
import pytest

from jaxalign import config as config_lib, sharding
from jaxalign.models import attention as attention_lib, context
from tests.data import test_packing as tp
from tests.train.helpers import read_metrics, tiny_config, train_loop
from tests.train.test_packed_run import _assert_metrics_equal


# One context mesh per layout keeps the compiles few; together they cover context 2
# and 4 with fsdp, tensor and data axes beside it.
@pytest.mark.parametrize("source,layout,mesh_shape", [
    ("wild", "padded", (1, 2, 2, 2)),
    ("wild", "packed", (1, 1, 4, 2)),
    ("shared", "packed_shared", (2, 1, 4, 1)),
])
def test_context_train_step_equals_unsplit_step(source, layout, mesh_shape):
  """The whole jitted DPO step (frozen reference, every metric, the SGD(1) update,
  i.e. the gradients): sequence split over context == not split."""
  tp._assert_steps_equal(tp._step_values(source, layout),
                         tp._step_values(source, layout, mesh_shape=mesh_shape))


def test_context_group_losses_equal_unsplit():
  """A group format (GRAO, 4 sequences per example with padding slots) and SFT, padded
  and packed: loss, metrics and gradients with the sequence split 4-way over context
  and heads 2-way over tensor == 8-way fsdp."""
  for layout in ("padded", "packed"):
    for loss_name in ("grao", "sft"):
      ref = tp._layout_values(layout, loss_name)
      got = tp._layout_values(layout, loss_name, mesh_shape=(1, 1, 4, 2))
      np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
      assert set(got[1]) == set(ref[1])
      for k in ref[1]:
        np.testing.assert_allclose(got[1][k], ref[1][k], rtol=1e-5, atol=1e-5, err_msg=k)
      for x, y in zip(jax.tree.leaves(ref[2]), jax.tree.leaves(got[2])):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_context_run_with_resume_equals_unsplit_run(tmp_path):
  """4 steps of `jaxalign train`'s loop on mesh (1, 2, 2, 2), stopped after 2 and
  resumed, == 4 steps on the default mesh (8-way fsdp) in one go."""
  cfg = lambda **o: tiny_config(**{"data.batch_size": 16, "total_steps": 4,
                                   "checkpoint.every": 2, **o})
  train_loop(cfg(), str(tmp_path / "plain"), progress=False)
  split = cfg(**{"mesh.shape": (1, 2, 2, 2)})
  assert train_loop(split, str(tmp_path / "split"), progress=False, stop_after=2).final_step == 2
  train_loop(split, str(tmp_path / "split"), progress=False)     # resumes at step 2
  plain, resumed = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "split")
  assert [m["step"] for m in resumed] == [1, 2, 3, 4]
  _assert_metrics_equal(plain, resumed)


def test_context_attention_matches_reference_per_shard_edge():
  """The attention alone, every mask feature at once (causal, sliding window, key
  padding, packed segments and shared-prompt parts crossing the shard edges, GQA):
  context 4 x tensor 2, in the load-balanced order == the unsplit XLA reference,
  values and gradients."""
  rng = np.random.default_rng(0)
  B, T, H, KV, Dh = 2, 16, 4, 2, 8
  q, k, v = (rng.normal(size=(B, T, n, Dh)).astype(np.float32) for n in (H, KV, KV))
  seg = np.array([[0] * 7 + [1] * 9, [0] * 16], np.int32)
  parts = np.array([[0, 0, 0, 1, 1, 2, 2] + [0, 0, 0, 0, 1, 1, 2, 2, 2],
                    [0] * 5 + [1] * 6 + [2] * 5], np.int32)
  real = np.ones((B, T), bool)
  real[1, -3:] = False
  mesh = sharding.make_mesh((1, 1, 4, 2))
  keep = real[:, :, None, None]     # padding queries' rows are meaningless (attention.py)

  def loss_and_out(fn, window, q, k, v):
    out = fn(q, k, v, scale=0.3, window=window, key_mask=real, q_segment_ids=seg,
             kv_segment_ids=seg, part_ids=parts, implementation="xla")
    return (jax.numpy.where(keep, out, 0.0) ** 2).sum(), out

  def split(q, k, v, **kw):   # as the transformer runs it: in the balanced order
    b = context.balance
    kw = {n: b(x) if n in ("key_mask", "q_segment_ids", "kv_segment_ids", "part_ids")
          else x for n, x in kw.items()}
    return context.unbalance(context.attention(b(q), b(k), b(v), **kw))

  for window in (None, 5):
    want = jax.grad(lambda *a: loss_and_out(attention_lib.attention, window, *a),
                    (0, 1, 2), has_aux=True)(q, k, v)
    with jax.set_mesh(mesh):
      assert context.context_shards() == 4 and context.balanced(T)
      got = jax.jit(jax.grad(lambda *a: loss_and_out(split, window, *a),
                             (0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(np.where(keep, got[1], 0), np.where(keep, want[1], 0),
                               atol=1e-5)
    for g, r in zip(got[0], want[0]):
      np.testing.assert_allclose(g, r, atol=1e-5)


def test_context_config_validation():
  """A context size is checked before anything compiles, naming the key (exit 2)."""
  ok = tiny_config(**{"mesh.shape": (1, 2, 4, 1)})
  config_lib.validate(ok, 8)
  assert config_lib.resolve(ok, 8).mesh_shape == (1, 2, 4, 1)
  # A three-size shape is (data, fsdp, tensor), context 1: old recipes keep working.
  assert config_lib.resolve(tiny_config(**{"mesh.shape": (1, 4, 2)}), 8).mesh_shape == \
      (1, 4, 1, 2)
  bad = [
      ({"mesh.shape": (1, 1, 8, 1)}, "config.data.max_length: 12 tokens"),    # 12 % 8
      ({"mesh.shape": (1, 2, 4, 1), "data.packing": True, "data.pack_length": 14},
       "config.data.pack_length: 14 tokens"),
      ({"mesh.shape": (1, 2, 4, 1), "data.share_prompt": True}, "KV cache"),
      ({"mesh.shape": (1, 2, 4, 1), "model.attention": "splash"}, "splash kernel's block"),
      ({"mesh.shape": (1, 2, 2, 1, 2)}, "config.mesh.shape: needs 4 sizes"),
  ]
  for overrides, message in bad:
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(tiny_config(**overrides), 8)
  old_rules = tiny_config(**{"mesh.shape": (1, 2, 4, 1)})
  old_rules.sharding_rules = [r for r in old_rules.sharding_rules
                              if r[0] != "activation_length"]      # a recipe saved before
  config_lib.validate(old_rules, 8)
  off = tiny_config(**{"mesh.shape": (1, 2, 4, 1)})
  off.sharding_rules = [(n, None if n == "activation_length" else t)
                        for n, t in off.sharding_rules]
  with pytest.raises(config_lib.ConfigError, match="activation_length"):
    config_lib.validate(off, 8)


def test_processes_sharing_batch_shards_feed_the_same_rows():
  """The per-process row assignment follows the mesh: processes whose devices differ
  only along context (or tensor) feed the same slice of the batch."""
  names = sharding.MESH_AXES                     # (data, fsdp, context, tensor)
  batch_axes = ("data", "fsdp")
  # 4 processes x 4 devices; mesh (2, 1, 8, 1): each data shard spans 2 processes.
  grid = np.arange(16).reshape(2, 1, 8, 1) // 4
  assert [sharding.batch_process_slices(grid, names, batch_axes, p) for p in range(4)] == \
      [(0, 2), (0, 2), (1, 2), (1, 2)]
  # Context inside a process: each process has its own fsdp shard, as without context.
  grid = np.arange(16).reshape(1, 4, 4, 1) // 4
  assert [sharding.batch_process_slices(grid, names, batch_axes, p) for p in range(4)] == \
      [(0, 4), (1, 4), (2, 4), (3, 4)]
  # Context 2 x tensor 2 inside each process, one fsdp shard each.
  grid = np.arange(16).reshape(1, 4, 2, 2) // 4
  assert [sharding.batch_process_slices(grid, names, batch_axes, p) for p in range(4)] == \
      [(0, 4), (1, 4), (2, 4), (3, 4)]
  grid = np.array([0, 0, 1, 1, 0, 0, 1, 1]).reshape(1, 4, 2, 1)   # shards 0, 2 / 1, 3
  with pytest.raises(ValueError, match="contiguous"):
    sharding.batch_process_slices(grid, names, batch_axes, 0)
  # One process: the whole batch.
  assert sharding.batch_process_slices(np.zeros((1, 2, 4, 1), int), names, batch_axes,
                                       0) == (0, 1)


def test_kto_kl_chunks_are_each_process_batch_share_with_context_across_processes(monkeypatch):
  """KTO pairs its KL sequences within each process's share of a batch: with a context
  axis across processes that share is the batch over the batch slices (here 2), not
  over the processes (4), or a split run pairs other examples than the unsplit one."""
  from types import SimpleNamespace
  from jaxalign.train import loop
  grid = np.arange(16).reshape(2, 1, 8, 1) // 4     # 4 processes, 2 per data shard
  devices = np.vectorize(lambda p: SimpleNamespace(process_index=int(p)),
                         otypes=[object])(grid)
  fake_mesh = SimpleNamespace(devices=devices, axis_names=sharding.MESH_AXES)
  monkeypatch.setattr(sharding, "batch_sharding", lambda mesh, rules: SimpleNamespace(
      mesh=fake_mesh, spec=jax.sharding.PartitionSpec(("data", "fsdp"))))
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  monkeypatch.setattr(jax, "process_index", lambda: 2)
  spec = config_lib.resolve(tiny_config(**{"data.batch_size": 8}), 8)
  assert loop.kl_chunk_size(spec, mesh=None) == 4


def test_context_splash_matches_reference():
  """The splash kernel per context shard (Pallas interpret mode on CPU): 2 shards of
  128 query rows in the load-balanced order, all-gathered keys, segments crossing
  the shard edges, key padding, GQA, and packed shared prompts (part ids: the
  two-pass cascade of splash_parts per shard) == the unsplit XLA reference, values
  and gradients."""
  rng = np.random.default_rng(1)
  B, T, H, KV, Dh = 1, 256, 4, 2, 16
  q, k, v = (rng.normal(size=(B, T, n, Dh)).astype(np.float32) for n in (H, KV, KV))
  seg = np.asarray([[0] * 100 + [1] * 90 + [2] * 66], np.int32)
  parts = np.asarray([[0] * 40 + [1] * 30 + [2] * 30 + [0] * 50 + [1] * 40
                      + [0] * 10 + [1] * 20 + [2] * 36], np.int32)
  real = np.ones((B, T), bool)
  real[0, -20:] = False
  keep = real[:, :, None, None]
  w = rng.normal(size=q.shape).astype(np.float32) * keep
  b = context.balance
  for part_ids in (None, parts):
    kw = dict(scale=0.25, key_mask=real, q_segment_ids=seg, kv_segment_ids=seg,
              part_ids=part_ids)
    value = lambda fn, q, k, v: (w * fn(q, k, v)).sum()
    want = jax.value_and_grad(lambda *a: value(
        lambda q, k, v: attention_lib.attention(q, k, v, implementation="xla", **kw), *a),
        (0, 1, 2))(q, k, v)
    with jax.set_mesh(sharding.make_mesh((1, 1, 2, 4))):
      balanced_kw = {n: (b(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
      split = lambda q, k, v: context.unbalance(context.attention(
          b(q), b(k), b(v), implementation="splash", **balanced_kw))
      got = jax.jit(jax.value_and_grad(lambda *a: value(split, *a), (0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
    for g, r in zip(got[1], want[1]):
      np.testing.assert_allclose(g, r, atol=2e-4)
