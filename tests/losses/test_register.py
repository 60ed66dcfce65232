"""Losses a researcher writes in their own file: `jaxalign.losses.register`, names
of the form "path/to/file.py:function" / "package.module:function", keyword binding
for every data format, and the errors a bad name gives before anything compiles."""

import functools
import inspect
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest

from jaxalign import config as config_lib
from jaxalign import losses, sharding
from jaxalign.train import build as build_lib, step as step_lib
from tests.reliability.helpers import TINY_CLI_CONFIG, compile_events, run_cli
from tests.train.helpers import built_state, random_batch, tiny_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DPOP = f"{REPO_ROOT}/losses/dpo_positive.py:dpo_positive_loss"


# --- step level: the prototype against built-in DPO and its own formula -----------

def _config(loss_name: str = "dpo", hparams: dict | None = None):
  """The tiny recipe on one device (quick compiles) with a frozen reference."""
  cfg = tiny_config(**{"mesh.shape": (1, 1, 1), "reference.mode": "frozen",
                       "optim.warmup_steps": 1, "total_steps": 10, "logprob_chunk_size": 16})
  cfg.loss.name = loss_name
  if hparams is not None:
    cfg.loss.hparams = ml_collections.ConfigDict(hparams)
  return cfg


def _state_with_other_reference():
  """A tiny model's train state whose reference differs from the policy."""
  built, state = built_state(_config(), jax.devices()[:1])

  def perturb(tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(treedef, [p + 0.3 * jax.random.normal(k, p.shape, p.dtype)
                                        for p, k in zip(leaves, keys)])
  with jax.set_mesh(built.mesh):
    state = state.replace(ref_params=jax.jit(perturb)(state.ref_params))
  return built.mesh, built.graphdef, state


@pytest.fixture(scope="module")
def other_reference():
  return _state_with_other_reference()


def _step(state, loss_name, hparams, batch):
  """(new params, metrics) of one train step of the recipe with this loss from `state`."""
  built = build_lib.build_config(_config(loss_name, hparams), jax.devices()[:1])
  with jax.set_mesh(built.mesh):
    new_state, metrics = built.step_fn(jax.tree.map(jnp.copy, state),
                                       sharding.host_to_global(batch, built.batch_sharding))
  return jax.device_get(new_state.params), jax.device_get(metrics)


def test_dpo_positive_with_lam_zero_is_builtin_dpo_at_step_level(other_reference):
  mesh, graphdef, state = other_reference
  batch = random_batch(np.random.default_rng(3))
  for eps in (0.1,):   # cDPO smoothing included: any eps gives the same z-function
    p_ref, m_ref = _step(state, "dpo", {"beta": 0.1, "label_smoothing": eps}, batch)
    p_new, m_new = _step(state, DPOP, {"beta": 0.1, "lam": 0.0, "label_smoothing": eps}, batch)
    assert abs(float(m_ref["rewards/margins"])) > 1e-3   # the reference really differs
    np.testing.assert_allclose(m_new["loss"], m_ref["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_new["grad_norm"], m_ref["grad_norm"], rtol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"):
      np.testing.assert_allclose(m_new[key], m_ref[key], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_new)):
      np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_dpo_positive_penalty_matches_the_paper_formula(other_reference):
  mesh, graphdef, state = other_reference
  # The noisy weights as the policy: it scores the chosen responses below the reference.
  state = state.replace(params=state.ref_params, ref_params=state.params)
  batch = random_batch(np.random.default_rng(4))
  logps = jax.jit(functools.partial(step_lib.batch_logps_only, graphdef, chunk_size=16))
  with jax.set_mesh(mesh):
    pol = np.asarray(logps(state.params, state.frozen, batch), np.float64)
    ref = np.asarray(logps(state.ref_params, state.frozen, batch), np.float64)
  beta, lam = 0.1, 5.0
  # Pal et al. 2024 eq. 3, in float64 NumPy.
  z = beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
              - lam * np.maximum(0.0, ref[:, 0] - pol[:, 0]))
  expected = np.mean(np.log1p(np.exp(-z)))
  assert np.any(ref[:, 0] > pol[:, 0])           # the penalty is active for some pairs
  _, m = _step(state, DPOP, {"beta": beta, "lam": lam}, batch)
  np.testing.assert_allclose(m["loss"], expected, rtol=1e-5)
  dpo_value = np.mean(np.log1p(np.exp(-beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])))))
  assert float(m["loss"]) > dpo_value + 1e-4     # the penalty changed the loss


