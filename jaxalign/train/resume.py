"""The resume policy: which checkpoint step a run continues from, and whether it may.

`keep_saved_layout` (before the state is built) gives a run with
model.scan_layers="auto" the layer layout of the checkpoint it starts from;
`check_resume_config` refuses a config whose objective or state shapes differ
from the checkpoint's (ResumeMismatchError naming each key); `resume_step`
picks the step (a corrupt one stops the run naming the previous good step, or,
with checkpoint.fallback, is skipped); `restore` reads it back and moves the
unreadable later steps aside.
"""

import logging
from typing import Any

import ml_collections

from jaxalign import checkpoint as ckpt
from jaxalign import config as config_lib
from jaxalign import losses, paths
from jaxalign.data import reading
from jaxalign.errors import ResumeMismatchError
from jaxalign.models import lora
from jaxalign.train import rundir

log = logging.getLogger("jaxalign")


# Resolved-config keys compared before resuming: the objective may change only
# with config.allow_config_change; the state's structure (model architecture,
# data format, a frozen reference copy) never. ModelConfig.dtype, .remat
# and .attention are compute choices and may change freely.
OBJECTIVE_KEYS = ("loss.name", "loss.hparams", "loss.options", "reward.name", "reward.options",
                  "online.regenerate_every", "sampling.max_new_tokens", "sampling.temperature",
                  "sampling.top_k", "sampling.top_p")
FREE_MODEL_FIELDS = ("dtype", "remat", "attention", "moe_kernel", "remat_stages",
                     "moe_capacity_factor")
# Objective facts validation records in the config (not settings), compared like
# OBJECTIVE_KEYS when both the checkpoint's record and the new one hold them: a
# checkpoint saved before a fact was recorded resumes as it did.
# loss.source_sha256: the researcher's loss file (losses.source_fingerprint).
RECORDED_KEYS = ("loss.source_sha256",)


def _flat(d, prefix: str) -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}.{k}"))
  return out


def _structure(c, model_cfg) -> dict[str, Any]:
  """Config facts that fix the train state's shapes: model fields, data format, reference.

  `c`: a run's record (config); `model_cfg`: its ModelConfig.
  """
  model = model_cfg.to_dict()
  out = {f"model.{k}": (tuple(v) if isinstance(v, list) else v)
         for k, v in model.items() if k not in FREE_MODEL_FIELDS}
  out["data format"] = losses.get(c.loss.name).data
  out["reference.mode"] = c.reference.mode
  if c.reference.get("sync_steps", 0):  # absent (older configs) and 0 read the same
    out["reference.sync"] = (c.reference.sync_steps, c.reference.get("sync_alpha"))
  online = c.get("online")
  if online is not None and online.get("enabled"):
    out["online.samples_per_prompt"] = online.get("samples_per_prompt")
  lora_cfg = lora.config_from(c.get("lora"))
  if lora_cfg.enabled:  # absent (older configs) and rank 0 read the same
    out["lora.rank"], out["lora.targets"] = lora_cfg.rank, lora_cfg.targets
    # The base the adapters were trained against ("none" for configs before the key).
    out["lora.base_dtype"] = lora_cfg.base_dtype
    out["loss modules"] = losses.get(c.loss.name).modules
  return out


def _recorded_diffs(saved: dict[str, Any], config) -> list[str]:
  """RECORDED_KEYS that differ between `saved` and `config`, both holding them."""
  diffs = []
  for key in RECORDED_KEYS:
    section, _, name = key.partition(".")
    old, new = (saved.get(section) or {}).get(name), (config.get(section) or {}).get(name)
    if old is None or new is None or old == new:
      continue
    # Which file (a digest alone does not say), when the loss's name is the same.
    name = str(config.loss.name)
    what = (f" (the code of {name.rpartition(':')[0]} changed)"
            if key == "loss.source_sha256" and old and new
            and (saved.get("loss") or {}).get("name") == name else "")
    diffs.append(f"{key} {str(old)[:12] or repr(old)} -> {str(new)[:12] or repr(new)}{what}")
  return diffs


