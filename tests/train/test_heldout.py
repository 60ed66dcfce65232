"""Held-out evaluation (data.eval_path, eval_every): train/heldout.py and step.eval_step.

- every data format: the eval set loaded by the loop's loader, batched by HeldOut and
  scored by the jitted eval step gives the metrics the train step reports for the
  same state and batch (the train step's metrics are those of the pre-update params);
- a short DPO run writes eval/* rows at eval_every and at the end, and its final
  eval/loss equals dpo_loss applied to log-probs of the eval set computed here with
  jaxalign.logprobs (policy: the run's final params; reference: the seed init);
- a wrong-format, missing or too small eval set, eval_every without one, and the
  removed mesh.axes exit 2 from the CLI naming the key, before any compile.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxalign import config as config_lib
from jaxalign import logprobs, sharding
from jaxalign.losses import dpo
from jaxalign.models import transformer
from jaxalign.train import build as build_lib, heldout, loop, rundir, state as state_lib
from jaxalign.data import reading
from tests.data.reference import list_examples
from tests.reliability.helpers import TINY_CLI_CONFIG, compile_events, run_cli
from tests.train.helpers import read_metrics, tiny_config, train_loop

# A loss per kind of batch -> (toy source of its format, extra config). Pairwise:
# OFS-DPO (two LoRA modules, a frozen base as reference); plain DPO is the run below.
# negatives (d2o) and ranked (aft) batch like groups (a group_mask, their own columns
# passed to the loss by name); left out to keep the file cheap.
FORMATS = {
    "sft": ("toy:sft?n=8&seed=5", {}),
    "bco": ("toy:unpaired?n=8&seed=5", {"loss.hparams": {"beta": 0.1}}),
    "kto": ("toy:unpaired?n=8&seed=5", {"loss.hparams": {"beta": 0.1}}),
    "grao": ("toy:groups?n=8&seed=5&g=3", {"loss.hparams": {"beta": 0.1}}),
    "ofs_dpo": ("toy:pairwise?n=8&seed=5", {
        "loss.hparams": {"alpha": 0.5, "swap_interval": 2}, "lora.rank": 2,
        "reference.mode": "frozen"}),
}


def _config(loss, **overrides):
  c = tiny_config(loss if loss == "sft" else "dpo")
  c.loss.name = loss
  source, extra = FORMATS.get(loss, ("toy:pairwise?n=8&seed=5", {}))
  extra = dict(extra)
  if "loss.hparams" in extra:
    c.loss.hparams = ml_collections.ConfigDict(extra.pop("loss.hparams"))
  c.data.eval_path = source
  return config_lib.apply_overrides(c, {**extra, **overrides})


@pytest.mark.parametrize("loss", list(FORMATS))
def test_eval_step_gives_the_train_steps_metrics_in_every_format(loss):
  # One device: the formats are the point here (the run below is sharded over 8).
  config = _config(loss, **{"mesh.shape": (1, 1, 1)})
  built = build_lib.build_config(config, jax.devices()[:1])
  run_spec, mesh = built.run_spec, built.mesh
  spec = run_spec.loss
  examples = loop.load_eval_set(run_spec, reading.load_tokenizer("toy"))
  rng = np.random.default_rng(0)
  if run_spec.precompute_ref:   # any reference column: both steps read the same one
    examples = [{**ex, "ref_logps": rng.normal(-20, 2, ex["tokens"].shape[0]).astype(np.float32)}
                for ex in examples]
  if spec.prepare is not None:
    examples = spec.prepare(examples, seed=0, prompt_embeddings=None)
  held = heldout.HeldOut(examples, built.eval_fn, batch_size=8,
                         batch_sharding=built.batch_sharding,
                         keep_blocks=spec.data == "unpaired_kl")
  host_batches = list(held.host_batches())
  assert len(host_batches) == held.num_batches == 1
  with jax.set_mesh(mesh):
    state = built.init_fn()   # eagerly: one compile fewer
    got = held.evaluate(state)
    batch = sharding.host_to_global(host_batches[0], built.batch_sharding)
    _, train_metrics = jax.device_get(built.step_fn(state, batch))
  assert got["eval/examples"] == 8
  assert "eval/loss" in got and "eval/grad_norm" not in got
  for key, value in got.items():
    if key != "eval/examples":
      np.testing.assert_allclose(value, train_metrics[key[len("eval/"):]], rtol=2e-5,
                                 atol=1e-6, err_msg=key)


def test_a_run_logs_eval_rows_and_the_loss_of_the_eval_sets_logps(tmp_path):
  config = _config("dpo", total_steps=3, eval_every=2, log_every=3)
  config.data.eval_path = "toy:pairwise?n=16&seed=7"     # two eval batches of 8
  result = train_loop(config, str(tmp_path), progress=False)
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [2, 3]
  assert set(rows[0]) == {"step"} | {k for k in rows[1] if k.startswith("eval/")}
  assert "loss" in rows[1] and "eval/rewards/accuracies" in rows[1]
  assert rows[1]["eval/examples"] == 16
  assert (tmp_path / heldout.REF_FILE).exists()

  # Independently: the eval set's log-probs under the final policy and the seed init.
  tok = reading.load_tokenizer("toy")
  examples, _ = list_examples(config.data.eval_path, "pairwise", tok, split="train",
                              max_length=12, max_prompt_length=8, on_error="raise")
  cols = {k: jnp.asarray(np.stack([ex[k] for ex in examples]).reshape(32, 12))
          for k in ("tokens", "attention_mask", "loss_mask")}

  @jax.jit
  def seq_logps(params, frozen):
    sums, _ = logprobs.sequence_logps(nnx.merge(graphdef, params, frozen), cols["tokens"],
                                      cols["attention_mask"], cols["loss_mask"],
                                      chunk_size=8192)
    return sums.reshape(16, 2)

  graphdef, params, frozen = rundir.load_run_params(str(tmp_path), config)
  params, frozen = jax.device_get((params, frozen))   # one device, no mesh
  policy = np.asarray(seq_logps(params, frozen))
  _, ref_params, ref_frozen = state_lib.split_model(
      transformer.Transformer(config_lib.model_config(config), rngs=nnx.Rngs(config.seed)))
  ref = np.asarray(seq_logps(ref_params, ref_frozen))
  np.testing.assert_allclose(np.load(tmp_path / heldout.REF_FILE), ref, rtol=1e-5)
  loss, metrics = dpo.dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.1)
  assert result.last_metrics["eval/loss"] == rows[1]["eval/loss"]
  np.testing.assert_allclose(rows[1]["eval/loss"], loss, rtol=1e-5)
  for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/rejected"):
    np.testing.assert_allclose(rows[1][f"eval/{key}"], metrics[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  assert rows[1]["eval/loss"] != pytest.approx(np.log(2.0))   # the policy did move


@pytest.mark.parametrize("override, expected", [
    ("--config.data.eval_path=toy:sft?n=16",
     "config.data.eval_path: not usable as 'pairwise' data for loss 'dpo'"),
    ("--config.data.eval_path=toy:pairwise?n=4",
     "config.data.eval_path: 4 usable examples make no batch of data.batch_size=8"),
    ("--config.data.eval_path=/no/such/file.jsonl", "config.data.eval_path: not usable"),
    ("--config.eval_every=2", "config.eval_every: evaluates on a held-out set"),
    ("--config.mesh.axes=('data','fsdp','tensor')", "--config.mesh.axes: unknown config key"),
])
def test_a_bad_eval_config_exits_2_naming_the_key_before_any_compile(
    tmp_path, capsys, override, expected):
  workdir = tmp_path / "run"
  with compile_events() as events:
    status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                          "--noprogress", override)
  assert status == 2 and len(err) == 1 and expected in err[0], err
  assert not events, f"compiled before failing: {events}"
  assert not workdir.exists()


def test_eval_keys_are_checked_and_mesh_axes_is_gone(caplog):
  c = _config("dpo", eval_every=2)
  c.data.eval_path = ""
  with pytest.raises(config_lib.ConfigError, match="config.eval_every: .*data.eval_path"):
    config_lib.validate(c, 8)
  c.eval_every = -1
  with pytest.raises(config_lib.ConfigError, match="config.eval_every"):
    config_lib.validate(c, 8)
  assert "axes" not in config_lib.defaults().mesh
  # A config saved by an earlier version still carries the fixed axes: accepted, with a line.
  old = tiny_config()
  old.mesh.axes = sharding.LEGACY_MESH_AXES   # (data, fsdp, tensor): before the context axis
  config_lib.validate(old, 8)
  assert "mesh.axes is deprecated" in caplog.text
  old.mesh.axes = ("fsdp", "data", "tensor")
  with pytest.raises(config_lib.ConfigError, match="config.mesh.axes"):
    config_lib.validate(old, 8)
