"""The run paths that used to read a list of every example read lazily now, with the
list reference's (tests/data/reference.py) examples, skips, errors and losses: unpaired formats (TRL's unpairing order, KTO's KL pairs), online methods'
record rewrite, data.share_prompt and data.packing (buckets fitted to a seeded
sample of lengths, batches past them still packed)."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from jaxalign.data import examples as examples_lib
from jaxalign.data import conventions, formats, lazy, packing, reading, toy
from jaxalign.train import online as online_lib
from tests.train.helpers import read_metrics, tiny_config, train_loop
from tests.data.reference import list_examples, reads
from tests.data.test_lazy import _Spy

ARGS = dict(max_length=12, max_prompt_length=8)


def _write(path, rows):
  with open(path, "w") as f:
    f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
  return str(path)


def _unpaired_rows():
  """Plain unpaired rows and pairwise rows (with and without a prompt), interleaved."""
  task = toy.ArithmeticTask()
  plain = task.unpaired_records(9, seed=1)
  pairs = task.pairwise_records(9, seed=2)
  implicit = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]}
              for p in task.pairwise_records(4, seed=3)]
  rows = []
  for i in range(9):
    rows += [plain[i], pairs[i]] + ([implicit[i]] if i < 4 else [])
  return rows


def _assert_same(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert sorted(a) == sorted(b)
    for k in a:
      assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _load(path, fmt, *, lazy_read, **kw):
  """A run's read (`examples.open_examples`), or the list reference (not lazy_read)."""
  kw.setdefault("on_error", "raise")
  read = examples_lib.open_examples if lazy_read else list_examples
  return read(path, fmt, reading.load_tokenizer("toy"), split="train", **ARGS, **kw)


@pytest.mark.parametrize("fmt, chunk", [("unpaired", 0), ("unpaired_kl", 5),
                                        ("unpaired_kl", 0)])
def test_unpaired_formats_read_lazily_equal_the_list(tmp_path, fmt, chunk):
  rows = _unpaired_rows()
  rows[4] = {**rows[4], "chosen": 4}        # a bad pairwise row: its chosen copy is skipped
  rows[6] = "{not json"
  rows[9] = {**rows[9], "label": "yes"}     # a bad plain row
  assert conventions.is_pairwise(rows[4]) and not conventions.is_pairwise(rows[9])
  path = _write(tmp_path / "d.jsonl", rows)
  kw = dict(on_error="skip", kl_chunk_size=chunk)
  got, skipped = _load(path, fmt, lazy_read=True, **kw)
  assert isinstance(got, lazy.LazyExamples)
  want, want_skipped = _load(path, fmt, lazy_read=False, **kw)
  assert isinstance(want, list) and skipped == want_skipped == 3
  _assert_same(got, want)
  if fmt == "unpaired_kl":
    assert got[0]["tokens"].shape == (2, ARGS["max_length"])
  # on_error="raise": the first bad record in the eager order, the same line.
  with pytest.raises(formats.DataError) as lazy_error:
    _load(path, fmt, lazy_read=True, kl_chunk_size=chunk)
  with pytest.raises(formats.DataError) as list_error:
    _load(path, fmt, lazy_read=False, kl_chunk_size=chunk)
  assert str(lazy_error.value) == str(list_error.value)
  assert "d.jsonl:7: invalid JSON" in str(lazy_error.value)


def test_the_unpairing_order_is_the_eager_ones_across_blocks(tmp_path):
  """Blocks of 3 pairwise rows: each block's chosen copies, then its rejected ones."""
  rows = _unpaired_rows()
  path = _write(tmp_path / "d.jsonl", rows)
  raw = lazy.index_jsonl(path)
  order = lazy.unpaired_order(raw, on_error="raise", block=3)
  got = [lazy.UnpairedRows(raw, order)[k] for k in range(len(order))]
  records = [raw[i] for i in range(len(raw))]
  records = [conventions.extract_prompt(r) if conventions.is_pairwise(r) and "prompt" not in r
             else r for r in records]
  want = ([r for r in records if not conventions.is_pairwise(r)]
          + conventions.unpair_records([r for r in records if conventions.is_pairwise(r)],
                                       block=3))
  assert got == want and len(got) == 9 + 2 * 13


