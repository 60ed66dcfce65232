"""Bad configs: exit 2 with one stderr line naming the key, nothing compiled, no workdir.

tests/test_cli.py already covers a misspelt key, a wrong type for optim.lr, a mesh
that does not divide the devices, batch 12 on 8 shards, max_length 4096, an
unknown loss and reference mode; these are the rest.
"""

import jax
import pytest

from tests.reliability.helpers import TINY_CLI_CONFIG, compile_events, run_cli


def test_the_compile_spy_sees_a_compile():
  # Positive control for `compile_events`: a fresh jitted function fires events.
  with compile_events() as events:
    jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(5.0)).block_until_ready()
  assert events


@pytest.mark.parametrize("override, expected", [
    # unknown keys
    ("--config.nonsense=1", "--config.nonsense: unknown config key 'nonsense'"),
    ("--config.optim.lrr=1e-5", 'Did you mean "lr"'),
    ("--config.model.overrides.dtypo=bfloat16", "--config.model.overrides.dtypo"),
    # wrong types
    ("--config.total_steps=ten", "--config.total_steps"),
    ("--config.seed=1.5", "--config.seed"),
    ("--config.data.shuffle=maybe", "--config.data.shuffle"),
    ("--config.loss.hparams.beta=high", "--config.loss.hparams.beta"),
    ("--config.mesh.shape=abc", "config.mesh.shape"),
    # impossible meshes
    ("--config.mesh.shape=(2,2,1)", "config.mesh.shape: (2, 2, 1) uses 4 devices but 8"),
    ("--config.mesh.shape=(1,-1,-1)", "config.mesh.shape: at most one -1"),
    ("--config.mesh.shape=(1,0,8)", "config.mesh.shape: sizes must be positive"),
    ("--config.mesh.shape=(1,2)", "config.mesh.shape: needs 4 sizes"),
    ("--config.mesh.shape=(1,1,8)", "config.mesh.shape: model.n_heads=4 is not divisible by 8"),
    # batch not divisible by the data shards (data * fsdp = 8), also with accumulation
    ("--config.data.batch_size=4", "config.data.batch_size: 4 must be a positive multiple"),
    ("--config.optim.grad_accum_steps=3", "config.data.batch_size: 8 must be a positive"),
    # sequence lengths over the model's maximum (max_seq_len=16 in the tiny model)
    ("--config.data.max_length=17", "config.data.max_length: 17 exceeds the model's max_seq_len 16"),
    ("--config.model.overrides.max_seq_len=8", "config.data.max_length: 12 exceeds"),
    ("--config.data.max_prompt_length=12", "config.data.max_prompt_length"),
    # other values that cannot work, found inside the loop but before anything is written
    ("--config.model.overrides.vocab_size=16", "config.model: the tokenizer has 25 tokens"),
    ("--config.data.train_path=", "config.data.train_path: no training data given"),
    ("--config.data.train_path=toy:nope", "config.data.train_path: bad toy source"),
    ("--config.data.train_path=/nonexistent/pairs.jsonl", "config.data.train_path:"),
    ("--config.data.tokenizer=/nonexistent/tokenizer", "config.data.tokenizer: cannot load"),
    ("--config.init_from=/nonexistent/run", "config.init_from: /nonexistent/run is not"),
    ("--config.model.hf_path=/nonexistent/hf", "config.model.hf_path: cannot read"),
    ("--config.data.on_error=ignore", "config.data.on_error"),
    ("--config.checkpoint.every=0", "config.checkpoint.every"),
])
def test_bad_config_exits_2_with_one_line_compiles_and_writes_nothing(
    tmp_path, capsys, override, expected):
  workdir = tmp_path / "run"
  with compile_events() as events:
    status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                          "--noprogress", override)
  assert status == 2, err
  assert len(err) == 1 and err[0].startswith("jaxalign train: error: "), err
  assert "Traceback" not in err[0]
  assert expected in err[0], err[0]
  assert not events, f"compiled before failing: {events}"
  assert not workdir.exists()


def test_missing_config_file_exits_2_with_one_line(tmp_path, capsys):
  status, err = run_cli(capsys, "--config=/nonexistent/recipe.py",
                        f"--workdir={tmp_path / 'run'}", "--noprogress")
  assert status == 2, err
  assert err == ["jaxalign train: error: --config: [Errno 2] No such file or directory: "
                 "'/nonexistent/recipe.py'"], err
  assert not (tmp_path / "run").exists()
