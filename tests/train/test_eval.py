"""Completions for the demo's evaluation and data building (the KV-cache engine via
`eval.complete`) against a naive full-forward loop, and seeded sampling."""

import jax.numpy as jnp
from flax import nnx

from jaxalign.data import toy
from jaxalign.models import transformer
from jaxalign.train import eval as eval_lib, state as state_lib

CFG = transformer.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                              head_dim=8, d_ff=64, max_seq_len=24)


def _model():
  model = transformer.Transformer(CFG, rngs=nnx.Rngs(3))
  graphdef, params, frozen = state_lib.split_model(model)
  return model, graphdef, params, frozen


def _naive_greedy(model, tok, prompt, steps):
  ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
  out = []
  for _ in range(steps):
    x = jnp.asarray([ids])
    logits = model.logits(model(x, jnp.ones_like(x)))[0, -1]
    nxt = int(jnp.argmax(logits))
    if nxt == tok.eos_token_id:
      break
    ids.append(nxt)
    out.append(nxt)
  return tok.decode(out, skip_special_tokens=True)


def test_greedy_matches_a_naive_loop_and_ignores_batch_composition():
  model, graphdef, params, frozen = _model()
  tok = toy.build_tokenizer()
  prompts = ["1+2=", "45+67=", "9+90="]
  got = eval_lib.complete(graphdef, params, frozen, tok, prompts, max_new_tokens=6,
                          batch_size=4)
  assert got == [_naive_greedy(model, tok, p, 6) for p in prompts]
  alone = eval_lib.complete(graphdef, params, frozen, tok, prompts[1:2], max_new_tokens=6,
                            batch_size=4)
  assert alone == got[1:2]
  # Chunks of 2 (the last one padded by repeating a prompt) give the same text.
  assert eval_lib.complete(graphdef, params, frozen, tok, prompts, max_new_tokens=6,
                           batch_size=2) == got


def test_sampling_is_seeded():
  _, graphdef, params, frozen = _model()
  tok = toy.build_tokenizer()
  prompts = ["12+34="] * 8
  a = eval_lib.complete(graphdef, params, frozen, tok, prompts, max_new_tokens=5,
                        temperature=1.0, seed=0, batch_size=8)
  b = eval_lib.complete(graphdef, params, frozen, tok, prompts, max_new_tokens=5,
                        temperature=1.0, seed=0, batch_size=8)
  c = eval_lib.complete(graphdef, params, frozen, tok, prompts, max_new_tokens=5,
                        temperature=1.0, seed=1, batch_size=8)
  assert a == b and a != c
  assert len(set(a)) > 1  # rows of one batch draw different samples


def test_accuracy_is_the_fraction_the_checker_accepts():
  task = toy.ArithmeticTask(max_operand=99, ops=("+",), seed=0)
  prompts = ["1+2=", "3+4=", "5+5=", "9+0="]
  assert eval_lib.accuracy(["3", "7", "11", "9"], prompts, task.is_correct) == 0.75