# --- keyword binding for every data format ------------------------------------------

class _Captured(Exception):
  pass


def _inputs(data, *, with_ref=True, b=4):
  s = {"sft": 1, "pairwise": 2, "unpaired": 1, "unpaired_kl": 2}.get(data, 4)
  rng = np.random.default_rng(0)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  g = (b, s - 1)
  batch = {"label": jnp.asarray([1, 0, 1, 0]), "group_mask": jnp.ones(g, jnp.int32),
           "rewards": f(*g), "answer_rewards": f(b), "udm_weights": f(b), "margin": f(b),
           "labels": jnp.asarray(rng.integers(0, 2, g)),
           "ranks": jnp.asarray(rng.integers(1, 3, g))}
  return losses.LossInputs(logps=f(b, s), ref_logps=f(b, s) if with_ref else None,
                           lengths=jnp.asarray(rng.integers(1, 9, (b, s))), batch=batch)


_BUILTIN_OF_FORMAT = {"sft": "sft", "pairwise": "dpo", "unpaired": "apo_zero_unpaired",
                      "unpaired_kl": "kto", "negatives": "d2o", "groups": "grao",
                      "ranked": "aft"}


def test_every_format_has_a_builtin_to_check_against():
  assert set(_BUILTIN_OF_FORMAT) == set(losses.FORMATS)
  for data, name in _BUILTIN_OF_FORMAT.items():
    assert losses.get(name).data == data


@pytest.mark.parametrize("data", sorted(_BUILTIN_OF_FORMAT))
def test_keyword_names_bind_what_the_builtin_adapter_passes(data):
  # The built-in adapters pass arrays by position; the keyword table must give the
  # same array under the same argument name (sequence order per format).
  spec = losses.get(_BUILTIN_OF_FORMAT[data])
  sig = inspect.signature(spec.fn)

  def recorder(*args, **kwargs):
    raise _Captured(sig.bind(*args, **kwargs).arguments)
  recorder.__signature__ = sig
  x = _inputs(data)
  with pytest.raises(_Captured) as got:
    spec.call(recorder, x, None)
  passed = {k: v for k, v in got.value.args[0].items() if v is not None}
  arrays = losses.keyword_arrays(data, x)
  shared = set(passed) & set(arrays)
  assert len(shared) >= 2, (passed.keys(), arrays.keys())
  for name in shared:
    np.testing.assert_array_equal(np.asarray(arrays[name]), np.asarray(passed[name]), name)
  assert set(losses.keyword_names(data, with_ref=True)) == set(arrays)


@pytest.mark.parametrize("data", sorted(_BUILTIN_OF_FORMAT))
def test_a_reference_free_user_loss_works_for_every_format(data):
  names = [n for n in losses.keyword_names(data, with_ref=False)
           if n not in ("margin", "answer_rewards", "has_reference")]
  params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
  params.append(inspect.Parameter("scale", inspect.Parameter.KEYWORD_ONLY, default=1.0))

  def fn(*args, **kwargs):
    bound = inspect.signature(fn).bind(*args, **kwargs).arguments
    scale = bound.pop("scale", 1.0)
    total = sum(jnp.sum(jnp.asarray(v, jnp.float32)) for v in bound.values())
    return scale * total, {"n": jnp.float32(len(bound))}
  fn.__signature__ = inspect.Signature(params)
  fn.__name__ = fn.__qualname__ = f"free_{data}"
  spec = losses.register(fn, data=data, needs_ref=False)
  assert spec is fn and not fn.loss_spec.needs_ref
  x = _inputs(data, with_ref=False)
  loss, metrics, _ = fn.loss_spec.call(fn, x, None, scale=2.0)
  arrays = losses.keyword_arrays(data, x)
  expected = 2.0 * sum(float(np.sum(np.asarray(arrays[n], np.float32))) for n in names)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert int(metrics["n"]) == len(names)
  assert not any(k.startswith("ref_") for k in arrays)


# --- what register refuses ----------------------------------------------------------

