"""TRL's dataset conventions load, and KTO's KL sequences pair within a batch block."""

import json

import numpy as np
import pytest

from jaxalign.data import conventions, pipeline, toy, tokenize
from jaxalign.data.formats import DataError, validate_records
from jaxalign.data.sources import load_records

USER = lambda t: {"role": "user", "content": t}
ASSISTANT = lambda t: {"role": "assistant", "content": t}


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


# The four TRL preference conventions, one small file each.
FILES = {
    "standard_explicit": [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}],
    "standard_implicit": [{"chosen": "The sky is blue.", "rejected": "The sky is green."}],
    "conversational_explicit": [{"prompt": [USER("What color is the sky?")],
                                 "chosen": [ASSISTANT("It is blue.")],
                                 "rejected": [ASSISTANT("It is green.")]}],
    "conversational_implicit": [{"chosen": [USER("What color is the sky?"), ASSISTANT("It is blue.")],
                                 "rejected": [USER("What color is the sky?"),
                                              ASSISTANT("It is green.")]}],
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_trl_preference_convention_loads_as_pairs(name, tmp_path):
  records = load_records(_jsonl(tmp_path / f"{name}.jsonl", FILES[name]), split="train")
  (r,), skipped = validate_records(records, "pairwise")
  assert skipped == 0
  if name.startswith("standard"):
    # The implicit prompt is the common prefix; TRL leaves the space to the responses.
    assert (r["prompt"], r["chosen"], r["rejected"]) == ("The sky is", " blue.", " green.")
  else:
    assert r["prompt"] == [USER("What color is the sky?")]
    assert r["chosen"] == [ASSISTANT("It is blue.")]
    assert r["rejected"] == [ASSISTANT("It is green.")]


@pytest.mark.parametrize("name", sorted(FILES))
def test_pairwise_files_unpair_for_unpaired_losses(name, tmp_path):
  rows = FILES[name] * 3
  records = load_records(_jsonl(tmp_path / f"{name}.jsonl", rows), split="train")
  for fmt in ("unpaired", "unpaired_kl"):
    out, _ = validate_records(records, fmt)
    # TRL's unpair_preference_dataset order: all chosen copies, then all rejected.
    assert [r["label"] for r in out] == [True] * 3 + [False] * 3
    assert out[0]["prompt"] == out[3]["prompt"]
    assert out[0]["completion"] in (" blue.", [ASSISTANT("It is blue.")])
    assert out[3]["completion"] in (" green.", [ASSISTANT("It is green.")])
    assert all(r["source_file"].endswith(f"{name}.jsonl") for r in out)


def test_unpaired_records_pass_unchanged_and_unpairing_blocks_like_trl():
  plain = [{"prompt": "p", "completion": "c", "label": True}]
  assert conventions.normalize_records(plain, "unpaired") == plain
  pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "id": i} for i in range(5)]
  out = conventions.unpair_records(pairs, block=2)
  assert [(r["completion"], r["label"], r["id"]) for r in out] == [
      ("c0", True, 0), ("c1", True, 1), ("r0", False, 0), ("r1", False, 1),
      ("c2", True, 2), ("c3", True, 3), ("r2", False, 2), ("r3", False, 3),
      ("c4", True, 4), ("r4", False, 4)]


def test_extract_prompt_edge_cases():
  # No divergence: TRL splits one before the shorter response's end.
  r = conventions.extract_prompt({"chosen": "abc", "rejected": "abcd"})
  assert (r["prompt"], r["chosen"], r["rejected"]) == ("ab", "c", "cd")
  with pytest.raises(DataError, match="prompt: empty string"):
    validate_records([{"chosen": "x", "rejected": "y"}], "pairwise")


def test_kl_sequences_rotate_completions_within_each_chunk():
  tok = toy.build_tokenizer()
  records = [{"prompt": f"{i}+{i}=", "completion": str(10 + i), "label": i % 2 == 0}
             for i in range(6)]
  valid, _ = validate_records(records, "unpaired_kl")
  cfg = tokenize.TokenizeConfig(max_length=12, max_prompt_length=8, kl_chunk_size=3)
  examples, _ = tokenize.tokenize_records(valid, "unpaired_kl", tok, cfg)
  plain, _ = tokenize.tokenize_records(valid, "unpaired", tok, cfg)

  def text(ex, s, mask):
    ids = ex["tokens"][s][ex[mask][s] == 1] if mask == "loss_mask" else \
        ex["tokens"][s][(ex["attention_mask"][s] == 1) & (ex["loss_mask"][s] == 0)]
    return tok.decode(ids, skip_special_tokens=True)

  # Chunks [0, 1, 2] and [3, 4, 5]: example j's KL completion is j-1's, the first the last's.
  partner = [2, 0, 1, 5, 3, 4]
  for j, ex in enumerate(examples):
    assert ex["tokens"].shape == (2, 12) and int(ex["label"]) == (j % 2 == 0)
    np.testing.assert_array_equal(ex["tokens"][0], plain[j]["tokens"][0])
    assert text(ex, 1, "prompt") == text(plain[j], 0, "prompt")
    np.testing.assert_array_equal(ex["tokens"][1][ex["loss_mask"][1] == 1],
                                  plain[partner[j]]["tokens"][0][
                                      plain[partner[j]]["loss_mask"][0] == 1])
    assert ex["attention_mask"][1][ex["loss_mask"][1] == 1].all()


def test_kept_blocks_are_whole_batches_in_shuffled_order():
  examples = [{"x": np.asarray(i)} for i in range(10)]
  ds = pipeline.make_dataset(examples, seed=3, batch_size=3, keep_blocks=True,
                             process_index=0, process_count=1)
  it = iter(ds)
  batches = [next(it)["x"].tolist() for _ in range(6)]
  blocks = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]          # the partial block [9] is dropped
  assert all(b in blocks for b in batches)
  assert sorted(map(tuple, batches[:3])) == sorted(map(tuple, blocks))   # one epoch
  assert batches[:3] != blocks or batches[3:] != blocks                  # shuffled
  # Two processes take alternate blocks of the same order.
  p0 = iter(pipeline.make_dataset(examples, seed=3, batch_size=3, keep_blocks=True,
                                  process_index=0, process_count=2))
  p1 = iter(pipeline.make_dataset(examples, seed=3, batch_size=3, keep_blocks=True,
                                  process_index=1, process_count=2))
  assert [next(p0)["x"].tolist(), next(p1)["x"].tolist()] == batches[:2]
