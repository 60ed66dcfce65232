"""Loading never executes code: no pickle in checkpoints or caches, loads work with
pickle disabled, and remote code is never trusted."""

import ast
import pathlib
import pickle
import shutil

import numpy as np
import pytest

import jaxalign
from jaxalign.train import rundir
from jaxalign.data import reading
from tests.reliability.helpers import complete_steps, params
from tests.train.helpers import tiny_config, train_loop

PACKAGE = pathlib.Path(jaxalign.__file__).resolve().parent
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".npz")


def _config(**overrides):
  return tiny_config(total_steps=3, **{"checkpoint.every": 1, **overrides})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run stopped at step 2 of 3: checkpoints, data state, config, ref cache, tokenizer."""
  workdir = tmp_path_factory.mktemp("pickle") / "run"
  train_loop(_config(), str(workdir), progress=False, stop_after=2)
  return workdir


def _is_pickle(head: bytes) -> bool:
  # Protocols 2-5 start with PROTO (0x80) and the protocol number.
  return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def test_no_file_in_the_workdir_is_a_pickle(run_dir):
  files = [p for p in run_dir.rglob("*") if p.is_file()]
  assert any("checkpoints" in p.parts for p in files) and (run_dir / "ref_logps.npy").exists()
  for path in files:
    assert not path.name.endswith(PICKLE_SUFFIXES), path
    with open(path, "rb") as f:
      assert not _is_pickle(f.read(2)), f"{path} starts with a pickle header"
    if path.suffix == ".npy":  # raises if the array needed pickle (object dtype)
      assert not np.load(path, allow_pickle=False).dtype.hasobject, path


def test_resume_and_load_succeed_with_pickle_disabled(run_dir, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  shutil.copytree(run_dir, workdir)

  def refuse(*args, **kwargs):
    raise AssertionError("pickle was used while loading a checkpoint or cache")

  class NoUnpickler:
    def __init__(self, *args, **kwargs):
      refuse()

  for name in ("load", "loads"):
    monkeypatch.setattr(pickle, name, refuse)
  monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
  loads = []
  original_load = np.load

  def spy_load(file, *args, **kwargs):
    loads.append((str(file), kwargs.get("allow_pickle", "<default>")))
    return original_load(file, *args, **kwargs)

  monkeypatch.setattr(np, "load", spy_load)

  # Resuming restores the state, the data iterator and the config, and reads the
  # reference log-probs cache; then the finished run's parameters load too.
  result = train_loop(_config(), str(workdir), progress=False)
  assert result.final_step == 3 and complete_steps(workdir) == [2, 3]
  assert all(np.isfinite(x).all() for x in params(workdir, _config()))
  assert rundir.resolved_config(str(workdir))["loss"]["name"] == "dpo"
  assert (str(workdir / "ref_logps.npy"), False) in loads
  assert all(allow is False for _, allow in loads), loads


def _calls(tree: ast.AST):
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
      yield node


def _keyword(call: ast.Call, name: str):
  for kw in call.keywords:
    if kw.arg == name:
      return kw.value
  return None


def test_source_never_unpickles_and_never_trusts_remote_code():
  """Every np.load passes allow_pickle=False; every transformers Auto*.from_pretrained
  passes trust_remote_code=False (there is no setting that turns it on); no module
  imports pickle or calls torch.load."""
  checked = 0
  for path in sorted(PACKAGE.rglob("*.py")):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
        assert not any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle",
                                           "joblib") for n in names), f"{path}:{node.lineno}"
    for call in _calls(tree):
      owner = call.func.value
      owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
      where = f"{path.relative_to(PACKAGE.parent)}:{call.lineno}"
      if call.func.attr == "load" and owner_name in ("np", "numpy"):
        value = _keyword(call, "allow_pickle")
        assert isinstance(value, ast.Constant) and value.value is False, where
        checked += 1
      if call.func.attr == "load" and owner_name == "torch":
        raise AssertionError(f"{where}: torch.load unpickles")
      if call.func.attr == "from_pretrained" and owner_name.startswith("Auto"):
        value = _keyword(call, "trust_remote_code")
        assert isinstance(value, ast.Constant) and value.value is False, where
        checked += 1
  assert checked >= 2  # the ref_logps np.load and the train tokenizer at least


def test_train_tokenizer_loads_without_remote_code(monkeypatch):
  import transformers
  from jaxalign.data import toy
  seen = {}

  def from_pretrained(name, **kwargs):
    seen.update(kwargs, name=name)
    return toy.build_tokenizer()

  monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
  reading.load_tokenizer("someone/some-tokenizer")
  assert seen["name"] == "someone/some-tokenizer"
  assert seen["trust_remote_code"] is False