def check_resume_config(saved: dict[str, Any], config, *, where: str,
                        model_cfg=None) -> None:
  """Refuses to resume when the objective or the state's shapes changed since `saved`.

  The objective is OBJECTIVE_KEYS and RECORDED_KEYS (the code of a researcher's loss).

  `config`: the run's record (a RunSpec's `config`); `model_cfg`: its ModelConfig
  when resolved (a RunSpec's), else derived from `config`.

  Raises:
    ResumeMismatchError: one line naming each differing key as `key old -> new`.
  """
  old_cfg = ml_collections.ConfigDict(saved)
  try:
    old_structure = _structure(old_cfg, config_lib.model_config(old_cfg))
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise ResumeMismatchError(f"cannot resume from {where}: its saved config does not "
                              f"describe a model this version can build ({reading.first_line(e)})")
  layout = rundir.saved_layout(saved)   # no key: saved before the layers were scanned, unrolled
  if layout is not None:
    old_structure["model.scan_layers"] = layout
  new_structure = _structure(
      config, config_lib.model_config(config) if model_cfg is None else model_cfg)
  shape_diffs = [f"{k} {old_structure.get(k)!r} -> {new_structure.get(k)!r}"
                 for k in sorted(set(old_structure) | set(new_structure))
                 if old_structure.get(k) != new_structure.get(k)]
  old_obj, new_obj = {}, {}
  for key in OBJECTIVE_KEYS:
    section, _, name = key.partition(".")
    if section not in saved:  # a checkpoint from before the section existed
      continue
    old_obj.update(_flat(saved.get(section, {}).get(name, "<absent>"), key))
    new_obj.update(_flat(config.to_dict()[section][name], key))
  for d in (old_obj, new_obj):  # JSON turned tuples into lists
    d.update({k: tuple(v) for k, v in d.items() if isinstance(v, list)})
  objective_diffs = [f"{k} {old_obj.get(k, '<absent>')!r} -> {new_obj.get(k, '<absent>')!r}"
                     for k in sorted(set(old_obj) | set(new_obj))
                     if old_obj.get(k, "<absent>") != new_obj.get(k, "<absent>")]
  objective_diffs += _recorded_diffs(saved, config)
  if shape_diffs:
    raise ResumeMismatchError(
        f"cannot resume from {where}: the model or data format differs from the "
        f"checkpoint's: {', '.join(shape_diffs + objective_diffs)}; use a new workdir "
        "(or config.init_from to start from its parameters)")
  if objective_diffs and not config.get("allow_config_change", False):
    raise ResumeMismatchError(
        f"cannot resume from {where}: the objective differs from the checkpoint's: "
        f"{', '.join(objective_diffs)}; set config.allow_config_change=True to change "
        "it deliberately")
  if objective_diffs:
    log.warning("resuming from %s with a changed objective: %s", where,
                ", ".join(objective_diffs))
  _warn_schedule_change(saved, config, where)


# Keys that re-shape the learning-rate schedule of a resumed run: allowed (a longer
# run is the usual reason to resume), but said.
SCHEDULE_KEYS = ("total_steps", "optim.lr", "optim.warmup_steps", "optim.schedule",
                 "optim.min_lr_ratio")


def _warn_schedule_change(saved: dict[str, Any], config, where: str) -> None:
  now = _flat(config.to_dict(), "")
  before = _flat(saved, "")
  diffs = [f"{key} {before['.' + key]!r} -> {now['.' + key]!r}" for key in SCHEDULE_KEYS
           if "." + key in before and "." + key in now and before["." + key] != now["." + key]]
  if diffs:
    log.warning("resuming from %s with a changed learning-rate schedule: %s; the schedule "
                "continues from the resumed step on its new shape", where, ", ".join(diffs))


def _newest_config(checkpointer: ckpt.Checkpointer) -> tuple[dict[str, Any], int] | None:
  """(the saved config, its step) of the newest step whose config loads; None: none."""
  latest = checkpointer.latest_step()
  if latest is None:
    return None
  for step in [latest] + _earlier_steps(checkpointer, latest):
    try:
      return checkpointer.restore_config(step), step
    except ckpt.CorruptCheckpointError:
      continue   # resume_step reports it (or, with checkpoint.fallback, skips it)
  return None


def _init_from_config(init_from: str) -> tuple[dict[str, Any], int] | None:
  """(the saved config, its step) of config.init_from's latest checkpoint; None when it
  cannot be read here (starting_params then reports why)."""
  directory = rundir.checkpoint_dir(init_from)
  if not paths.isdir(directory):
    return None
  try:
    checkpointer = ckpt.Checkpointer(directory, every=1, keep=1)
  except Exception:  # a directory that is no checkpoint directory: reported by starting_params
    return None
  try:
    return _newest_config(checkpointer)
  finally:
    checkpointer.close()


