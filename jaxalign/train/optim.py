"""The optimizer: AdamW, linear warm-up then cosine decay, global-norm clipping."""

import optax


def make_schedule(*, lr: float, warmup_steps: int, total_steps: int, schedule: str,
                  min_lr_ratio: float) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine decay to `lr*min_lr_ratio` (or flat)."""
  warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
  decay_steps = max(total_steps - warmup_steps, 1)
  if schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
  else:
    after = optax.constant_schedule(lr)
  return optax.join_schedules([warmup, after], [max(warmup_steps, 1)])


def make_optimizer(*, lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
                   min_lr_ratio: float = 0.1, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, clip_norm: float = 1.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns the transformation and its learning-rate schedule (for logging)."""
  sched = make_schedule(lr=lr, warmup_steps=warmup_steps, total_steps=total_steps,
                        schedule=schedule, min_lr_ratio=min_lr_ratio)
  parts = []
  if clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts), sched


def optimizer_from_config(optim_config, *, total_steps: int
                          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`make_optimizer` with the values of a config's `optim` section (the CLI boundary)."""
  c = optim_config
  return make_optimizer(lr=c.lr, warmup_steps=c.warmup_steps, total_steps=total_steps,
                        schedule=c.schedule, min_lr_ratio=c.min_lr_ratio,
                        weight_decay=c.weight_decay, b1=c.b1, b2=c.b2, eps=c.eps,
                        clip_norm=c.clip_norm)


def module_lr_scales(optim_config, modules: tuple[str, ...]) -> dict[str, float]:
  """Learning rate of each LoRA module relative to optim.lr: OFS-DPO's slow module
  runs at optim.slow_lr_ratio, every other module (the fast one) at 1."""
  return {m: (float(optim_config.slow_lr_ratio) if m == "slow" else 1.0) for m in modules}


def modules_optimizer_from_config(optim_config, *, total_steps: int,
                                  modules: tuple[str, ...]
                                  ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """One optimizer per module of params {name: adapters}, each with its own
  clipping, moments and learning rate (the schedule scaled per `module_lr_scales`).

  Returns the combined transformation and the unscaled schedule (for logging).
  """
  scales = module_lr_scales(optim_config, modules)
  parts = {}
  for name in modules:
    c = optim_config
    parts[name], _ = make_optimizer(
        lr=c.lr * scales[name], warmup_steps=c.warmup_steps, total_steps=total_steps,
        schedule=c.schedule, min_lr_ratio=c.min_lr_ratio, weight_decay=c.weight_decay,
        b1=c.b1, b2=c.b2, eps=c.eps, clip_norm=c.clip_norm)
  _, schedule = optimizer_from_config(optim_config, total_steps=total_steps)
  return optax.multi_transform(parts, {m: m for m in modules}), schedule
