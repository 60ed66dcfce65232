"""The one-way layers of STYLE.md (import-linter) and the lint rules (ruff), both as
configured in pyproject.toml."""

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _lint(root: pathlib.Path) -> subprocess.CompletedProcess:
  """lint-imports with root/pyproject.toml over the jaxalign package under `root`."""
  code = (f"import sys; sys.path.insert(0, {str(root)!r}); "
          "from importlinter.cli import lint_imports; "
          f"sys.exit(lint_imports(config_filename={str(root / 'pyproject.toml')!r}, "
          "no_cache=True, no_logo=True))")
  return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                        timeout=300)


def test_imports_run_one_way_and_no_module_cycle():
  proc = _lint(ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "2 kept, 0 broken" in proc.stdout, proc.stdout


def test_the_contract_catches_a_lower_layer_importing_a_higher_one(tmp_path):
  """The same contract over a copy of the package in which sharding imports the loop."""
  shutil.copytree(ROOT / "jaxalign", tmp_path / "jaxalign")
  shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
  with open(tmp_path / "jaxalign" / "sharding.py", "a") as f:
    f.write("\nfrom jaxalign.train import loop as _loop  # the violation\n")
  proc = _lint(tmp_path)
  assert proc.returncode != 0, proc.stdout
  assert "jaxalign.sharding -> jaxalign.train.loop" in proc.stdout, proc.stdout


def test_ruff_is_clean_on_the_package_benchmarks_and_tests():
  proc = subprocess.run([sys.executable, "-m", "ruff", "check", "jaxalign", "bench", "tests"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