def keep_saved_layout(spec: config_lib.RunSpec,
                      checkpointer: ckpt.Checkpointer) -> config_lib.RunSpec:
  """`spec` in the layer layout of the checkpoint its run starts from.

  Only with model.scan_layers="auto" (spec.layers_auto): its choice for this
  platform gives way to the layout recorded with the run's own newest readable
  checkpoint (a resume), else with config.init_from's: a run saved scanned on a
  TPU resumes on a CPU (or is fine-tuned further there) scanned, the layout its
  parameters are stored in, though "auto" alone would unroll it. A layout set
  explicitly (True/False) is kept, and a resume into the other one is refused
  by check_resume_config.
  """
  if not spec.layers_auto:
    return spec
  found = _newest_config(checkpointer)
  where = "the checkpoint's layout"
  if found is None and spec.init_from:
    found = _init_from_config(spec.init_from)
    where = "config.init_from's layout"
  if found is None:
    return spec
  saved, step = found
  scan = rundir.saved_layout(saved)
  if scan is None or scan == spec.model_cfg.scan_layers:
    return spec
  return config_lib.with_scan_layers(spec, scan, f"{where}, step {step}; {spec.layers_auto} "
                                     f"would {'scan' if not scan else 'unroll'}")


def _earlier_steps(checkpointer: ckpt.Checkpointer, step: int) -> list[int]:
  return sorted((s for s in checkpointer.all_steps() if s < step), reverse=True)


def _previous_good(checkpointer: ckpt.Checkpointer, step: int, abstract_state,
                   data_iter=None) -> int | None:
  """The newest step before `step` whose config, state (and data iterator) load."""
  for earlier in _earlier_steps(checkpointer, step):
    try:
      checkpointer.restore_config(earlier)
      checkpointer.restore(earlier, abstract_state, data_iter)
      return earlier
    except ckpt.CorruptCheckpointError:
      continue
  return None


def _corrupt_error(e: ckpt.CorruptCheckpointError, checkpointer: ckpt.Checkpointer,
                   abstract_state, data_iter=None) -> ckpt.CorruptCheckpointError:
  """`e` completed with the previous good step and the way to fall back to it."""
  good = _previous_good(checkpointer, e.step, abstract_state, data_iter)
  if good is None:
    hint = (f"no earlier checkpoint loads; move {paths.join(checkpointer.directory, str(e.step))} "
            "away to start over, or use a new workdir")
  else:
    hint = (f"previous good checkpoint: step {good}; rerun with "
            f"--config.checkpoint.fallback=True to resume from it (the unreadable steps are "
            f"moved to {checkpointer.directory}.corrupt)")
  return ckpt.CorruptCheckpointError(f"{e}; {hint}", step=e.step)


def resume_step(checkpointer: ckpt.Checkpointer, spec: config_lib.RunSpec, abstract_state, *,
                fallback: bool) -> int | None:
  """The step to resume from (None: a fresh run), its saved config checked against `spec`'s.

  An unreadable saved config is a corrupt step: without `fallback` that stops the
  run (CorruptCheckpointError naming the previous good step); with it the newest
  earlier step whose config loads is taken.
  """
  latest = checkpointer.latest_step()
  if latest is None:
    return None
  for step in [latest] + _earlier_steps(checkpointer, latest):
    try:
      saved = checkpointer.restore_config(step)
    except ckpt.CorruptCheckpointError as e:
      if not fallback:
        raise _corrupt_error(e, checkpointer, abstract_state) from e
      log.warning("%s; checkpoint.fallback: trying the step before it", e)
      continue
    check_resume_config(saved, spec.config, where=f"step {step} in {checkpointer.directory}",
                        model_cfg=spec.model_cfg)
    return step
  raise ckpt.CorruptCheckpointError(
      f"no checkpoint in {checkpointer.directory} can be read; use a new workdir", step=latest)


def restore(checkpointer: ckpt.Checkpointer, step: int, abstract_state, data_iter,
            spec: config_lib.RunSpec, *, fallback: bool):
  """(state, step) restored from `step`; with `fallback`, from the newest step that loads.

  Steps after the one restored (unreadable ones) are moved aside to DIR.corrupt/
  with a warning, so the resumed run's own checkpoints take their numbers.
  """
  for candidate in [step] + _earlier_steps(checkpointer, step):
    try:
      if candidate != step:   # `step`'s config was checked by resume_step
        check_resume_config(checkpointer.restore_config(candidate), spec.config,
                            where=f"step {candidate} in {checkpointer.directory}",
                            model_cfg=spec.model_cfg)
      state = checkpointer.restore(candidate, abstract_state, data_iter)
      break
    except ckpt.CorruptCheckpointError as e:
      if not fallback:
        raise _corrupt_error(e, checkpointer, abstract_state, data_iter) from e
      log.warning("%s; checkpoint.fallback: trying the step before it", e)
  else:
    raise ckpt.CorruptCheckpointError(
        f"no checkpoint in {checkpointer.directory} can be read; use a new workdir", step=step)
  bad = [s for s in checkpointer.all_steps() if s > candidate]
  if bad:
    aside = checkpointer.set_aside(bad)
    log.warning("checkpoint.fallback: resumed from step %d; the unreadable steps %s are moved "
                "to %s", candidate, bad, aside)
  return state, candidate
