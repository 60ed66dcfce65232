"""Config defaults shared by every recipe, validation before compiling, and the run spec.

Recipes in `configs/` start from `defaults()` and change what they need. The
CLI locks the config, applies `--config.a.b=value` overrides (unknown keys
fail there) and calls `resolve()` once: it runs `validate()` (one named check
per part of the config), which raises `ConfigError` naming the offending key,
and returns a frozen `RunSpec`: typed fields for what the run reads (its
ModelConfig, HF directory, mesh, loss and hparams, run mode, reference and
LoRA settings, DataSpec, OptimSpec, CheckpointSpec, steps and seed) and the
frozen config as the run's record (saved with checkpoints, compared on
resume). Everything below takes the spec, so no layer validates again or
re-reads the config tree. Run modes are declared in one table, `RUN_MODES`;
jaxalign.workflows.run.train dispatches on `RunSpec.mode`.
"""

import copy
import dataclasses
import importlib.util
import logging
import math
from typing import Any

import jax
import ml_collections

from jaxalign import checkpoint as ckpt
from jaxalign import guards, losses, paths, rewards, sharding
from jaxalign.data import schema
from jaxalign.losses import probe
from jaxalign.models import attention, grouped_matmul, hf, hf_config, lora, quant, transformer
from jaxalign.rewards import model as reward_model
from jaxalign.errors import ConfigError, CorruptCheckpointError, HfConfigError
# Mesh axes and logical-axis rules live in sharding.py; re-exported under their old names.
from jaxalign.sharding import (CONTEXT_AXIS, DEFAULT_RULES, LEGACY_MESH_AXES, LOGICAL_AXES,
                               MESH_AXES, resolve_mesh_shape)