def test_online_record_rewrite_reads_lazily_and_names_bad_rows(tmp_path):
  source = online_lib.OnlineSource.from_config(_online_config("toy:sft?n=4",
                                                             **{"loss.name": "grao"}))
  rows = [{"prompt": r["prompt"], "reference": r["completion"]}
          for r in toy.ArithmeticTask().sft_records(12, seed=0)]
  rows[4] = {"prompt": "1+1="}                       # no reference
  rows[7] = {"prompt": "2+2=", "reference": 3}       # not a string
  path = _write(tmp_path / "p.jsonl", rows)
  kw = dict(map_record=source.map_record)
  got, skipped = _load(path, "sft", lazy_read=True, on_error="skip", **kw)
  assert isinstance(got, lazy.LazyExamples)
  want, want_skipped = _load(path, "sft", lazy_read=False, on_error="skip", **kw)
  assert skipped == want_skipped == 2
  _assert_same(got, want)
  errors = []
  for lazy_read in (True, False):
    with pytest.raises(formats.DataError, match=r"p\.jsonl:5: .*reference: missing field") as e:
      _load(path, "sft", lazy_read=lazy_read, **kw)
    errors.append(str(e.value))
  assert errors[0] == errors[1]

  def broken(record):
    if record["row"] == 3:
      raise KeyError("boom")
    return source.map_record(record)
  with pytest.raises(formats.DataError, match=r"p\.jsonl:3: <record>: KeyError"):
    _load(path, "sft", lazy_read=True, map_record=broken)


def test_the_length_sample_reads_only_its_rows_and_is_fixed_by_the_seed(tmp_path):
  path = _write(tmp_path / "d.jsonl", toy.ArithmeticTask().pairwise_records(50, seed=0))
  examples, _ = _load(path, "pairwise", lazy_read=True)
  every = np.stack([e["attention_mask"].sum(-1) for e in examples])     # [50, 2]
  np.testing.assert_array_equal(packing.length_sample(examples, seed=0), every)
  spy = _Spy(examples)
  sample = packing.length_sample(spy, seed=3, max_examples=16)
  assert len(spy.read) == 16 == len(set(spy.read)) and spy.read == sorted(spy.read)
  np.testing.assert_array_equal(sample, every[spy.read])
  again = _Spy(examples)
  np.testing.assert_array_equal(packing.length_sample(again, seed=3, max_examples=16), sample)
  assert again.read == spy.read                      # a restart fits the same buckets
  other = _Spy(examples)
  packing.length_sample(other, seed=4, max_examples=16)
  assert other.read != spy.read


def _unpack(packed, B, S, T):
  """The padded [B, S, T] tokens and masks a packed batch holds (the test's reference)."""
  G, R, L = packed["packed_tokens"].shape
  per = B // G
  tokens = np.zeros((B, S, T), np.int32)
  attention = np.zeros((B, S, T), np.int32)
  for g in range(G):
    for r in range(R):
      for at in range(L):
        slot = int(packed["packed_slot"][g, r, at])
        if slot == per * S:
          continue
        b, s = g * per + slot // S, slot % S
        pos = int(packed["packed_positions"][g, r, at])
        tokens[b, s, pos] = packed["packed_tokens"][g, r, at]
        attention[b, s, pos] = 1
  return tokens, attention


