"""The tokenizer traps of a real checkpoint: a recipe's tokenizer that is not the
checkpoint's own is refused unless deliberate, special ids must fit the model, and
text prompts get a BOS only when the tokenizer itself adds one (as transformers and
TRL tokenize them)."""


import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from jaxalign import config as config_lib
from jaxalign.data import tokenize
from jaxalign.data import reading
from tests.reliability.helpers import RECIPES, run_cli
from tests.train.helpers import tiny_config

WORDS = ["the", "cat", "sat", "ran", "on", "mat", "a", "dog"]


def _tokenizer(directory, *, adds_bos: bool, eos_id: int = 2):
  """A word-level tokenizer built locally; with `adds_bos` its post-processor adds
  <s> (Llama's way), else it has a BOS token it never adds (a chat marker, as
  SmolLM's <|im_start|>)."""
  specials = {"<pad>": 0, "<s>": 1, "</s>": eos_id, "<unk>": 3, "<|im_start|>": 4}
  vocab = {**specials, **{w: 5 + i for i, w in enumerate(WORDS)}}
  backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  backend.add_special_tokens(list(specials))
  if adds_bos:
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token="<s>" if adds_bos else "<|im_start|>",
      eos_token="</s>", pad_token="<pad>", unk_token="<unk>").save_pretrained(str(directory))
  return AutoTokenizer.from_pretrained(str(directory))   # as jaxalign loads it


@pytest.mark.parametrize("adds_bos", [True, False])
def test_text_prompt_is_tokenized_as_the_tokenizer_itself_does(tmp_path, adds_bos):
  tok = _tokenizer(tmp_path, adds_bos=adds_bos)
  record = {"prompt": "the cat", "chosen": "sat on a mat", "rejected": "ran"}
  ex = tokenize.tokenize_example(record, "pairwise", tok,
                                 tokenize.TokenizeConfig(max_length=12, max_prompt_length=6))
  prompt = tok(record["prompt"])["input_ids"]          # transformers' own rendering
  assert (prompt[0] == tok.bos_token_id) == adds_bos
  for s, field in enumerate(("chosen", "rejected")):
    response = tok(record[field], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = int(ex["attention_mask"][s].sum())
    assert ex["tokens"][s, :n].tolist() == prompt + response
    assert ex["loss_mask"][s].tolist() == [0] * len(prompt) + [1] * len(response) + [0] * (12 - n)


def _hf_dir(tmp_path):
  """A Hugging Face checkpoint directory (config.json, weights and its own tokenizer;
  the refusal comes before any weight is read, after their headers are checked)."""
  hf = tmp_path / "hf"
  LlamaForCausalLM(LlamaConfig(
      vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
      max_position_embeddings=16)).save_pretrained(str(hf))
  _tokenizer(hf, adds_bos=False)
  return hf


def test_recipe_tokenizer_that_is_not_the_checkpoints_is_refused(tmp_path, capsys):
  hf = _hf_dir(tmp_path)   # the recipe keeps data.tokenizer="toy"
  capsys.readouterr()      # transformers' "Writing model shards" bar
  status, err = run_cli(capsys, f"--config={RECIPES}", f"--workdir={tmp_path / 'run'}",
                        "--noprogress", f"--config.model.hf_path={hf}")
  assert status == 2, err
  assert err == [f"jaxalign train: error: config.data.tokenizer: 'toy' is not the tokenizer of "
                 f"config.model.hf_path='{hf}' (25 vs 13 tokens); clear data.tokenizer to use "
                 "the checkpoint's own, or set config.data.allow_other_tokenizer=True if the "
                 "choice is deliberate"], err
  assert not (tmp_path / "run").exists()


def test_the_checkpoints_own_tokenizer_or_a_deliberate_other_one_passes(tmp_path):
  hf = _hf_dir(tmp_path)
  config = tiny_config()
  config.model.hf_path = str(hf)
  toy = reading.load_tokenizer("toy")
  with pytest.raises(config_lib.ConfigError, match=r"^config\.data\.tokenizer: 'toy' is not"):
    reading.check_tokenizer(toy, config, 32, str(hf))
  config.data.allow_other_tokenizer = True
  reading.check_tokenizer(toy, config, 32, str(hf))
  config.data.allow_other_tokenizer = False
  copy = tmp_path / "copy"                      # the same tokenizer under another path
  reading.load_tokenizer(str(hf)).save_pretrained(str(copy))
  config.data.tokenizer = str(copy)
  reading.check_tokenizer(reading.load_tokenizer(str(copy)), config, 32, str(hf))
  config.data.tokenizer = ""                     # the default: the checkpoint's own
  reading.check_tokenizer(reading.load_tokenizer(str(hf)), config, 32, str(hf))


def test_special_token_ids_must_fit_the_model_vocabulary(tmp_path):
  tok = _tokenizer(tmp_path, adds_bos=True, eos_id=40)   # 13 tokens, EOS at id 40
  config = tiny_config()
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config\.data\.tokenizer: special token '</s>' has id 40, outside "
                     r"the model's vocabulary of 32"):
    reading.check_tokenizer(tok, config, 32)
  reading.check_tokenizer(tok, config, 41)