def test_register_refuses_a_builtin_name_and_unfeedable_signatures():
  def f(chosen_logps, rejected_logps, *, beta=0.1):
    return (chosen_logps - rejected_logps).mean(), {}
  with pytest.raises(ValueError, match="'dpo' is a built-in loss"):
    losses.register(f, data="pairwise", needs_ref=False, name="dpo")
  with pytest.raises(ValueError, match="data format must be one of"):
    losses.register(f, data="pairs")
  with pytest.raises(ValueError, match="ranges names 'gamma'"):
    losses.register(f, data="pairwise", needs_ref=False, ranges={"gamma": "(0, 1)"})
  with pytest.raises(ValueError, match="bad interval"):
    losses.register(f, data="pairwise", needs_ref=False, ranges={"beta": "0 to 1"})

  def g(chosen_logps, ref_chosen_logps):
    return chosen_logps.mean(), {}
  with pytest.raises(ValueError, match="needs_ref=False"):
    losses.register(g, data="pairwise", needs_ref=False)

  def h(chosen_logps, chosen_logp):
    return chosen_logps.mean(), {}
  with pytest.raises(ValueError, match="'chosen_logp' is not a pairwise column"):
    losses.register(h, data="pairwise")


def test_a_loss_must_return_loss_and_metrics():
  @losses.register(data="sft", needs_ref=False, name="test_register_bare_scalar")
  def bare(logps, lengths):
    return -logps.sum() / lengths.sum()
  with pytest.raises(ValueError, match=r"must return \(loss, metrics\)"):
    bare.loss_spec.call(bare, _inputs("sft", with_ref=False), None)


# --- names, paths and config errors -------------------------------------------------

_REF_FREE = '''
import jax.numpy as jnp
from jaxalign.losses import register
from jaxalign.train import build as build_lib

@register(data="pairwise", needs_ref=False, ranges={"gamma": "[0, inf)"})
def margin_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *,
                gamma: float = 0.5):
  z = chosen_logps / chosen_lengths - rejected_logps / rejected_lengths - gamma
  return jnp.mean(jnp.logaddexp(0.0, -z)), {"margin": jnp.mean(z)}
'''


def test_a_relative_path_is_recorded_absolute_and_an_absolute_one_loads_from_anywhere(
    tmp_path, monkeypatch):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "margin.py").write_text(_REF_FREE)
  monkeypatch.chdir(tmp_path)
  c = tiny_config()
  c.loss.name = "mine/margin.py:margin_loss"
  c.loss.hparams = type(c.loss.hparams)(dict(gamma=0.2))
  config_lib.validate(c, jax.device_count())
  assert c.loss.name == f"{tmp_path}/mine/margin.py:margin_loss"
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  config_lib.validate(c, jax.device_count())       # idempotent, from another cwd
  spec = losses.get(c.loss.name)
  assert spec.name == "margin_loss" and not spec.needs_ref
  assert losses.get(c.loss.name) is spec           # one import per file version


def test_a_module_name_loads_the_loss_too(tmp_path, monkeypatch):
  pkg = tmp_path / "mylosses_pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "margin.py").write_text(_REF_FREE.replace("margin_loss", "module_margin_loss"))
  monkeypatch.syspath_prepend(str(tmp_path))
  c = tiny_config()
  c.loss.name = "mylosses_pkg.margin:module_margin_loss"
  c.loss.hparams = type(c.loss.hparams)()
  config_lib.validate(c, jax.device_count())
  assert c.loss.name == "mylosses_pkg.margin:module_margin_loss"   # recorded as given


def test_user_loss_hparam_ranges_are_checked_before_compiling():
  c = tiny_config()
  c.loss.name = DPOP
  c.loss.hparams = type(c.loss.hparams)(dict(beta=0.1, lam=-1.0))
  with pytest.raises(config_lib.ConfigError, match=r"config.loss.hparams.lam: must be in "
                     r"\[0, inf\)"):
    config_lib.validate(c, jax.device_count())
  c.loss.hparams = type(c.loss.hparams)(dict(beta=0.1, gamma=1.0))
  with pytest.raises(config_lib.ConfigError, match="config.loss.hparams.gamma: not a "
                     "hyperparameter"):
    config_lib.validate(c, jax.device_count())


