"""The parameters a run starts from are checked at validation, from headers and saved
configs alone: a broken `model.hf_path` (a truncated safetensors file, config.json
disagreeing with the weights) and an `init_from` checkpoint of another model are
one line, exit 2, before anything is compiled or written."""

import json
import os

import ml_collections
import numpy as np
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign.models import hf
from tests.reliability.helpers import RECIPES, compile_events, run_cli
from tests.train.helpers import tiny_config

# The tiny test model's shapes (tests/train/helpers.py) as a Llama config.json.
_LLAMA = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=16)


def _hf_dir(path, *, sharded: bool = False) -> str:
  """A Llama checkpoint saved by transformers (its two layers in 4 shards when `sharded`)."""
  LlamaForCausalLM(LlamaConfig(**_LLAMA)).save_pretrained(
      str(path), max_shard_size="8KB" if sharded else "1GB")
  return str(path)


def _hf_config(hf_dir: str) -> ml_collections.ConfigDict:
  config = tiny_config()
  config.model.overrides = ml_collections.ConfigDict()   # every field from config.json
  config.model.hf_path = hf_dir
  return config


def _truncate(file: str, keep: int) -> None:
  with open(file, "r+b") as f:
    f.truncate(keep)


def _header_and_data_start(file: str):
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(n)), 8 + n


@pytest.mark.parametrize("sharded", [False, True])
def test_a_whole_checkpoint_passes_and_its_headers_are_read(tmp_path, sharded):
  # Positive control: what transformers writes passes, single file or shards.
  hf_dir = _hf_dir(tmp_path / "hf", sharded=sharded)
  assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")) == sharded
  config = _hf_config(hf_dir)
  model_cfg, _ = config_lib.validate(config, 8)
  hf.check_weights(hf_dir, model_cfg)
  files = [f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]
  shapes = {k: v[1] for f in files for k, v in hf.read_header(os.path.join(hf_dir, f)).items()}
  assert shapes["model.layers.1.mlp.gate_proj.weight"] == (64, 32)   # [F, D]
  assert shapes["model.embed_tokens.weight"] == (32, 32)             # [V, D]


@pytest.mark.parametrize("sharded", [False, True])
def test_a_weights_file_truncated_mid_tensor_is_named_at_validation(tmp_path, sharded):
  hf_dir = _hf_dir(tmp_path / "hf", sharded=sharded)
  file = os.path.join(hf_dir, sorted(f for f in os.listdir(hf_dir)
                                     if f.endswith(".safetensors"))[-1])
  header, data_start = _header_and_data_start(file)
  name, last = max(((k, v) for k, v in header.items() if k != "__metadata__"),
                   key=lambda kv: kv[1]["data_offsets"][1])
  begin, end = last["data_offsets"]
  size = data_start + (begin + end) // 2   # the file ends inside its last tensor
  _truncate(file, size)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_hf_config(hf_dir), 8)
  assert str(e.value) == (f"config.model.hf_path: {file}: truncated: tensor {name!r} ends at "
                          f"byte {data_start + end}, the file has {size} bytes")

  _truncate(file, 5)   # not even the header's length
  with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.hf_path: .*: truncated, "
                     r"or not a safetensors file \(5 bytes\): its header does not fit$"):
    config_lib.validate(_hf_config(hf_dir), 8)


def test_config_json_disagreeing_with_the_weights_names_the_tensor_and_both_shapes(tmp_path):
  hf_dir = _hf_dir(tmp_path / "hf")
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf_cfg = json.load(f)
  hf_cfg["intermediate_size"] = 48
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_hf_config(hf_dir), 8)
  assert str(e.value) == (
      f"config.model.hf_path: {hf_dir}/model.safetensors: tensor "
      "'model.layers.0.mlp.gate_proj.weight' has shape (64, 32), but the model config "
      "wants (48, 32)")

  hf_cfg.update(intermediate_size=64, num_hidden_layers=3)   # a layer the weights lack
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f)
  with pytest.raises(config_lib.ConfigError, match=r"^config\.model\.hf_path: .*: missing "
                     r"tensor 'model\.layers\.2\.self_attn\.q_proj\.weight'$"):
    config_lib.validate(_hf_config(hf_dir), 8)


def test_a_shard_the_index_lists_but_is_absent_is_named(tmp_path):
  hf_dir = _hf_dir(tmp_path / "hf", sharded=True)
  with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(os.path.join(hf_dir, shard))
  with pytest.raises(config_lib.ConfigError, match=rf"^config\.model\.hf_path: .*index\.json: "
                     rf"lists {shard}, which is not in {hf_dir}$"):
    config_lib.validate(_hf_config(hf_dir), 8)


def test_a_truncated_hf_path_exits_2_in_one_line_before_anything_is_written(tmp_path, capsys):
  hf_dir = _hf_dir(tmp_path / "hf")
  file = os.path.join(hf_dir, "model.safetensors")
  _truncate(file, os.path.getsize(file) - 100)
  capsys.readouterr()   # transformers' "Writing model shards" bar
  workdir = tmp_path / "run"
  # The recipe's overrides are the checkpoint's own shapes but for n_layers.
  with compile_events() as events:
    status, err = run_cli(capsys, f"--config={RECIPES}", f"--workdir={workdir}", "--noprogress",
                          f"--config.model.hf_path={hf_dir}",
                          "--config.model.overrides.n_layers=2")
  assert status == 2, err
  assert len(err) == 1 and err[0].startswith(
      f"jaxalign train: error: config.model.hf_path: {file}: truncated: tensor "), err
  assert not events and not workdir.exists()


