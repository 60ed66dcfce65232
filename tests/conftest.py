"""Every test sees 8 fake CPU devices, float32 and highest matmul precision."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import jax

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent XLA compilation cache for the whole session (every xdist worker and
# the subprocesses tests start): most tests compile the same tiny steps, and a hit
# skips XLA's compile (not the trace, so compile-count tests still count). A fresh
# directory per session unless JAXALIGN_TEST_CACHE names one; JAXALIGN_TEST_CACHE=off
# disables it. Not for `-m tpu`: each real-scale TPU compile is its own, and large.
#
# XLA:CPU's LLVM backend at optimization level 0: the suite is mostly compiles of tiny
# programs whose run time is nothing, and level 0 takes ~30% less CPU per compile (a
# tiny `train_loop`: 11.6 s user against 16.7 s, same runs). Matmuls still run in XLA's
# libraries; only the generated elementwise loops are unoptimized. Not for `-m tpu`
# (its plans' fit and cost) or `-m demo` (hundreds of steps). Subprocesses inherit it.
def pytest_configure(config):
  marks = (config.getoption("markexpr") or "").replace("not tpu", "").replace("not demo", "")
  flags = os.environ.get("XLA_FLAGS", "")
  if "tpu" not in marks and "demo" not in marks and "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = flags + " --xla_backend_optimization_level=0"
  cache = os.environ.get("JAXALIGN_TEST_CACHE", "")
  if cache == "off" or "tpu" in marks:
    return
  if not cache:
    import tempfile
    cache = os.path.join(tempfile.gettempdir(), f"jaxalign_test_xla_cache_{os.getpid()}")
  os.environ["JAXALIGN_TEST_CACHE"] = cache   # xdist workers inherit the controller's
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# The longest files start first, so that under xdist's --dist loadfile neither worker
# is left running one of them alone at the end of the suite.
_LONGEST_FIRST = ("tests/workflows/test_demo.py", "tests/test_multihost.py",
                  "tests/reliability/test_kill.py", "tests/models/test_hf.py",
                  "tests/train/test_loop.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