def _bad_files(tmp):
  (tmp / "syntax.py").write_text("from jaxalign.losses import register\ndef f(:\n  pass\n")
  (tmp / "plain.py").write_text("def f(chosen_logps, rejected_logps):\n  return 0.0, {}\n")
  (tmp / "raises.py").write_text("import no_such_package_xyz\n")
  (tmp / "taken.py").write_text(
      "from jaxalign.losses import register\n"
      "@register(data='pairwise', needs_ref=False, name='simpo')\n"
      "def f(chosen_logps, rejected_logps):\n  return 0.0, {}\n")
  # Registered fine, wrong when called (issue 30 item 7): found by tracing, before training.
  head = ("import jax.numpy as jnp\nfrom jaxalign.losses import register\n"
          "@register(data='pairwise', needs_ref=True)\n"
          "def {}(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, "
          "beta=0.1, label_smoothing=0.0):\n"
          "  z = beta * (chosen_logps - ref_chosen_logps - rejected_logps + ref_rejected_logps)\n")
  for stem, result in (("vector", "jnp.logaddexp(0.0, -z), {}"),     # a [B] loss
                       ("bare", "jnp.logaddexp(0.0, -z).mean()"),    # no metrics
                       ("body", "-jnp.log_sigmod(z).mean(), {}"),    # a typo in the body
                       ("metric", "jnp.logaddexp(0.0, -z).mean(), {'z': z}")):  # a [B] metric
    (tmp / f"{stem}.py").write_text(head.format(f"{stem}_loss") + f"  return {result}\n")


@pytest.mark.parametrize("name, expected", [
    ("{tmp}/missing.py:f", "no such file {tmp}/missing.py"),
    ("{tmp}/plain.py:g", "has no function 'g'"),
    ("{tmp}/plain.py:f", "f is not a registered loss"),
    ("{tmp}/syntax.py:f", "{tmp}/syntax.py:2: "),
    ("{tmp}/raises.py:f", "ModuleNotFoundError: No module named 'no_such_package_xyz'"),
    ("{tmp}/taken.py:f", "'simpo' is a built-in loss"),
    ("no_such_module_xyz.losses:f", "cannot import module 'no_such_module_xyz.losses'"),
    ("dpo_positive", "unknown loss 'dpo_positive'"),
    ("{tmp}/vector.py:vector_loss", "'{tmp}/vector.py:vector_loss' returns a loss of shape "
                                    "(8,); it must be a scalar"),
    ("{tmp}/bare.py:bare_loss", "returns an array of shape (); it must return (loss, metrics)"),
    ("{tmp}/body.py:body_loss", "fails when traced on an abstract pairwise batch (B=8): "
                        "AttributeError: module 'jax.numpy' has no attribute 'log_sigmod' "
                        "(at {tmp}/body.py:6)"),
    ("{tmp}/metric.py:metric_loss", "returns metric 'z' of shape (8,); every metric must "
                                    "be a scalar"),
])
def test_a_bad_loss_name_exits_2_with_one_line_before_compiling(tmp_path, capsys, name,
                                                                expected):
  _bad_files(tmp_path)
  workdir = tmp_path / "run"
  with compile_events() as events:
    status, err = run_cli(capsys, f"--config={TINY_CLI_CONFIG}", f"--workdir={workdir}",
                          "--noprogress", f"--config.loss.name={name.format(tmp=tmp_path)}")
  assert status == 2, err
  assert len(err) == 1 and err[0].startswith("jaxalign train: error: config.loss.name: "), err
  assert expected.format(tmp=tmp_path) in err[0], err[0]
  assert not events and not workdir.exists()