def defaults() -> ml_collections.ConfigDict:
  """The shared defaults; every recipe overrides a subset."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 100
  c.log_every = 10
  # Held-out evaluation (train/heldout.py) on data.eval_path: every eval_every steps
  # (0: only at the end of training) and at the end; metrics eval/loss, eval/rewards/...
  c.eval_every = 0
  c.init_from = ""            # a run directory (or checkpoint step dir) to take params from
  c.skip_nonfinite = False    # True: skip steps with a non-finite loss/grad, count them
  # True: resume even though loss.name/hparams/options differ from the checkpoint's
  # (a deliberate change); the model shape and data format must still match.
  c.allow_config_change = False
  # Experiment trackers beside metrics.jsonl, comma-separated: tensorboard, wandb,
  # mlflow (the last two are extras: pip install 'jaxalign[wandb]'); "none": jsonl only.
  c.report_to = "tensorboard"
  # TRL's per-token metrics (logits/chosen|rejected, SFT mean_token_accuracy, entropy),
  # reduced inside the chunked log-prob scan; False skips that work (on CPU about a
  # fifth of a 32k-vocabulary head's time; no effect on the loss or gradients).
  c.token_metrics = True

  # Not type-safe: model.scan_layers holds "auto" or a bool, and a recipe sets either.
  c.model = ml_collections.ConfigDict(type_safe=False)
  c.model.preset = "tiny"
  c.model.overrides = ml_collections.ConfigDict()   # ModelConfig fields over the preset
  # A Hugging Face checkpoint (local directory or hub name) to start from: its
  # config.json replaces the preset (overrides still apply), its weights the random
  # init, its tokenizer the default one (when data.tokenizer is empty).
  c.model.hf_path = ""
  # Attention kernel (jaxalign.models.attention): "auto" (splash on TPU, cudnn on
  # GPU, xla on CPU) | "xla" | "cudnn" | "splash"; a compute choice, free on resume.
  c.model.attention = "auto"
  # Grouped-matmul kernel of MoE experts (jaxalign.models.grouped_matmul): "auto"
  # (megablox on TPU, ragged_dot elsewhere) | "ragged_dot" | "megablox"; a compute choice.
  c.model.moe_kernel = "auto"
  # True: one lax.scan over stacked layers (compiles one layer body); False: a
  # Python loop over layers (faster steps on CPU, longer compiles for deep
  # models); "auto": scanned on TPU/GPU and for models of
  # transformer.SCAN_MIN_LAYERS_CPU layers or more, else unrolled
  # (transformer.auto_scan_layers). `resolve` records the choice as a bool (the
  # run's config, saved with its checkpoints). The two layouts store parameters
  # differently (a leading "layers" axis): with "auto" a run that resumes (or
  # starts from init_from) keeps the layout its checkpoint was saved in.
  c.model.scan_layers = "auto"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, -1, 1)   # -1: all remaining devices, over the axes MESH_AXES
  c.sharding_rules = DEFAULT_RULES

  c.data = ml_collections.ConfigDict()
  c.data.train_path = ""      # .jsonl / .parquet / datasets dir or hub name
  c.data.eval_path = ""       # held-out set in the loss's format ("": no evaluation)
  c.data.split = "train"
  c.data.tokenizer = ""       # tokenizer dir or hub name; "toy" = the bundled one
  # With model.hf_path set, a data.tokenizer other than that checkpoint's own is
  # refused unless this says it is deliberate (the ids must then mean what the
  # checkpoint's embeddings were trained on).
  c.data.allow_other_tokenizer = False
  c.data.max_length = 64
  c.data.max_prompt_length = 32
  c.data.batch_size = 8       # global, in examples (pairs for DPO)
  c.data.shuffle = True
  c.data.on_error = "raise"   # "raise" | "skip"
  # Groups (negatives' samples, completions) are padded to this many slots with a
  # group_mask; None: every record must have the same number.
  c.data.group_size = ml_collections.FieldReference(None, field_type=int)
  # Packed batches (jaxalign/data/packing.py): a step's sequences laid end to end in
  # rows of pack_length tokens (0: max_length), attention kept inside each sequence;
  # the same examples per step and the same numbers as padding, less compute.
  # pack_buckets: at most this many row counts per step (one compile each).
  c.data.packing = False
  c.data.pack_length = 0
  c.data.pack_buckets = 3
  # Shared prompt: each example's prompt runs once into a KV cache and all of its
  # responses attend to it (pairs and groups). With packing: rows of units, each an
  # example's prompt once then its responses (XLA or cuDNN attention; splash falls
  # back to xla for that mask, one logged line).
  c.data.share_prompt = False
  # Continual (COFS-DPO style) training: training sources in order, one stage of
  # total_steps each; () trains once on train_path. domain_eval_paths: held-out
  # pairwise sets, one per domain, for the COFS weight search.
  c.data.domains = ()
  c.data.domain_eval_paths = ()

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "dpo"
  c.loss.hparams = ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0))
  c.loss.options = ml_collections.ConfigDict()   # the loss's host-side `prepare` options

  # LoRA adapters (models/lora.py); rank 0 trains every parameter.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0
  c.lora.dropout = 0.0
  c.lora.targets = ("q", "k", "v", "o")   # subset of q, k, v, o, gate, up, down
  c.lora.init_adapters = ""   # an adapter directory (lora.save_adapters) to start from
  # The frozen base's projection weights stored quantized (QLoRA): "" (as
  # model.param_dtype) | "int8" | "nf4", blockwise absmax, 64 per scale (models/quant.py).
  c.lora.base_dtype = ""
  # The adapters' (and so their AdamW state's) dtype; "" = the base weight's
  # (model.param_dtype): float32 adapters over a bfloat16 frozen base keep small
  # updates that bfloat16 weights would round away.
  c.lora.param_dtype = ""

  # COFS-DPO: how stored per-domain fast adapters combine (workflows/continual.py).
  c.cofs = ml_collections.ConfigDict()
  c.cofs.enabled = False
  c.cofs.weights = ()         # one per domain; (): searched on data.domain_eval_paths
  c.cofs.space = "delta"      # "delta" (sum of w_t A_t B_t) | "factors"
  c.cofs.grid = 10            # weight-search resolution: steps of 1/grid on the simplex

  c.reference = ml_collections.ConfigDict()
  c.reference.mode = "precompute"   # "precompute" | "frozen"
  # TR-DPO: every sync_steps optimizer updates, ref <- sync_alpha * policy +
  # (1 - sync_alpha) * ref (1.0: hard copy); 0 = never. Needs reference.mode="frozen".
  # TRL's ref_model_sync_steps / ref_model_mixup_alpha (defaults 512 / 0.6).
  c.reference.sync_steps = 0
  c.reference.sync_alpha = 0.6

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 10
  c.optim.schedule = "cosine"       # "cosine" | "constant"
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0
  c.optim.grad_accum_steps = 1
  # OFS-DPO: the slow adapter's learning rate / the fast adapter's (same schedule).
  c.optim.slow_lr_ratio = 0.5

  c.logprob_chunk_size = 8192

  # Sampling from the policy: online methods, iterative rounds, generate-candidates.
  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 16
  c.sampling.temperature = 1.0      # 0: greedy
  c.sampling.top_k = 0              # 0: off
  c.sampling.top_p = 1.0            # 1.0: off
  c.sampling.batch_size = 256       # prompts per engine call when sampling a whole dataset

  # Online training (grao, d2o): completions sampled inside the run. The data
  # file then holds prompts with their reference answer (grao: {prompt,
  # reference}) or human negative (d2o: {prompt, rejected}).
  c.online = ml_collections.ConfigDict()
  c.online.enabled = False
  c.online.samples_per_prompt = 4   # G (grao) / K (d2o)
  # d2o: 0 samples once from the initial (reference) policy; N > 0 resamples
  # every prompt's K samples from the current policy every N steps.
  c.online.regenerate_every = 0

  # The reward that scores sampled completions (online grao, iterative rounds).
  c.reward = ml_collections.ConfigDict()
  c.reward.name = ""                # a jaxalign.rewards name or "module:function"
  c.reward.options = ml_collections.ConfigDict()

  # Iterative self-alignment: rounds of sample -> score -> best-vs-worst pairs ->
  # train (a pairwise loss) from the previous round's policy; 0 rounds: off.
  c.iterative = ml_collections.ConfigDict()
  c.iterative.rounds = 0
  c.iterative.samples_per_prompt = 4
  c.iterative.steps_per_round = 100
  c.iterative.prompts_per_round = 0  # 0: every prompt of the data file each round

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 50
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True
  # True: when the latest checkpoint is corrupt, resume from the newest one that loads.
  c.checkpoint.fallback = False
  # Stop a finite blow-up of the loss / gradient / parameter norms (jaxalign.guards).
  c.divergence = guards.divergence_defaults()
  return c


def _fail(key: str, problem: str):
  raise ConfigError(f"config.{key}: {problem}")


def loss_spec(c: ml_collections.ConfigDict):
  """The LossSpec `c.loss.name` names (jaxalign.losses.get, the one resolver).

  A file reference ("path/to/file.py:function") is recorded with its absolute
  path in `c.loss.name`, so the run's saved config re-imports the same loss from
  any working directory (resume, export, generate, plan); a researcher's loss's
  source file is recorded as its sha256 in `c.loss.source_sha256` ("" for a
  built-in: losses.source_fingerprint), which a resume compares.

  Raises:
    ConfigError: naming config.loss.name, when it names no usable loss (no such
      file or function, a syntax error, a function that is not a registered loss).
  """
  try:
    spec = losses.get(c.loss.name)
  except KeyError as e:  # LossLookupError: one line
    _fail("loss.name", str(e))
  except ValueError as e:  # register(...) refused the function when its file ran
    _fail("loss.name", f"{c.loss.name!r}: {str(e).splitlines()[0]}")
  canonical = losses.canonical_name(c.loss.name)
  if canonical != c.loss.name:
    c.loss.name = canonical
  # Recorded, not a setting: the code of a researcher's loss, compared on resume.
  with c.loss.unlocked():
    c.loss.source_sha256 = losses.source_fingerprint(spec)
  return spec


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict[str, Any]
                    ) -> ml_collections.ConfigDict:
  """Sets each dotted key ("optim.lr", "lora.rank", ...) of `overrides` in `c`; returns `c`."""
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def validate(c: ml_collections.ConfigDict, num_devices: int, *, platform: str | None = None):
  """Raises ConfigError, naming the key, for any value that cannot work.

  Runs before anything is built or compiled, one named check per part of the
  config. Returns (the ModelConfig, the local model.hf_path directory or "") it
  checked the config against, which `resolve` keeps so they are never derived again.
  `platform`: the devices' platform ("cpu", "gpu", "tpu"; default: JAX's default
  backend), which model.scan_layers="auto" is resolved for.
  """
  mesh_shape = _validate_mesh(c, num_devices)
  spec = _validate_loss(c)
  model_cfg, hf_dir = _validate_model(c, platform)
  _validate_base_dtype(c, model_cfg, mesh_shape)
  _validate_init_from(c, model_cfg)
  _validate_data(c, spec, model_cfg, mesh_shape)
  _validate_context(c, spec, model_cfg, mesh_shape, platform or jax.default_backend())
  _validate_counts(c)
  _validate_eval(c, spec)
  _validate_sampling(c, spec)
  _validate_lora(c, spec, model_cfg)
  _validate_reference_sync(c, spec)
  _validate_report_to(c)
  if spec.data == "unpaired_kl" and c.data.batch_size < 2:
    _fail("data.batch_size", f"{c.loss.name!r} estimates its KL reference point from "
          "mismatched pairs within a batch: it needs at least 2 examples per batch")
  _validate_loss_call(c, spec)
  _validate_shardable(c, model_cfg, mesh_shape)
  return model_cfg, hf_dir


# config.report_to's trackers and the package each needs.
TRACKERS = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


def report_to(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  """config.report_to as tracker names ("none" or "": none); a recipe saved before
  the key existed reports to TensorBoard."""
  value = c.get("report_to", "tensorboard")
  names = value.split(",") if isinstance(value, str) else list(value)
  names = [str(n).strip().lower() for n in names if str(n).strip()]
  return () if names in ([], ["none"]) else tuple(dict.fromkeys(names))


def _validate_report_to(c: ml_collections.ConfigDict) -> None:
  names = report_to(c)
  for name in names:
    if name not in TRACKERS:
      _fail("report_to", f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)} or "
            "none (comma-separated)")
    if importlib.util.find_spec(TRACKERS[name]) is None:
      _fail("report_to", f"{name} is not installed: pip install 'jaxalign[{name}]'")


def _rule_axes(target) -> tuple[str, ...]:
  """A sharding rule's mesh axes: None, one axis name or a tuple of them."""
  return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _validate_mesh(c: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """mesh.shape for `num_devices` and the sharding rules; returns {axis: size}."""
  # mesh.axes had one legal value and is gone; configs saved by earlier versions
  # (resume, export, generate, init_from read them back) still carry it.
  if "axes" in c.mesh:
    if tuple(c.mesh.axes) not in (MESH_AXES, LEGACY_MESH_AXES):
      _fail("mesh.axes", f"is no longer an option (the axes are always {MESH_AXES}); "
            f"got {tuple(c.mesh.axes)}")
    logging.getLogger("jaxalign").warning(
        "config.mesh.axes is deprecated and ignored (the axes are always %s)", MESH_AXES)
  if len(tuple(c.mesh.shape)) not in (len(MESH_AXES), len(LEGACY_MESH_AXES)):
    _fail("mesh.shape", f"needs {len(MESH_AXES)} sizes for {MESH_AXES} (or "
          f"{len(LEGACY_MESH_AXES)} for {LEGACY_MESH_AXES}, context 1)")
  mesh_shape = dict(zip(MESH_AXES, resolve_mesh_shape(c.mesh.shape, num_devices)))

  rule_names = set()
  for i, rule in enumerate(c.sharding_rules):
    if len(rule) != 2:
      _fail(f"sharding_rules[{i}]", f"must be (logical_name, mesh_axes), got {rule}")
    name, target = rule
    rule_names.add(name)
    for a in _rule_axes(target):
      if a not in MESH_AXES:
        _fail(f"sharding_rules[{i}]", f"unknown mesh axis {a!r} for {name!r}")
  lora_on = "lora" in c and c.lora.rank > 0
  for name in LOGICAL_AXES:
    if name == "lora_rank" and not lora_on:
      continue
    if name in ("expert", "activation_length"):   # expert: MoE only (_validate_shardable);
      # activation_length: recipes saved before the rule get the default
      continue
    if name not in rule_names:
      _fail("sharding_rules", f"no rule for logical axis {name!r} "
            f"(use ({name!r}, None) to replicate it)")
  target = dict((n, t) for n, t in c.sharding_rules).get("activation_length", CONTEXT_AXIS)
  if _rule_axes(target) not in ((), (CONTEXT_AXIS,)):
    _fail("sharding_rules", f"'activation_length' maps to {target!r}: the sequence of the "
          f"activations is split over {CONTEXT_AXIS!r} or not at all (None)")
  if mesh_shape[CONTEXT_AXIS] > 1 and not _rule_axes(target):
    _fail("mesh.shape", f"context size {mesh_shape[CONTEXT_AXIS]} with the rule "
          "('activation_length', None): the sequence would not be split; map it to "
          f"{CONTEXT_AXIS!r}")
  return mesh_shape


def _validate_context(c: ml_collections.ConfigDict, spec, model_cfg, mesh_shape,
                      platform: str) -> None:
  """A context axis larger than 1 (context parallelism, jaxalign/models/context.py):
  every sequence the step computes splits into equal shards the attention kernel
  can take, and no step path decodes from a KV cache."""
  size = mesh_shape[CONTEXT_AXIS]
  if size == 1:
    return
  d = c.data
  packed = d.get("packing", False)
  length = (d.pack_length or d.max_length) if packed else d.max_length
  key = "data.pack_length" if packed and d.pack_length else "data.max_length"
  block = (attention.SPLASH_BLOCK
           if attention.resolve(model_cfg.attention, platform) == "splash" else 1)
  if length % (size * block):
    need = f"{size} (context) x {block} (the splash kernel's block)" if block > 1 else \
        f"the context size {size}"
    _fail(key, f"{length} tokens per sequence do not split into equal context shards: "
          f"it must be a multiple of {need}")
  if d.get("share_prompt", False) and not packed:
    _fail("mesh.shape", f"context size {size} with data.share_prompt and no data.packing: "
          "that layout runs the responses from a KV cache, which is not split over "
          "context; set data.packing=True (packed shared prompts) or context 1")
  if spec.head == "scalar":
    _fail("mesh.shape", f"context size {size}: the reward-model trainer's scalar head reads "
          "each row's last token and is not split over context; use context 1")
  if "online" in c and c.online.get("enabled", False):
    _fail("mesh.shape", f"context size {size} with online.enabled: sampling decodes from a "
          "KV cache, which is not split over context; use context 1")


def _validate_loss(c: ml_collections.ConfigDict):
  """loss.name, its hparams and options, and the reference mode it runs with;
  returns the LossSpec."""
  spec = loss_spec(c)
  allowed = set(spec.hparam_names())
  for key in c.loss.hparams.keys():
    if key not in allowed:
      _fail(f"loss.hparams.{key}", f"not a hyperparameter of {c.loss.name!r}; "
            f"it takes {sorted(allowed)}")
  for key in spec.required_hparams():
    if key not in c.loss.hparams:
      _fail(f"loss.hparams.{key}", f"required by {c.loss.name!r} (no default)")
  options = set(spec.option_names())
  for key in c.loss.options.keys():
    if key not in options:
      _fail(f"loss.options.{key}", f"not an option of {c.loss.name!r}; "
            f"it takes {sorted(options)}")
  guards.check_config_values(c, spec)
  if c.data.group_size is not None and c.data.group_size < 1:
    _fail("data.group_size", "must be >= 1 (or None)")
  if c.reference.mode not in ("precompute", "frozen"):
    _fail("reference.mode", f"must be 'precompute' or 'frozen', got {c.reference.mode!r}")
  if (spec.needs_ref and c.reference.mode == "precompute"
      and "tail_logps" in spec.column_names(c.loss.hparams.to_dict())):
    _fail("reference.mode", "loss.hparams.ld_alpha (LD-DPO) weights the reference's tail "
          "tokens too, which the precomputed table does not hold: set reference.mode='frozen'")
  return spec


# Group size a loss is traced with for a grouped format without data.group_size
# (jaxalign plan assumes the same: plan.DEFAULT_GROUP_SIZE).
_TRACE_GROUP_SIZE = 4


def _validate_loss_call(c: ml_collections.ConfigDict, spec) -> None:
  """The loss traced on an abstract micro-batch of its format (jax.eval_shape: no
  compile, no model): it must return a scalar loss and scalar metrics (and its
  state's structure), and its body must trace. Runs after the other checks, so
  the hyperparameters it is called with are known to be accepted."""
  group_size = c.data.group_size
  if group_size is None and c.online.enabled:
    group_size = c.online.samples_per_prompt
  problem = probe.check(
      spec, c.loss.hparams.to_dict(),
      batch_size=c.data.batch_size // c.optim.grad_accum_steps,
      group_size=group_size or _TRACE_GROUP_SIZE,
      ref_columns=spec.needs_ref and c.reference.mode == "frozen",
      online=bool(c.online.enabled), name=c.loss.name)
  if problem is not None:
    _fail("loss.name", problem)


def _validate_model(c: ml_collections.ConfigDict, platform: str | None):
  """The model section; returns (its ModelConfig, the local model.hf_path directory)."""
  if c.model.get("attention", "auto") not in attention.IMPLEMENTATIONS:
    _fail("model.attention", f"must be one of {attention.IMPLEMENTATIONS}, got "
          f"{c.model.attention!r}")
  if c.model.get("moe_kernel", "auto") not in grouped_matmul.IMPLEMENTATIONS:
    _fail("model.moe_kernel", f"must be one of {grouped_matmul.IMPLEMENTATIONS}, got "
          f"{c.model.moe_kernel!r}")
  scan_layers_request(c)   # ConfigError naming model.scan_layers
  if "remat" in c.model.overrides:
    try:
      transformer.normalize_remat(c.model.overrides.remat)
    except ValueError as e:
      _fail("model.overrides.remat", str(e))
  if c.model.preset not in transformer.PRESETS:
    _fail("model.preset",
          f"unknown preset {c.model.preset!r}; known: {sorted(transformer.PRESETS)}")
  hf_dir = ""
  try:
    hf_dir = hf_model_dir(c)
    model_cfg = model_config(c, hf_dir=hf_dir, platform=platform)
  except HfConfigError as e:
    _fail("model.hf_path", str(e))
  except transformer.FieldError as e:   # one field's value (the MoE fields)
    _fail(f"model.overrides.{e.field}" if e.field in c.model.overrides
          else "model.hf_path" if hf_dir else "model.preset", str(e))
  except (TypeError, ValueError) as e:
    _fail("model.overrides", str(e))
  for key in ("dtype", "param_dtype"):
    if getattr(model_cfg, key) not in ("float32", "bfloat16", "float16"):
      _fail(f"model.overrides.{key}", f"unsupported dtype {getattr(model_cfg, key)!r}")
  if hf_dir and not c.get("init_from", ""):   # init_from, when set, gives the weights
    try:   # the safetensors headers only: a truncated file, config.json against the shapes
      hf.check_weights(hf_dir, model_cfg)
    except (OSError, ValueError) as e:
      _fail("model.hf_path", str(e))
  return model_cfg, hf_dir


# ModelConfig fields that choose how the parameters are computed or stored, not
# which parameters there are: init_from's checkpoint may differ in them.
_COMPUTE_FIELDS = ("dtype", "param_dtype", "remat", "attention", "moe_kernel",
                   "remat_stages", "moe_capacity_factor")


def _validate_init_from(c: ml_collections.ConfigDict, model_cfg) -> None:
  """init_from's latest checkpoint holds a model of this run's parameter shapes,
  judged from the config saved with it (no array is read)."""
  path = c.get("init_from", "")
  if not path or not paths.isdir(path):   # unset; a missing directory: train/loop.py
    return
  try:
    step, saved = ckpt.saved_config(ckpt.checkpoint_dir(path))
  except FileNotFoundError:
    _fail("init_from", f"{path} holds no complete checkpoint to start from")
  except CorruptCheckpointError:   # the restore names the step (a run error)
    return
  source = ml_collections.ConfigDict(saved)
  what = _not_a_model(source, path)
  if what:
    _fail("init_from", f"{path} (step {step}) holds {what}")
  try:
    saved_cfg = model_config(source)
  except (HfConfigError, TypeError, ValueError, KeyError, AttributeError):
    return   # its model cannot be described here; the restore still checks the arrays
  model_saved = saved.get("model") or {}
  if "scan_layers" not in model_saved and "scan_layers" not in (model_saved.get("overrides")
                                                                 or {}):
    # Saved before the layers were scanned: its parameters have the unrolled layout.
    saved_cfg = dataclasses.replace(saved_cfg, scan_layers=False)
  if scan_layers_request(c) == "auto":   # the run takes init_from's layout (resume.py)
    model_cfg = dataclasses.replace(model_cfg, scan_layers=saved_cfg.scan_layers)
  want = hf.param_shapes(model_cfg)
  if hf.param_shapes(saved_cfg) == want:
    return
  old, new = saved_cfg.to_dict(), model_cfg.to_dict()
  differing = [k for k in new if old[k] != new[k] and k not in _COMPUTE_FIELDS]

  def decides_shapes(key):
    try:
      return hf.param_shapes(dataclasses.replace(model_cfg, **{key: getattr(saved_cfg, key)})
                             ) != want
    except (TypeError, ValueError):   # not a valid config alone: count it
      return True

  named = [k for k in differing if decides_shapes(k)] or differing
  _fail("init_from", f"{path} (step {step}) holds a model of another shape: "
        + ", ".join(f"model.{k} {old[k]!r} -> {new[k]!r}" for k in named)
        + " (its checkpoint -> this run); start from a checkpoint of this model, or set "
        "the model to match it")


def _not_a_model(source: ml_collections.ConfigDict, path: str) -> str:
  """What a run's checkpoint holds when its params are not a Transformer's ("" when
  they are), and what to do instead."""
  rank = (source.get("lora") or {}).get("rank", 0)
  if rank:
    return (f"LoRA adapters (lora.rank={rank}), not a model's parameters; `jaxalign export "
            f"--checkpoint {path}` merges them into a model to start from with model.hf_path")
  # Built-in losses only: a file named by another run's record is never imported here.
  name = (source.get("loss") or {}).get("name", "")
  spec = losses.LOSSES.get(name)
  if spec is not None and reward_model.has_scalar_head(spec):
    return f"a reward model (loss {name!r}), not a model's parameters"
  return ""


def _validate_data(c: ml_collections.ConfigDict, spec, model_cfg, mesh_shape) -> None:
  """The data section: lengths against the model, layouts, the batch against the mesh."""
  d = c.data
  if d.max_length < 2:
    _fail("data.max_length", "must be at least 2")
  if d.max_length > model_cfg.max_seq_len:
    _fail("data.max_length", f"{d.max_length} exceeds the model's max_seq_len "
          f"{model_cfg.max_seq_len}")
  if not 0 < d.max_prompt_length < d.max_length:
    _fail("data.max_prompt_length", f"must be in (0, data.max_length={d.max_length})")
  # data.lazy=False chose a list of every example, a read path that is gone; configs
  # saved by earlier versions (resume, export, init_from read them back) carry lazy=True.
  if d.get("lazy", True) is not True:
    _fail("data.lazy", "is no longer an option (every source is read lazily, or from its "
          f"prepared shards: jaxalign/data/examples.py); got {d.lazy!r}")
  if d.on_error not in ("raise", "skip"):
    _fail("data.on_error", f"must be 'raise' or 'skip', got {d.on_error!r}")
  _validate_layout(c, spec, model_cfg)
  batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
  accum = c.optim.grad_accum_steps
  if accum < 1:
    _fail("optim.grad_accum_steps", "must be >= 1")
  if d.batch_size > 0 and not (d.batch_size % (batch_shards * accum)
                               and not _rows_split(c, spec, batch_shards)):
    return
  _fail("data.batch_size", f"{d.batch_size} must be a positive multiple of the batch "
        f"shards (data*fsdp={batch_shards}) times optim.grad_accum_steps={accum} (or, "
        "padded layout, a multiple of both whose micro-batches' sequences split over "
        "the batch shards)")


def _rows_split(c: ml_collections.ConfigDict, spec, batch_shards: int) -> bool:
  """Whether a micro-batch of fewer examples than batch shards runs with its sequences
  split over them: the padded layout (train/step.py flattens [B, S, T] to B * S rows),
  a batch that splits over the shards and into the micro-batches, and micro-batches of
  B * S rows a multiple of the shards (e.g. 4 pairs on 8 chips: one sequence each)."""
  d, accum = c.data, c.optim.grad_accum_steps
  if d.get("packing", False) or d.get("share_prompt", False) or c.online.enabled:
    return False
  if d.batch_size % accum or d.batch_size % batch_shards:
    return False
  sequences = schema.get(spec.data).num_sequences(d.group_size or _TRACE_GROUP_SIZE)
  return (d.batch_size // accum * sequences) % batch_shards == 0


def _validate_layout(c: ml_collections.ConfigDict, spec, model_cfg) -> None:
  """data.packing (pack_length, pack_buckets) and data.share_prompt."""
  d = c.data
  if not isinstance(d.get("packing", False), bool):
    _fail("data.packing", f"must be True or False, got {d.packing!r}")
  if d.get("packing", False):
    if d.pack_length != 0 and d.pack_length < d.max_length:
      _fail("data.pack_length", f"{d.pack_length} must be 0 (= data.max_length) or at least "
            f"data.max_length={d.max_length}: a row must hold the longest sequence")
    if d.pack_length > model_cfg.max_seq_len:
      _fail("data.pack_length", f"{d.pack_length} exceeds the model's max_seq_len "
            f"{model_cfg.max_seq_len}")
    if d.pack_buckets < 1:
      _fail("data.pack_buckets", f"must be >= 1, got {d.pack_buckets}")
    if spec.head == "scalar":
      _fail("data.packing", "the reward-model trainer scores padded rows; set it False")
  if not isinstance(d.get("share_prompt", False), bool):
    _fail("data.share_prompt", f"must be True or False, got {d.share_prompt!r}")
  if d.get("share_prompt", False):
    fmt = schema.get(spec.data)
    if (not fmt.grouped and fmt.num_sequences() == 1) or spec.head == "scalar":
      _fail("data.share_prompt", f"{c.loss.name!r} has one sequence per example: "
            "nothing to share")


def _validate_counts(c: ml_collections.ConfigDict) -> None:
  """Step counts, intervals and the optimizer's learning rate and schedule."""
  for key in ("total_steps", "log_every", "checkpoint.every", "checkpoint.keep",
              "logprob_chunk_size"):
    value = c
    for part in key.split("."):
      value = value[part]
    if value <= 0:
      _fail(key, f"must be positive, got {value}")
  if c.optim.lr <= 0:
    _fail("optim.lr", "must be positive")
  if c.optim.schedule not in ("cosine", "constant"):
    _fail("optim.schedule", f"must be 'cosine' or 'constant', got {c.optim.schedule!r}")


def _validate_shardable(c: ml_collections.ConfigDict, model_cfg, mesh_shape) -> None:
  """Every parameter's partition spec is legal and each sharded dimension divides
  by its mesh axes."""
  sharding.check_partition_specs(
      transformer.partition_specs(model_cfg, tuple(tuple(r) for r in c.sharding_rules)))
  rules = dict((n, t) for n, t in c.sharding_rules)
  dims = [("n_heads", "heads"), ("n_kv_heads", "kv_heads"), ("d_ff", "mlp"),
          ("d_model", "embed"), ("vocab_size", "vocab")]
  if model_cfg.is_moe:
    if "expert" not in rules:
      _fail("sharding_rules", "no rule for logical axis 'expert' (the MoE experts; use "
            "('expert', None) to keep them whole)")
    dims += [("n_experts", "expert"), ("expert_d_ff", "mlp")]
  for field, logical in dims:
    axes = _rule_axes(rules.get(logical))
    size = math.prod(mesh_shape[a] for a in axes)
    if getattr(model_cfg, field) % size:
      name = "moe_d_ff" if field == "expert_d_ff" else field
      _fail("mesh.shape", f"model.{name}={getattr(model_cfg, field)} is not divisible by "
            f"{size} devices on mesh axes {axes} (rule {logical!r})")


def _validate_eval(c: ml_collections.ConfigDict, spec) -> None:
  """eval_every and data.eval_path (the held-out set itself is checked when it is read,
  before anything compiles: train/loop.py load_eval_set)."""
  every = c.get("eval_every", 0)
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    _fail("eval_every", f"must be an int >= 0 (0: evaluate at the end only), got {every!r}")
  path = c.data.get("eval_path", "")
  if not isinstance(path, str):
    _fail("data.eval_path", f"must be a path string, got {path!r}")
  if every and not path:
    _fail("eval_every", "evaluates on a held-out set: set data.eval_path")


def _validate_base_dtype(c: ml_collections.ConfigDict, model_cfg, mesh_shape) -> None:
  """lora.base_dtype: a known format, over LoRA adapters, on weights that split into
  blocks, whose scales shard as the weight's block axis does (a whole number of blocks
  per device)."""
  value = c.lora.get("base_dtype", "")
  try:
    fmt = quant.normalize_format(value)
  except ValueError as e:
    _fail("lora.base_dtype", str(e))
  if fmt == "none":
    return
  if c.lora.rank == 0:
    _fail("lora.base_dtype", f"{fmt!r} quantizes the frozen base under LoRA adapters: set "
          "lora.rank > 0 (a full fine-tune trains the float weights)")
  if c.get("init_from", ""):
    _fail("lora.base_dtype", f"{fmt!r} quantizes a base imported from model.hf_path (or "
          "the seed init); init_from's checkpoint holds float params: export it "
          "(`jaxalign export`) and set model.hf_path to the export instead")
  if tuple(c.data.domains):
    _fail("lora.base_dtype", "continual training (data.domains) merges its modules into "
          "a float base: leave lora.base_dtype unset")
  # Blocks run along each projection's block axis (models/quant.py, BLOCK_AXIS); in an
  # MoE model gate, up [E, D, F] and down [E, F, D] are the experts' (F: moe_d_ff).
  rules = dict((n, t) for n, t in c.sharding_rules)
  mlp = ("moe_d_ff" if model_cfg.is_moe and model_cfg.moe_d_ff is not None else "d_ff",
         model_cfg.expert_d_ff if model_cfg.is_moe else model_cfg.d_ff, "mlp",
         "the experts' down" if model_cfg.is_moe else "down")
  for axis, size, logical, weights in (
      ("d_model", model_cfg.d_model, "embed", "q, k, v, gate, up"),
      ("head_dim", model_cfg.head_dim, "head_dim", "o"), mlp):
    if size % quant.BLOCK:
      _fail("lora.base_dtype", f"{fmt!r} quantizes blocks of {quant.BLOCK} along the input "
            f"axis of {weights}: model.{axis}={size} is not a multiple of {quant.BLOCK}")
    axes = _rule_axes(rules.get(logical))
    devices = math.prod(mesh_shape[a] for a in axes)
    if (size // quant.BLOCK) % devices:
      _fail("lora.base_dtype", f"{fmt!r}: the {size // quant.BLOCK} blocks of "
            f"{quant.BLOCK} along model.{axis} (the input axis of {weights}) do not split "
            f"over the {devices} devices of mesh axes {axes} (rule {logical!r}); shard "
            f"{logical!r} over fewer devices (mesh.shape, sharding_rules)")


def _validate_lora(c: ml_collections.ConfigDict, spec, model_cfg) -> None:
  """config.lora, the OFS-DPO learning-rate ratio and the continual keys."""

  lc = c.lora
  if lc.get("param_dtype", "") not in ("", "float32", "bfloat16", "float16"):
    _fail("lora.param_dtype", f"must be '' (the base weight's dtype), 'float32', "
          f"'bfloat16' or 'float16', got {lc.param_dtype!r}")
  if isinstance(lc.rank, bool) or not isinstance(lc.rank, int) or lc.rank < 0:
    _fail("lora.rank", f"must be an int >= 0 (0 = no adapters), got {lc.rank!r}")
  if lc.rank > 0:
    if reward_model.has_scalar_head(spec):   # adapters would leave the scalar head frozen
      _fail("lora.rank", f"{c.loss.name!r} trains the whole reward model; set lora.rank=0")
    if not lc.alpha > 0:
      _fail("lora.alpha", f"must be positive, got {lc.alpha!r}")
    if not 0.0 <= lc.dropout < 1.0:
      _fail("lora.dropout", f"must be in [0, 1), got {lc.dropout!r}")
    targets = tuple(lc.targets)
    if not targets:
      _fail("lora.targets", f"must name at least one of {lora.TARGETS}")
    bad = [t for t in targets if t not in lora.TARGETS]
    if bad or len(set(targets)) != len(targets):
      _fail("lora.targets", f"must be distinct names from {lora.TARGETS}, got {targets}")
    experts = [t for t in targets if t not in lora.ATTENTION_TARGETS]
    if experts and model_cfg.is_moe:
      _fail("lora.targets", f"{experts} would adapt the MLP, which in this mixture-of-"
            f"experts model (model n_experts={model_cfg.n_experts}) is routed experts: "
            f"adapters on experts are not supported; target the attention projections "
            f"{lora.ATTENTION_TARGETS}")
  elif lc.init_adapters:
    _fail("lora.init_adapters", "needs lora.rank > 0")
  if spec.modules and lc.rank == 0:
    _fail("lora.rank", f"{c.loss.name!r} trains LoRA modules {spec.modules}: set "
          "lora.rank > 0")
  if spec.modules and c.optim.grad_accum_steps > 1:
    _fail("optim.grad_accum_steps", f"{c.loss.name!r} updates its role state once per "
          "optimizer step; gradient accumulation would count micro-batches: use 1")
  if spec.modules and not 0.0 < c.optim.slow_lr_ratio:
    _fail("optim.slow_lr_ratio", f"must be positive, got {c.optim.slow_lr_ratio!r}")

  domains = tuple(c.data.domains)
  evals = tuple(c.data.domain_eval_paths)
  if domains and c.lora.rank == 0:
    _fail("data.domains", "continual training stores LoRA modules: set lora.rank > 0")
  if evals and len(evals) != len(domains):
    _fail("data.domain_eval_paths", f"needs one path per domain ({len(domains)}), "
          f"got {len(evals)}")
  if c.cofs.enabled:
    if not domains:
      _fail("cofs.enabled", "COFS-DPO combines per-domain modules: set data.domains")
    weights = tuple(c.cofs.weights)
    if weights and len(weights) != len(domains):
      _fail("cofs.weights", f"needs one weight per domain ({len(domains)}), got {len(weights)}")
    if not weights and not evals:
      _fail("cofs.weights", "give the weights, or data.domain_eval_paths to search them on")
    if c.cofs.space not in ("delta", "factors"):
      _fail("cofs.space", f"must be 'delta' or 'factors', got {c.cofs.space!r}")
    if c.cofs.grid < 1:
      _fail("cofs.grid", f"must be >= 1, got {c.cofs.grid}")


def _validate_reference_sync(c: ml_collections.ConfigDict, spec) -> None:
  """TR-DPO's reference.sync_steps / sync_alpha (train/ref_sync.py)."""
  ref = c.reference
  steps = ref.get("sync_steps", 0)
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    _fail("reference.sync_steps", f"must be an int >= 0 (0 = no sync), got {steps!r}")
  if not steps:
    return
  alpha = ref.get("sync_alpha", 0.6)
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
    _fail("reference.sync_alpha", f"must be in (0, 1] (1 = hard copy), got {alpha!r}")
  if not spec.needs_ref:
    _fail("reference.sync_steps", f"{c.loss.name!r} uses no reference model to sync")
  if ref.mode == "precompute":
    _fail("reference.sync_steps", "TR-DPO sync moves the reference during training, so its "
          "log-probs cannot be precomputed: set reference.mode='frozen' (or sync_steps=0)")
  if spec.modules:
    _fail("reference.sync_steps", f"{c.loss.name!r} trains LoRA modules against the base; "
          "reference sync is not supported there")


def _validate_reward(c: ml_collections.ConfigDict, why: str) -> None:

  if not c.reward.name:
    _fail("reward.name", f"{why} needs a reward (e.g. 'exact_match', 'arithmetic', "
          "'reward_model' or 'module:function')")
  try:
    names = rewards.option_names(c.reward.name)
  except KeyError as e:
    _fail("reward.name", str(e.args[0]))
  if names is not None:
    for key in c.reward.options.keys():
      if key not in names:
        _fail(f"reward.options.{key}", f"not an option of reward {c.reward.name!r}; it "
              f"takes {sorted(names)}")
  if c.reward.name == "reward_model":
    import os  # local: only this check touches the file system
    path = c.reward.options.get("path", "")
    if not path or not os.path.isfile(os.path.join(path, reward_model.CONFIG_FILE)):
      _fail("reward.options.path", f"{path!r} is not a saved reward model (no "
            f"{reward_model.CONFIG_FILE}; see jaxalign.rewards.model.save_reward_model)")


def _validate_sampling(c: ml_collections.ConfigDict, spec) -> None:
  """The online, iterative and sampling sections (only what is switched on)."""
  online, iterative = c.online.enabled, c.iterative.rounds > 0
  if not (online or iterative):
    return
  s = c.sampling
  if s.max_new_tokens < 1:
    _fail("sampling.max_new_tokens", "must be >= 1")
  if not s.temperature >= 0:
    _fail("sampling.temperature", f"must be >= 0 (0: greedy), got {s.temperature}")
  if s.top_k < 0:
    _fail("sampling.top_k", "must be >= 0 (0: off)")
  if not 0 < s.top_p <= 1:
    _fail("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
  if s.batch_size < 1:
    _fail("sampling.batch_size", "must be >= 1")
  if c.data.max_prompt_length + s.max_new_tokens > c.data.max_length:
    _fail("sampling.max_new_tokens", f"data.max_prompt_length ({c.data.max_prompt_length}) + "
          f"sampling.max_new_tokens ({s.max_new_tokens}) must fit data.max_length "
          f"({c.data.max_length})")
  if online and iterative:
    _fail("iterative.rounds", "iterative rounds and online.enabled exclude each other")
  if online:
    if spec.online is None:
      _fail("online.enabled", "online sampling is for losses on 'groups' or 'negatives' "
            f"data (e.g. 'grao', 'd2o'), not {c.loss.name!r}")
    if c.online.samples_per_prompt < 1:
      _fail("online.samples_per_prompt", "must be >= 1")
    if c.online.regenerate_every < 0:
      _fail("online.regenerate_every", "must be >= 0 (0: sample once at the start)")
    if c.online.regenerate_every and spec.online != "d2o":
      _fail("online.regenerate_every", "only d2o-style negatives are kept between steps "
            "(grao-style groups are sampled every step)")
    if spec.online == "d2o" and spec.needs_ref and c.reference.mode != "frozen":
      _fail("reference.mode", "online d2o scores freshly sampled responses under the "
            "reference: use reference.mode='frozen'")
    if spec.online == "grao":
      _validate_reward(c, "online grao")
  if iterative:
    if spec.data != "pairwise":
      _fail("loss.name", f"iterative rounds build preference pairs; {c.loss.name!r} reads "
            f"{spec.data!r} data (use e.g. 'dpo')")
    if c.iterative.samples_per_prompt < 2:
      _fail("iterative.samples_per_prompt", "must be >= 2 (best vs worst)")
    for key in ("steps_per_round",):
      if c.iterative[key] < 1:
        _fail(f"iterative.{key}", "must be >= 1")
    if c.iterative.prompts_per_round < 0:
      _fail("iterative.prompts_per_round", "must be >= 0 (0: all)")
    _validate_reward(c, "iterative rounds")


def hf_model_dir(c: ml_collections.ConfigDict) -> str:
  """The local directory of `c.model.hf_path` ("" when unset); hub names are fetched once."""
  path = c.model.get("hf_path", "")
  if not path:
    return ""
  try:
    return hf.resolve_path(path)
  except Exception as e:  # hub/IO errors of any kind become one line
    raise HfConfigError(f"cannot read {path!r}: {str(e).splitlines()[0] if str(e) else e!r}"
                        ) from None


_SCAN_WORDS = {"auto": "auto", "true": True, "false": False}


def scan_layers_request(c: ml_collections.ConfigDict) -> bool | str:
  """model.scan_layers as asked: True, False or "auto".

  A --config.model.scan_layers=False flag over the "auto" default arrives as the
  string "False" (the flag takes the default's type), so "True"/"False" are read
  as the bools. A config without the key (saved before it existed) reads True.

  Raises:
    ConfigError: any other value, naming model.scan_layers.
  """
  value = c.model.get("scan_layers", True)
  if isinstance(value, bool):
    return value
  if isinstance(value, str) and value.lower() in _SCAN_WORDS:
    return _SCAN_WORDS[value.lower()]
  _fail("model.scan_layers", f"must be True, False or 'auto', got {value!r}")


def model_config(c: ml_collections.ConfigDict, *, hf_dir: str | None = None,
                 platform: str | None = None):
  """The ModelConfig named by `c.model`: the preset, or the config.json of
  `hf_path` when set, plus field overrides.

  `hf_dir`: `c`'s hf_model_dir when already known. A resolved run reads its
  RunSpec.model_cfg instead; this is for configs read back from a run's record
  (which hold model.scan_layers as a bool). `platform`: what model.scan_layers
  "auto" is resolved for (default: JAX's default backend).
  """
  hf_dir = hf_model_dir(c) if hf_dir is None else hf_dir
  if hf_dir:
    try:
      base = hf_config.config_from_hf(hf_config.read_config(hf_dir)).to_dict()
    except (OSError, ValueError, KeyError) as e:
      raise HfConfigError(f"{hf_dir}: {e}") from None
  else:
    base = transformer.preset(c.model.preset).to_dict()
  over = c.model.overrides.to_dict()
  unknown = set(over) - set(base)
  if unknown:
    raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}")
  chosen = {"attention": c.model.get("attention", "auto"),
            "moe_kernel": c.model.get("moe_kernel", "auto"),
            "scan_layers": scan_layers_request(c)}
  fields = {**base, **chosen, **over}
  if fields["scan_layers"] == "auto":
    fields["scan_layers"], _ = transformer.auto_scan_layers(
        platform or jax.default_backend(), fields["n_layers"])
  return transformer.ModelConfig.from_dict(fields)


# Every run mode, declared here once: what in a recipe selects it (the first that
# applies wins) and the trainer that runs it. jaxalign.workflows.run.train
# dispatches on the name; two flags refine a mode rather than being one:
# online (a "run" that samples inside, online.enabled: grao, d2o) and cofs
# (a "continual" whose stages are combined by COFS-DPO, cofs.enabled).
RUN_MODES = {
    "iterative": "iterative.rounds > 0: rounds of sample, score, train (workflows/iterative.py)",
    "continual": "data.domains: one LoRA stage per domain (workflows/continual.py)",
    "reward_model": "a scalar-head loss: one run (train/loop.py), exported (train/reward.py)",
    "run": "one policy run (train/loop.py)",
}


def run_mode(config: ml_collections.ConfigDict) -> str:
  """Which trainer a recipe needs, a key of RUN_MODES: "iterative" (iterative.rounds > 0),
  "continual" (data.domains), "reward_model" (a loss whose trainer is the reward
  model's) or "run" (one policy run). A resolved run holds it as RunSpec.mode."""
  if config.get("iterative", {}).get("rounds", 0) > 0:
    return "iterative"
  if config.data.get("domains"):
    return "continual"
  if losses.get(config.loss.name).head == "scalar":
    return "reward_model"
  return "run"


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The data.* values a run reads (see `defaults` for each one's meaning)."""
  train_path: str
  eval_path: str
  split: str
  tokenizer: str                    # "" : model.hf_path's own (RunSpec.tokenizer_name)
  allow_other_tokenizer: bool
  max_length: int
  max_prompt_length: int
  batch_size: int                   # global, in examples
  shuffle: bool
  on_error: str                     # "raise" | "skip"
  group_size: int | None
  packing: bool
  pack_length: int                  # 0: max_length (see row_length)
  pack_buckets: int
  share_prompt: bool
  domains: tuple[str, ...]
  domain_eval_paths: tuple[str, ...]

  @property
  def row_length(self) -> int:
    """Tokens per packed row (data.pack_length, 0 meaning data.max_length)."""
    return self.pack_length or self.max_length

  @classmethod
  def from_config(cls, d) -> "DataSpec":
    """From a validated config's data section (a key older configs lack: its default)."""
    return cls(
        train_path=d.train_path, eval_path=d.get("eval_path", ""), split=d.split,
        tokenizer=d.tokenizer, allow_other_tokenizer=bool(d.get("allow_other_tokenizer", False)),
        max_length=int(d.max_length), max_prompt_length=int(d.max_prompt_length),
        batch_size=int(d.batch_size), shuffle=bool(d.shuffle), on_error=d.on_error,
        group_size=d.get("group_size"),
        packing=bool(d.get("packing", False)), pack_length=int(d.get("pack_length", 0)),
        pack_buckets=int(d.get("pack_buckets", 3)),
        share_prompt=bool(d.get("share_prompt", False)),
        domains=tuple(d.get("domains", ())),
        domain_eval_paths=tuple(d.get("domain_eval_paths", ())))


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  """config.optim, resolved: the fields train/optim.py's *_from_config read."""
  lr: float
  warmup_steps: int
  schedule: str                     # "cosine" | "constant"
  min_lr_ratio: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  clip_norm: float
  grad_accum_steps: int
  slow_lr_ratio: float              # OFS-DPO: the slow module's lr / the fast one's

  @classmethod
  def from_config(cls, o) -> "OptimSpec":
    return cls(**{f.name: o[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  """config.checkpoint, resolved."""
  every: int
  keep: int
  async_save: bool
  fallback: bool                    # a corrupt latest step: resume from the newest that loads

  @classmethod
  def from_config(cls, c) -> "CheckpointSpec":
    return cls(every=int(c.every), keep=int(c.keep), async_save=bool(c.async_save),
               fallback=bool(c.get("fallback", False)))


@dataclasses.dataclass(frozen=True, eq=False)
class RunSpec:
  """A validated recipe, resolved once (`resolve`): what every layer below the CLI reads.

  Attributes:
    config: the recipe, immutable (FrozenConfigDict): the run's RECORD, saved with
      its checkpoints and compared on resume; layers read the fields below.
    num_devices: the device count it was validated for.
    model_cfg: its transformer.ModelConfig (preset or model.hf_path's config.json,
      plus overrides).
    hf_dir: the local directory of model.hf_path ("" when unset).
    mesh_shape: config.mesh.shape with -1 filled in for num_devices.
    rules: the logical-axis sharding rules, as tuples.
    loss: the LossSpec config.loss.name names (jaxalign.losses.get).
    loss_name: config.loss.name (canonical: a file loss's absolute path).
    hparams: loss.hparams as a dict (the loss's keyword arguments).
    options: loss.options as a dict (the loss's host-side `prepare` options).
    mode: a key of RUN_MODES.
    online: a single run sampling its groups inside (online.enabled).
    cofs: continual stages combined by COFS-DPO (cofs.enabled).
    frozen_ref: the reference is computed in the step (reference.mode "frozen").
    precompute_ref: the reference is a precomputed column ("precompute").
    ref_sync: TR-DPO's (sync_steps, sync_alpha) when the reference moves, else None.
    lora_cfg: the LoRA settings (rank 0: off).
    init_adapters: lora.init_adapters, an adapter directory to start from ("": fresh).
    data: the data.* values (DataSpec).
    optim: config.optim (OptimSpec).
    checkpoint: config.checkpoint (CheckpointSpec).
    divergence: the jaxalign.guards.DivergenceGuard settings ({}: its defaults).
    seed, total_steps, log_every, eval_every, init_from, skip_nonfinite,
    allow_config_change, logprob_chunk_size: the top-level settings of `defaults`.
    platform: the devices' platform it was resolved for ("cpu", "gpu", "tpu").
    layers_auto: why model.scan_layers="auto" chose model_cfg.scan_layers (e.g.
      "cpu, 2 layers < 16"); "" when the recipe set the layout itself.
  """
  config: ml_collections.FrozenConfigDict
  num_devices: int
  model_cfg: Any
  hf_dir: str
  mesh_shape: tuple[int, ...]
  rules: tuple
  loss: Any
  loss_name: str
  hparams: dict
  options: dict
  mode: str
  online: bool
  cofs: bool
  frozen_ref: bool
  precompute_ref: bool
  ref_sync: tuple[int, float] | None
  lora_cfg: Any
  init_adapters: str
  data: DataSpec
  optim: OptimSpec
  checkpoint: CheckpointSpec
  divergence: dict
  seed: int
  total_steps: int
  log_every: int
  eval_every: int
  init_from: str
  skip_nonfinite: bool
  allow_config_change: bool
  logprob_chunk_size: int
  platform: str = ""
  layers_auto: str = ""

  @property
  def layers_line(self) -> str:
    """The one line a run logs about its layer layout, e.g.
    "model: scan_layers=auto -> unrolled (cpu, 2 layers < 16)"."""
    layout = "scanned" if self.model_cfg.scan_layers else "unrolled"
    if self.layers_auto:
      return f"model: scan_layers=auto -> {layout} ({self.layers_auto})"
    return f"model: scan_layers={self.model_cfg.scan_layers} ({layout}, set by the config)"

  @property
  def modules(self) -> tuple[str, ...]:
    """The loss's LoRA modules (OFS-DPO: fast, slow); () for one adapter set or none."""
    return self.loss.modules

  @property
  def keep_reference(self) -> bool:
    """The train state carries a reference copy (ref_params): a frozen reference of
    a full fine-tune; with LoRA the reference is the base with adapters off, unless
    it is synced (then a copy of the adapters)."""
    return self.frozen_ref and (not self.lora_cfg.enabled or self.ref_sync is not None)

  @property
  def tokenizer_name(self) -> str:
    """data.tokenizer, or model.hf_path's directory when that is empty."""
    return self.data.tokenizer or self.hf_dir


def resolve(config, num_devices: int, *, platform: str | None = None) -> RunSpec:
  """Validates `config` for `num_devices` devices once and returns its RunSpec.

  A RunSpec passes through unchanged (it was resolved for that device count), so
  an entry point (workflows.run.train) takes either and a call path validates once.
  `platform`: the devices' platform (default: JAX's default backend; `jaxalign
  plan` passes its target's): model.scan_layers="auto" (and a flag's "True" /
  "False") becomes a bool here, in the ModelConfig and in the record.

  Raises:
    ConfigError: as `validate`, naming the key.
    ValueError: a RunSpec resolved for another device count.
  """
  if isinstance(config, RunSpec):
    if config.num_devices != num_devices:
      raise ValueError(f"the RunSpec was resolved for {config.num_devices} devices, not "
                       f"{num_devices}: resolve the config for these devices")
    return config
  platform = platform or jax.default_backend()
  model_cfg, hf_dir = validate(config, num_devices, platform=platform)
  mode = run_mode(config)
  request = scan_layers_request(config)
  layers_auto = ""
  if request == "auto" and "scan_layers" not in config.model.overrides:
    _, layers_auto = transformer.auto_scan_layers(platform, model_cfg.n_layers)
  if config.model.get("scan_layers", True) is not model_cfg.scan_layers:   # "auto", "False"...
    config = _recorded_scan_layers(config, model_cfg.scan_layers)
  c = ml_collections.FrozenConfigDict(config)
  loss = losses.get(c.loss.name)
  frozen_ref = loss.needs_ref and c.reference.mode == "frozen"
  sync_steps = c.reference.get("sync_steps", 0)   # validate() allows it with "frozen" only
  return RunSpec(
      config=c, num_devices=num_devices, model_cfg=model_cfg, hf_dir=hf_dir,
      mesh_shape=tuple(resolve_mesh_shape(c.mesh.shape, num_devices)),
      rules=tuple(tuple(r) for r in c.sharding_rules), loss=loss, loss_name=c.loss.name,
      hparams=c.loss.hparams.to_dict(), options=c.loss.options.to_dict(), mode=mode,
      online=mode == "run" and bool(c.online.enabled),
      cofs=mode == "continual" and bool(c.cofs.enabled),
      frozen_ref=frozen_ref,
      precompute_ref=loss.needs_ref and c.reference.mode == "precompute",
      ref_sync=(int(sync_steps), float(c.reference.sync_alpha))
      if frozen_ref and sync_steps else None,
      lora_cfg=lora.config_from(c.get("lora")),
      init_adapters=c.get("lora", {}).get("init_adapters", ""),
      data=DataSpec.from_config(c.data), optim=OptimSpec.from_config(c.optim),
      checkpoint=CheckpointSpec.from_config(c.checkpoint),
      divergence=c.divergence.to_dict() if "divergence" in c else {},
      seed=int(c.seed), total_steps=int(c.total_steps), log_every=int(c.log_every),
      eval_every=int(c.get("eval_every", 0)), init_from=c.init_from,
      skip_nonfinite=bool(c.skip_nonfinite),
      allow_config_change=bool(c.get("allow_config_change", False)),
      logprob_chunk_size=int(c.logprob_chunk_size), platform=platform,
      layers_auto=layers_auto)


def _recorded_scan_layers(config, scan: bool) -> ml_collections.ConfigDict:
  """A copy of `config` with model.scan_layers = `scan` (the caller's is untouched)."""
  c = copy.deepcopy(ml_collections.ConfigDict(config))
  with c.unlocked():
    if "scan_layers" in c.model:
      del c.model["scan_layers"]   # its field may be typed str ("auto")
    c.model["scan_layers"] = scan
  return c


def with_scan_layers(spec: RunSpec, scan: bool, why: str) -> RunSpec:
  """`spec` with the layer layout `scan` in its ModelConfig and its record; `why`:
  its new layers_auto (for a run with model.scan_layers="auto" that keeps the
  layout of the checkpoint it starts from, train/resume.py `keep_saved_layout`)."""
  return dataclasses.replace(
      spec, model_cfg=dataclasses.replace(spec.model_cfg, scan_layers=scan),
      config=ml_collections.FrozenConfigDict(_recorded_scan_layers(spec.config, scan)),
      layers_auto=why)


def derived_from(spec: RunSpec, parent: RunSpec) -> RunSpec:
  """`spec`, resolved from `parent`'s record (an iterative round, a continual
  stage), marked as choosing its layers as `parent` did: the record holds
  `parent`'s resolved model.scan_layers, and with "auto" behind it the derived
  run still keeps the layout of the checkpoint it starts from."""
  if not parent.layers_auto or spec.layers_auto:
    return spec
  return dataclasses.replace(spec, layers_auto=parent.layers_auto)
