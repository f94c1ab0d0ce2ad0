"""Optimiser and learning-rate schedule from the config: the official recipe
(lang-seg `LSegmentationModule.configure_optimizers`) and the alternatives.

Official: torch SGD, momentum 0.9, coupled L2 weight decay on EVERY trained
parameter (biases, norms, pos_embed and cls_token included); lr = base_lr /
16 * per-GPU batch for the `pretrained` group (the ViT and its reassemble
layers: our `backbone` + `reassemble`) and 10x that for `scratch` (our
`fusion` + `head`); LambdaLR (1 - epoch / max_epochs) ** 0.9 stepped once
per epoch. The text tower is in no group: it is not in our trained params.
"""

import flax
import ml_collections
import optax


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
  """`config.lr`, or the official `base_lr / 16 * per-replica batch` with the
  per-replica batch = input.batch_size / grad_accum_steps / ddp_replicas
  (lang-seg `self.base_lr = base_lr / 16 * batch_size`, per GPU): a larger
  batch gives a larger lr, as officially."""
  if (config.lr is None) == (config.get("base_lr") is None):
    raise ValueError(f"set exactly one of lr ({config.lr}) and base_lr ({config.get('base_lr')})")
  if config.lr is not None:
    return config.lr
  per_replica = config.input.batch_size / config.grad_accum_steps / config.ddp_replicas
  return config.base_lr / 16 * per_replica


def schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """lr(step) for config.schedule: poly (per epoch or per step), cosine or
  constant, times a linear warmup over `warmup_steps`.

  poly with per_epoch is the official LambdaLR stepped per epoch:
  lr(step) = base * (1 - (step // steps_per_epoch) / horizon) ** power, the
  horizon in epochs (`horizon_epochs`, or the run's length: the zero-shot runs
  stop after 4 of their max_epochs).
  """
  s = config.schedule
  base = base_learning_rate(config)
  total = config.total_steps
  if s.kind == "poly":
    horizon = round(s.horizon_epochs * steps_per_epoch) if s.get("horizon_epochs") else total  # in steps
    poly = optax.polynomial_schedule(base, 0.0, s.power, transition_steps=max(horizon, 1))
    unit = steps_per_epoch if s.per_epoch else 1
    fn = lambda step: poly(step // unit * unit)  # per epoch: the lr of the epoch's first step
  elif s.kind == "cosine":
    fn = optax.cosine_decay_schedule(base, total)
  elif s.kind == "constant":
    fn = optax.constant_schedule(base)
  else:
    raise ValueError(f"schedule.kind={s.kind!r} is not one of poly, cosine, constant")
  if not s.warmup_steps:
    return fn
  warmup = optax.linear_schedule(0.0, 1.0, s.warmup_steps)
  return lambda step: fn(step) * warmup(step)


def param_groups(params, lr_mults: dict[str, float]):
  """The top-level module of every parameter ('backbone', 'fusion', ...) names
  its group; groups missing from lr_mults train at 1x."""
  return flax.traverse_util.path_aware_map(lambda path, _: path[0] if path[0] in lr_mults else "base", params)


def make_optimizer(config: ml_collections.ConfigDict, params, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transform for `config.optax_name` and its base schedule (the
  1x group's lr; a group's lr is its `lr_mults` times that)."""
  sched = schedule(config, steps_per_epoch)
  lr_mults = dict(config.lr_mults)

  def opt(mult: float) -> optax.GradientTransformation:
    lr = lambda step: mult * sched(step)
    if config.optax_name == "sgd":
      # torch SGD: d = g + wd * p; buf = d (first step), buf = m * buf + d; p -= lr * buf.
      # optax's trace starts from zeros, so its first buf is d as well.
      return optax.chain(optax.add_decayed_weights(config.wd), optax.sgd(lr, momentum=config.momentum))
    if config.optax_name == "adamw":
      return optax.adamw(lr, weight_decay=config.wd)
    raise ValueError(f"optax_name={config.optax_name!r} is not one of sgd, adamw")

  groups = {name: opt(mult) for name, mult in lr_mults.items()} | {"base": opt(1.0)}
  tx = optax.multi_transform(groups, param_groups(params, lr_mults))
  if config.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx, sched