def _saved_run(path, config: ml_collections.ConfigDict) -> str:
  """A run directory whose one checkpoint (step 3) was saved with `config`: the
  validation reads only the config, so a stand-in state is enough."""
  checkpointer = ckpt.Checkpointer(os.path.join(path, "checkpoints"), every=1, keep=1,
                                   async_save=False)
  checkpointer.save(3, {"params": {"w": np.zeros(2, np.float32)}}, None, config.to_dict(),
                    force=True)
  checkpointer.close()
  return str(path)


def test_an_init_from_checkpoint_of_another_model_names_the_fields_that_differ(tmp_path):
  # Saved with a wider model and a longer context: only the width decides the shapes.
  wide = _saved_run(tmp_path / "wide", tiny_config(
      "sft", **{"model.overrides.d_model": 64, "model.overrides.max_seq_len": 32}))
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(tiny_config(init_from=wide), 8)
  assert str(e.value) == (
      f"config.init_from: {wide} (step 3) holds a model of another shape: model.d_model 64 "
      "-> 32 (its checkpoint -> this run); start from a checkpoint of this model, or set the "
      "model to match it")

  # The same shapes under another context length, dtype and objective: accepted.
  same = _saved_run(tmp_path / "same", tiny_config(
      "sft", **{"model.overrides.max_seq_len": 32, "model.overrides.dtype": "bfloat16"}))
  config_lib.validate(tiny_config(init_from=same), 8)
  # ...and a run directory's checkpoints/ or the directory itself both work.
  config_lib.validate(tiny_config(init_from=os.path.join(same, "checkpoints")), 8)

  unscanned = _saved_run(tmp_path / "unscanned", tiny_config(**{"model.scan_layers": False}))
  with pytest.raises(config_lib.ConfigError, match=r"model\.scan_layers False -> True \(its"):
    config_lib.validate(tiny_config(init_from=unscanned, **{"model.scan_layers": True}), 8)
  # scan_layers="auto" (the default) takes the source's layout (train/resume.py).
  config_lib.validate(tiny_config(init_from=unscanned), 8)


def test_an_init_from_that_holds_no_model_is_refused(tmp_path):
  adapters = _saved_run(tmp_path / "lora", tiny_config(**{"lora.rank": 4}))
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(tiny_config(init_from=adapters), 8)
  assert str(e.value) == (
      f"config.init_from: {adapters} (step 3) holds LoRA adapters (lora.rank=4), not a "
      f"model's parameters; `jaxalign export --checkpoint {adapters}` merges them into a "
      "model to start from with model.hf_path")
  rm = tiny_config()
  rm.loss.name, rm.loss.hparams = "reward_model", ml_collections.ConfigDict()
  scorer = _saved_run(tmp_path / "rm", rm)
  with pytest.raises(config_lib.ConfigError, match=r"holds a reward model \(loss "
                     r"'reward_model'\), not a model's parameters$"):
    config_lib.validate(tiny_config(init_from=scorer), 8)
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(config_lib.ConfigError, match=r"^config\.init_from: .*empty holds no "
                     r"complete checkpoint to start from$"):
    config_lib.validate(tiny_config(init_from=str(tmp_path / "empty")), 8)


def test_init_from_gives_the_weights_so_hf_path_needs_only_its_config(tmp_path):
  # model.hf_path for the architecture, init_from for the weights: no safetensors needed.
  hf_dir = tmp_path / "hf"
  LlamaConfig(**_LLAMA).save_pretrained(str(hf_dir))
  config = _hf_config(str(hf_dir))
  with pytest.raises(config_lib.ConfigError, match=r"no model\.safetensors"):
    config_lib.validate(config, 8)
  source = _hf_config(str(hf_dir))
  config.init_from = _saved_run(tmp_path / "sft", source)
  config_lib.validate(config, 8)


def test_an_init_from_of_another_shape_exits_2_in_one_line_before_anything_is_written(
    tmp_path, capsys):
  wide = _saved_run(tmp_path / "wide", tiny_config("sft", **{"model.overrides.n_heads": 2,
                                                              "model.overrides.head_dim": 16}))
  workdir = tmp_path / "run"
  with compile_events() as events:
    status, err = run_cli(capsys, f"--config={RECIPES}", f"--workdir={workdir}", "--noprogress",
                          f"--config.init_from={wide}")
  assert status == 2, err
  assert err == [f"jaxalign train: error: config.init_from: {wide} (step 3) holds a model of "
                 "another shape: model.n_heads 2 -> 4, model.head_dim 16 -> 8 (its checkpoint "
                 "-> this run); start from a checkpoint of this model, or set the model to "
                 "match it"], err
  assert not events and not workdir.exists()