def test_a_batch_past_the_fitted_buckets_still_packs_exactly():
  """Buckets fitted to a sample of short sequences; a batch of full-length ones needs
  more rows than any fitted bucket and packs into the past-the-buckets row count."""
  T, B, S = 12, 8, 2
  short = np.full((64, S), 2, np.int32)
  spec, pack = packing.make_packer(short, process_batch=B, num_groups=2, global_groups=2,
                                   row_length=T, num_buckets=3, seed=0, pad_id=0)
  assert spec.buckets[0] < B // 2 * S                 # fitted buckets below one row each
  rng = np.random.default_rng(0)
  lengths = rng.integers(T - 2, T + 1, size=(B, S))
  attention = (np.arange(T) < lengths[..., None]).astype(np.int32)
  tokens = np.where(attention == 1, rng.integers(4, 32, size=(B, S, T)), 0).astype(np.int32)
  batch = {"tokens": tokens, "attention_mask": attention, "loss_mask": attention,
           "label": np.arange(B, dtype=np.int32)}
  need = packing.rows_needed(lengths, 2, T)
  assert need > max(b for b in spec.buckets if b < B // 2 * S)
  packed = pack(batch)
  assert packed["packed_tokens"].shape[1] >= need
  got_tokens, got_attention = _unpack(packed, B, S, T)
  np.testing.assert_array_equal(got_tokens, tokens)
  np.testing.assert_array_equal(got_attention, attention)
  np.testing.assert_array_equal(packed["packed_lengths"], lengths)
  np.testing.assert_array_equal(packed["label"], batch["label"])


# --- runs: lazy == list, step by step ------------------------------------------------

def _online_config(train_path, **overrides):
  c = tiny_config("sft", **{"total_steps": 2, "data.train_path": train_path,
                            "mesh.shape": (1, 1, 1), "loss.name": "d2o", "online.enabled": True,
                            "online.samples_per_prompt": 2, "sampling.max_new_tokens": 3,
                            "reference.mode": "frozen", "sampling.batch_size": 8,
                            **overrides})
  return c


def _run_pair(tmp_path, monkeypatch, cfg_for, devices=None):
  """Metrics of a lazy run and a list run (its data from the list reference) of one
  config, and the types of the examples each run read."""
  out, types = [], []
  for name, as_list in (("lazy", False), ("list", True)):
    with reads(monkeypatch, as_list=as_list) as read:
      train_loop(cfg_for(), str(tmp_path / name), progress=False, devices=devices)
    out.append([{k: v for k, v in m.items() if k not in _TIMING}
                for m in read_metrics(str(tmp_path / name))])
    types.append(set(read))
  return out, types


_TIMING = ("tokens_per_sec", "perf/model_tflops_per_sec_per_device", "perf/mfu", "rollout/seconds",
           "time/first_step_seconds", "eval/seconds")


@pytest.mark.parametrize("case", ["kto", "bco", "packing", "share_prompt"])
def test_a_lazy_run_equals_the_list_run(tmp_path, case, monkeypatch):
  pairs = toy.ArithmeticTask().pairwise_records(24, seed=5)
  path = _write(tmp_path / "d.jsonl", pairs)
  base = {"total_steps": 2, "data.train_path": path, "data.batch_size": 8}
  extra = {"packing": {"data.packing": True, "data.pack_length": 16},
           "share_prompt": {"data.share_prompt": True}}.get(case, {})

  def cfg_for(**o):
    cfg = tiny_config(**{**base, **extra, **o})
    if case in ("kto", "bco"):   # unpaired losses read the pairwise rows unpaired
      cfg.loss.name, cfg.loss.hparams = case, ml_collections.ConfigDict({"beta": 0.1})
    return cfg
  (lazy_metrics, list_metrics), types = _run_pair(tmp_path, monkeypatch, cfg_for)
  assert types == [{lazy.LazyExamples}, {list}]      # the list run alone read a list
  assert len(lazy_metrics) == 2 and lazy_metrics == list_metrics


def test_a_lazy_online_run_equals_the_list_run(tmp_path, monkeypatch):
  rows = [{"prompt": r["prompt"], "rejected": r["rejected"]}
          for r in toy.ArithmeticTask().pairwise_records(16, seed=0)]
  path = _write(tmp_path / "p.jsonl", rows)
  (lazy_metrics, list_metrics), types = _run_pair(
      tmp_path, monkeypatch, lambda: _online_config(path), devices=jax.devices()[:1])
  assert types == [{lazy.LazyExamples}, {list}]
  assert len(lazy_metrics) == 2 and lazy_metrics == list_metrics
  np.testing.assert_array_equal(np.load(tmp_path / "lazy" / "online" / "d2o_samples_0.npz")
                                ["tokens"],
                                np.load(tmp_path / "list" / "online" / "d2o_samples_0.npz")
                                ["tokens"])


def test_a_resume_across_data_lazy_says_which_setting_hashed_the_run(tmp_path):
  """A run started by an older version with data.lazy=False hashed its tokenized
  examples, as a list is hashed: resuming it now is refused in one line saying so."""
  from jaxalign import fingerprint
  from jaxalign.errors import ResumeMismatchError
  path = _write(tmp_path / "d.jsonl", toy.ArithmeticTask().pairwise_records(8, seed=0))
  tok = reading.load_tokenizer("toy")
  fps = {lazy_read: fingerprint.compute(_load(path, "pairwise", lazy_read=lazy_read)[0], tok,
                                        train_path=path, settings={})
         for lazy_read in (True, False)}
  assert fps[True]["content"] == "source" and fps[False]["content"] == "examples"
  (tmp_path / "run" / "checkpoints" / "2").mkdir(parents=True)
  fingerprint.write(str(tmp_path / "run" / fingerprint.RUN_FILE), fps[False])
  with pytest.raises(ResumeMismatchError, match=r"content hash .*resume with that"):
    fingerprint.check_resume(str(tmp_path / "run"), fps[True], allow_change=False)
  assert not fingerprint.check_resume(str(tmp_path / "run"), fps[False], allow_change=False)


def test_data_lazy_is_gone_an_override_is_unknown_and_a_list_read_refused(tmp_path, capsys):
  """data.lazy left with the list read: `--config.data.lazy` is an unknown key, a config
  that still asks for the list (False) is refused naming it, and True (what configs
  saved by earlier versions carry) still validates."""
  from jaxalign import config as config_lib
  from jaxalign.errors import ConfigError
  from tests.reliability.helpers import TINY_CLI_CONFIG, run_cli
  status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={tmp_path / 'run'}",
                        "--noprogress", "--config.data.lazy=False")
  assert status == 2 and len(err) == 1, err
  assert "--config.data.lazy: unknown config key 'lazy'" in err[0]
  assert not (tmp_path / "run").exists()
  with pytest.raises(ConfigError, match=r"config\.data\.lazy: is no longer an option"):
    config_lib.validate(tiny_config(**{"data.lazy": False}), jax.device_count())
  config_lib.validate(tiny_config(**{"data.lazy": True}), jax.device_count())
