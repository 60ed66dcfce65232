"""`generate_file`: prompts file -> completions file from a trained run."""

import json

import ml_collections
import pytest

from jaxalign.data.formats import DataError
from jaxalign.workflows import generate as generate_lib
from jaxalign.sampling.engine import SamplingParams
from jaxalign.train import rundir
from jaxalign.data import reading
from tests.sampling import helpers
from tests.train.helpers import tiny_config, train_loop

TEXT_PROMPTS = ["12+7=", "3+45=", "60+1="]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  run = str(tmp_path_factory.mktemp("gen") / "run")
  config = tiny_config("sft", total_steps=20, log_every=20, **{"checkpoint.every": 20,
                                                                "optim.lr": 3e-3})
  train_loop(config, run, progress=False)
  return run


def _write(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_greedy_file_matches_the_recompute_loop(run_dir, tmp_path):
  prompts = tmp_path / "p.jsonl"
  chat = [{"role": "user", "content": "2+2="}]
  _write(prompts, [{"prompt": p, "id": i} for i, p in enumerate(TEXT_PROMPTS)]
         + [{"prompt": chat, "id": 3}])
  out = tmp_path / "o.jsonl"
  stats = generate_lib.generate_file(run_dir, str(prompts), str(out),
                              SamplingParams(max_new_tokens=4, temperature=0.0, n=2))
  rows = [json.loads(line) for line in open(out)]
  assert [r["id"] for r in rows] == [0, 1, 2, 3]
  assert rows[3]["prompt"] == chat
  assert all("source_file" not in r and len(r["completions"]) == 2 for r in rows)
  assert stats["prompts"] == 4 and stats["completions"] == 8
  config = ml_collections.ConfigDict(rundir.resolved_config(run_dir))
  graphdef, params, frozen = rundir.load_run_params(run_dir, config)
  tokenizer = reading.load_tokenizer("toy")
  ref = helpers.recompute_complete(graphdef, params, frozen, tokenizer, TEXT_PROMPTS, 4)
  for r, want in zip(rows, ref):
    assert r["completions"] == [want, want]          # greedy: the n copies agree
    for n, reason in zip(r["num_tokens"], r["finish_reasons"]):
      assert 1 <= n <= 4 and (reason == "stop" or n == 4)


def test_sampling_is_seeded(run_dir, tmp_path):
  prompts = tmp_path / "p.jsonl"
  _write(prompts, [{"prompt": p} for p in TEXT_PROMPTS])
  sp = SamplingParams(max_new_tokens=4, temperature=1.5, n=3)
  read = lambda p: [json.loads(line)["completions"] for line in open(p)]
  generate_lib.generate_file(run_dir, str(prompts), str(tmp_path / "a.jsonl"), sp, seed=1)
  generate_lib.generate_file(run_dir, str(prompts), str(tmp_path / "b.jsonl"), sp, seed=1)
  assert read(tmp_path / "a.jsonl") == read(tmp_path / "b.jsonl")


@pytest.mark.parametrize("line,match", [
    ('{"text": "1+1="}', r"p.jsonl:2: prompt: missing field"),
    ('{"prompt": 5}', r"p.jsonl:2: prompt: want a string"),
    ('{"prompt": [{"role": "user"}]}', r"p.jsonl:2: prompt\[0\]"),
])
def test_bad_prompt_rows_are_named(run_dir, tmp_path, line, match):
  prompts = tmp_path / "p.jsonl"
  _write(prompts, ['{"prompt": "1+1="}', line])
  with pytest.raises(DataError, match=match):
    generate_lib.generate_file(run_dir, str(prompts), str(tmp_path / "o.jsonl"),
                        SamplingParams(max_new_tokens=2))
  assert not (tmp_path / "o.jsonl").exists()


def test_missing_prompts_file_is_named(run_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="prompts: .*nope.jsonl"):
    generate_lib.generate_file(run_dir, str(tmp_path / "nope.jsonl"), str(tmp_path / "o.jsonl"),
                        SamplingParams(max_new_tokens=2))


def test_not_a_run_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a jaxalign run directory"):
    generate_lib.generate_file(str(tmp_path), "x.jsonl", str(tmp_path / "o.jsonl"),
                        SamplingParams(max_new_tokens=2))


def test_encode_prompts_keeps_the_end_and_counts_truncated_prompts():
  from jaxalign.data import toy, tokenize
  from jaxalign.sampling import files
  tok = toy.build_tokenizer()
  prompts = ["1+2=", "12+3=" * 5000, [{"role": "user", "content": "4*5=" * 5000}]]
  ids, truncated = files.encode_prompts(tok, prompts, 6)
  assert truncated == 2
  assert ids == [tokenize.prompt_ids(tok, p)[-6:] for p in prompts]