def test_losses_folder_is_neither_installed_nor_collected():
  import tomllib
  import setuptools
  meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
  include = meta["tool"]["setuptools"]["packages"]["find"]["include"]
  found = setuptools.find_namespace_packages(str(REPO_ROOT), include=include)
  assert "jaxalign.losses" in found and not [p for p in found if p.split(".")[0] == "losses"]
  assert meta["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
  assert not [p for p in os.listdir(REPO_ROOT / "losses") if p.startswith("test_")]


def test_the_readme_example_is_a_working_loss(tmp_path):
  # losses/README.md's example, run as written: it is cDPO, so it equals built-in dpo.
  text = (REPO_ROOT / "losses" / "README.md").read_text()
  code = text.split("```python\n", 1)[1].split("```", 1)[0]
  (tmp_path / "my_loss.py").write_text(code)
  spec = losses.get(f"{tmp_path}/my_loss.py:my_loss")
  assert spec.hparam_bounds == {"beta": "(0, inf)", "label_smoothing": "[0, 0.5)"}
  x = _inputs("pairwise")
  got, _, _ = spec.call(spec.fn, x, None, beta=0.3, label_smoothing=0.1)
  dpo = losses.get("dpo")
  want, _, _ = dpo.call(dpo.fn, x, None, beta=0.3, label_smoothing=0.1)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


# --- register's extensions: state, prepared columns, LoRA modules, a scalar head ------

def test_stateful_prepared_modules_and_scalar_head_losses_bind_by_name():
  b = 3
  x = losses.LossInputs(logps=jnp.arange(4 * b, dtype=jnp.float32).reshape(b, 4),
                        ref_logps=jnp.full((b, 2), 0.5), lengths=jnp.ones((b, 2), jnp.int32),
                        batch={"weights_col": jnp.asarray([1.0, 2.0, 3.0])})

  @losses.register(data="pairwise", name="test_register_modules", modules=("a", "b"),
                   init_state=lambda: jnp.zeros(()),
                   prepared_columns={"weights_col": ((), jnp.float32)})
  def two_modules(a_chosen_logps, b_rejected_logps, ref_chosen_logps, weights_col, *, state):
    loss = jnp.mean(weights_col * (a_chosen_logps + b_rejected_logps - ref_chosen_logps))
    return loss, {}, state + 1
  spec = two_modules.loss_spec
  assert {"a_chosen_logps", "b_rejected_logps", "weights_col"} <= set(spec.argument_names())
  loss, _, state = spec.call(two_modules, x, spec.init_state())
  # module a's chosen is column 0, module b's rejected column 3 (2 sequences per module).
  want = np.mean(np.asarray([1.0, 2.0, 3.0]) * (np.arange(b) * 4 + np.arange(b) * 4 + 3 - 0.5))
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  assert int(state) == 1

  @losses.register(data="pairwise", needs_ref=False, head="scalar",
                   name="test_register_scalar")
  def scores(chosen_scores, rejected_scores):
    return jnp.mean(chosen_scores - rejected_scores), {}
  assert scores.loss_spec.trainer == "reward_model"
  scored = losses.LossInputs(logps=jnp.asarray([[2.0, 0.5]]), ref_logps=None, lengths=None,
                             batch={})
  np.testing.assert_allclose(float(scores.loss_spec.call(scores, scored, None)[0]), 1.5)
  assert losses.get("reward_model").head == "scalar"

  def stateless(chosen_logps):
    return chosen_logps.mean(), {}
  with pytest.raises(ValueError, match="keyword-only 'state'"):
    losses.register(stateless, data="pairwise", needs_ref=False, init_state=lambda: 0)


# --- a researcher's loss's code is part of the objective a resume compares -----------

def test_an_edited_loss_file_refuses_the_resume_unless_allowed(tmp_path, caplog):
  import hashlib
  from jaxalign.errors import ResumeMismatchError
  from jaxalign.train import resume

  path = tmp_path / "edited.py"
  path.write_text(_REF_FREE.replace("margin_loss", "edited_margin_loss"))

  def resolved(**overrides):
    c = tiny_config(**overrides)
    c.loss.name = f"{path}:edited_margin_loss"
    c.loss.hparams = type(c.loss.hparams)(dict(gamma=0.2))
    return config_lib.resolve(c, jax.device_count()).config

  saved = resolved().to_dict()     # what the loop saves with each checkpoint
  assert saved["loss"]["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
  resume.check_resume_config(saved, resolved(), where="step 2")      # same file: resumes

  # The objective changes with the file, the name and hyperparameters do not.
  path.write_text(path.read_text().replace("- gamma", "- 2.0 * gamma"))
  with pytest.raises(ResumeMismatchError) as refused:
    resume.check_resume_config(saved, resolved(), where="step 2")
  message = str(refused.value)
  assert message.startswith("cannot resume from step 2: the objective differs from the "
                            "checkpoint's: loss.source_sha256 "), message
  assert f"(the code of {path} changed)" in message and "allow_config_change" in message
  assert "\n" not in message
  with caplog.at_level("WARNING", logger="jaxalign"):
    resume.check_resume_config(saved, resolved(allow_config_change=True), where="step 2")
  assert "loss.source_sha256" in caplog.text

  # A checkpoint saved before the code was recorded resumes as it did.
  del saved["loss"]["source_sha256"]
  resume.check_resume_config(saved, resolved(), where="step 2")


def test_a_builtin_loss_records_no_source_fingerprint():
  # Built-ins are jaxalign's own code: an edit of jaxalign/losses/*.py (an upgrade)
  # does not refuse the checkpoints made before it.
  spec = config_lib.resolve(tiny_config(), jax.device_count())
  assert spec.config.loss.source_sha256 == ""
  assert losses.source_fingerprint(losses.get("dpo")) == ""
