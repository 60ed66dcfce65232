"""Run-directory paths that may be local or a bucket URL (gs://, s3://).

A TPU pod writes its workdir to GCS: every worker must see the same directory
and a worker's disk goes away with it. Arrays (Orbax checkpoints) go through
tensorstore, which speaks gs:// natively; Orbax's own metadata files and
everything else jaxalign writes (metrics.jsonl, data_stats.json,
ref_logps.npy, the tokenizer) go through `etils.epath`, which reads and writes
gs:// through `gcsfs` (pip install gcsfs) or TensorFlow's gfile when one is
installed. Local paths behave exactly as `os.path` / `open`.
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
from etils import epath


def is_remote(path: str) -> bool:
  """A URL such as gs://bucket/dir (not a local path)."""
  return "://" in str(path)


def resolve(path: str) -> str:
  """An absolute local path, or the URL unchanged (os.path.abspath would mangle it)."""
  path = str(path)
  return path if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  return str(epath.Path(path).joinpath(*parts)) if is_remote(path) else os.path.join(path, *parts)


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes `data` to a temporary name, then renames (a GCS object appears whole anyway)."""
  tmp = epath.Path(path + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)


def save_npy(path: str, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)
  write_bytes_atomic(path, buf.getvalue())


def load_npy(path: str) -> np.ndarray:
  """np.load without pickle; a URL's bytes are read through epath first."""
  source = io.BytesIO(epath.Path(path).read_bytes()) if is_remote(path) else path
  return np.load(source, allow_pickle=False)


def save_pretrained(obj, path: str) -> None:
  """`obj.save_pretrained(path)` (a tokenizer), through a local copy for a URL."""
  if not is_remote(path):
    obj.save_pretrained(path)
    return
  with tempfile.TemporaryDirectory() as tmp:
    obj.save_pretrained(tmp)
    makedirs(path)
    for name in sorted(os.listdir(tmp)):
      epath.Path(path, name).write_bytes(open(os.path.join(tmp, name), "rb").read())
