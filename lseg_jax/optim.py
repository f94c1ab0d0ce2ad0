"""Optimiser and learning-rate schedule from the config (the official recipe's
shape: SGD momentum 0.9, L2 weight decay on every parameter, poly(0.9) decay
stepped per epoch, the decoder at 10x the backbone's learning rate)."""

import flax
import ml_collections
import optax


def schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """lr(step) for config.schedule: poly (per epoch or per step) or cosine, with warmup."""
  s = config.schedule
  total = config.total_steps
  base = config.lr

  def fn(step):
    step = step.astype("float32") if hasattr(step, "astype") else float(step)
    if s.kind == "poly":
      # The official LambdaLR is stepped once per epoch: lr is constant within one.
      t = (step // steps_per_epoch) * steps_per_epoch if s.per_epoch else step
      lr = base * (1.0 - t / total) ** s.power
    elif s.kind == "cosine":
      lr = optax.cosine_decay_schedule(base, total)(step)
    elif s.kind == "constant":
      lr = base + 0.0 * step
    else:
      raise ValueError(f"schedule.kind={s.kind!r} is not one of poly, cosine, constant")
    if s.warmup_steps:
      lr = lr * optax.linear_schedule(0.0, 1.0, s.warmup_steps)(step)
    return lr

  return fn


def param_groups(params, lr_mults: dict[str, float]):
  """The top-level module of every parameter ('backbone', 'fusion', ...) names
  its group; groups missing from lr_mults train at 1x."""
  return flax.traverse_util.path_aware_map(lambda path, _: path[0] if path[0] in lr_mults else "base", params)


def make_optimizer(config: ml_collections.ConfigDict, params, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transform for `config.optax_name` and its base schedule."""
  sched = schedule(config, steps_per_epoch)
  lr_mults = dict(config.lr_mults)

  def opt(mult: float) -> optax.GradientTransformation:
    lr = lambda step: mult * sched(step)
    if config.optax_name == "sgd":
      # torch SGD: g += wd * p; buf = m * buf + g; p -= lr * buf.
      return optax.chain(optax.add_decayed_weights(config.wd), optax.sgd(lr, momentum=config.momentum))
    if config.optax_name == "adamw":
      return optax.adamw(lr, weight_decay=config.wd)
    raise ValueError(f"optax_name={config.optax_name!r} is not one of sgd, adamw")

  groups = {name: opt(mult) for name, mult in lr_mults.items()} | {"base": opt(1.0)}
  tx = optax.multi_transform(groups, param_groups(params, lr_mults))
  if config.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx, sched
