"""The pure, per-device pieces of fine-tuning: train state, optimizer, learning rate, train and eval steps.

Everything here is written for one device and reduces over `bit.parallel.DATA_AXIS`; `bit.parallel`
runs it on all devices with `shard_map` or `pmap`. Nothing here reads a config or touches the disk.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax import lax

from bit import freeze, hyperrule, models
from bit.config import default
from bit.errors import ConfigError
from bit.parallel import DATA_AXIS

MOMENTUM = 0.9  # official BiT: SGD with momentum 0.9, no weight decay


class TrainState(train_state.TrainState):
  """flax's TrainState (step, params, opt_state, apply_fn, tx) plus the static bits of the step.

  `lr_fn(step)` is the learning-rate schedule (for the logged `lr`; the optimizer holds the same function).
  `accum_steps` splits each device's batch into that many micro-batches whose gradients are averaged.
  `split` (a `bit.freeze.Split`) says which params are trained: the step differentiates only those, and
  applies `forward_fn` (the model, with pre-standardized kernels for a ResNetV2) to the params of
  `split.forward_params`. `frozen` holds the frozen conv kernels standardized once (`split.prepare_frozen`):
  derived from `params`, never checkpointed (`state_to_tree` leaves it out, `tree_to_state` recomputes it).
  `loss_fn(logits, labels, images, extra) -> scalar` replaces the label cross-entropy when set (`extra` is
  the step's extra input, e.g. a teacher's params for `bit.distill`); it is called inside the differentiated
  function, so whatever it computes from `images` and `extra` alone is forward-only.
  """

  lr_fn: Callable[..., Any] = struct.field(pytree_node=False)
  accum_steps: int = struct.field(pytree_node=False, default=1)
  split: freeze.Split | None = struct.field(pytree_node=False, default=None)
  forward_fn: Callable[..., Any] | None = struct.field(pytree_node=False, default=None)
  frozen: tuple[Any, ...] = ()
  loss_fn: Callable[..., Any] | None = struct.field(pytree_node=False, default=None)


def lr_schedule(supports: Any, base_lr: float) -> Any:
  """The BiT learning rate for explicit step boundaries [warmup, decay1, decay2, decay3, total], in-graph.

  `bit.hyperrule.lr_schedule(base_lr=base_lr, supports=supports)`: the one implementation of the schedule.
  """
  return hyperrule.lr_schedule(base_lr=float(base_lr), supports=supports)


def make_optimizer(
  lr_fn: Any,
  *,
  params: Any = None,
  transfer: str = default('transfer'),
  unfreeze_stages: int = default('unfreeze_stages'),
  unfreeze_units: int = default('unfreeze_units'),
  backbone_lr_scale: float = default('backbone_lr_scale'),
  trainable_mask: Any = None,
) -> optax.GradientTransformation:
  """The one optimizer of the project: SGD, momentum 0.9, no weight decay, learning rate `lr_fn(step)`.

  Transfer learning is a mask over this same optimizer (`bit.freeze.masked_optimizer`): `transfer` is
  'full' (every parameter), 'head' (the head only) or 'partial' (the head, norm_pre_head and the top
  `unfreeze_stages` stages or `unfreeze_units` units); frozen parameters get an update of exactly zero and
  no momentum state. `backbone_lr_scale` scales the learning rate of the trained parameters below the head.
  `params` (or any tree of the same structure) is needed for every setting but the default.
  `trainable_mask` (a tree of bools shaped like the params) is an explicit mask instead of a mode.
  """
  tx = optax.chain(optax.trace(decay=MOMENTUM, nesterov=False), optax.scale_by_learning_rate(lr_fn))
  if trainable_mask is not None:
    if transfer != 'full' or unfreeze_stages or unfreeze_units:
      raise ConfigError('Give either a trainable_mask or a transfer mode, not both.')
    labels = jax.tree.map(lambda t: freeze.TRAINABLE if t else freeze.FROZEN, trainable_mask)
    return optax.multi_transform({freeze.TRAINABLE: tx, freeze.FROZEN: optax.set_to_zero()}, labels)
  if transfer == 'full' and float(backbone_lr_scale) == 1.0:
    return tx  # the official optimizer, untouched
  if params is None:
    raise ConfigError(f'make_optimizer(transfer={transfer!r}, ...) needs the params to build its mask.')
  return freeze.masked_optimizer(
    tx,
    params,
    transfer,
    unfreeze_stages=unfreeze_stages or None,
    unfreeze_units=unfreeze_units or None,
    backbone_lr_scale=float(backbone_lr_scale),
  )


def create_state(
  model: Any,
  params: Any,
  lr_fn: Any,
  *,
  accum_steps: int = 1,
  trainable_mask: Any = None,
  loss_fn: Any = None,
  **transfer: Any,
) -> TrainState:
  """A fresh TrainState at step 0 for `model` (a linen module) and its params.

  `loss_fn` replaces the label cross-entropy (see `TrainState`). `transfer` takes `make_optimizer`'s keywords (`transfer`, `unfreeze_stages`, `unfreeze_units`,
  `backbone_lr_scale`).
  """
  if int(accum_steps) < 1:
    raise ConfigError(f'config.accum_steps must be >= 1, got {accum_steps}.')
  tx = make_optimizer(lr_fn, params=params, trainable_mask=trainable_mask, **transfer)
  if trainable_mask is None:
    trainable_mask = freeze.trainable_mask(
      params,
      transfer.get('transfer', default('transfer')),
      unfreeze_stages=transfer.get('unfreeze_stages') or None,
      unfreeze_units=transfer.get('unfreeze_units') or None,
    )
  # A ResNetV2 is applied with pre-standardized kernels (the inference form): the frozen ones are then
  # standardized once per run instead of at every step. Other modules run as they are.
  prestandardize = isinstance(model, models.ResNetV2) and not model.standardized
  template = TrainState(
    step=0,
    apply_fn=model.apply,
    params=None,
    tx=tx,
    opt_state=None,
    lr_fn=lr_fn,
    accum_steps=int(accum_steps),
    split=freeze.Split.create(params, trainable_mask, standardized=prestandardize),
    forward_fn=model.clone(standardized=True).apply if prestandardize else model.apply,
    loss_fn=loss_fn,
  )
  return start_state(template, params)


def start_state(template: TrainState, params: Any) -> TrainState:
  """The step-0 state of `template`'s setup (model, optimizer, schedule, split) for `params`: a fresh
  optimizer state and the frozen kernels standardized. `template` may hold no arrays (params=None)."""
  return template.replace(
    step=0, params=params, opt_state=template.tx.init(params), frozen=_prepare(template, params)
  )


def _prepare(state: TrainState, params) -> tuple:
  return state.split.prepare_frozen(params) if state.split is not None else ()


def cross_entropy(logits: Any, labels: Any) -> jax.Array:
  """Mean softmax cross-entropy against (possibly MixUp-mixed) one-hot labels, in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(labels.astype(jnp.float32) * logp, axis=-1))


def _pmean(x, axis_name):
  # Over one device the mean is the identity, but XLA still runs the all-reduce: a copy of every gradient
  # that also keeps the optimizer update from fusing with the gradient's last elementwise pass.
  if axis_name is None or lax.axis_size(axis_name) == 1:
    return x
  return lax.pmean(x, axis_name)


def _split(state: TrainState):
  if state.split is not None:
    return state.split, state.forward_fn
  n = len(jax.tree.leaves(state.params))  # a TrainState made by hand: everything trains
  return freeze.Split((True,) * n, (False,) * n), state.apply_fn


def trainable_loss(state: TrainState, images: Any, labels: Any, extra: Any = None) -> Any:
  """(loss_fn, trainable leaves): the loss of the batch as a function of the trainable leaves alone, what
  the step differentiates. The frozen leaves enter as constants, so JAX runs the network below the lowest
  trainable layer forward only and keeps none of its activations for the backward pass. `extra` goes to
  `state.loss_fn`, when there is one."""
  split, forward = _split(state)
  leaves, treedef, trainable = split.partition(state.params)

  def loss_fn(trainable):
    params = split.forward_params(treedef, leaves, trainable, state.frozen)
    logits = forward({'params': params}, images)
    if state.loss_fn is not None:
      return state.loss_fn(logits, labels, images, extra)
    return cross_entropy(logits, labels)

  return loss_fn, trainable


def loss_and_grads(state: TrainState, images: Any, labels: Any, extra: Any = None) -> tuple[Any, Any]:
  """(loss, grads) of one batch as the train step computes them; `grads` is shaped like the params, exactly
  zero for frozen ones (which the step never differentiates)."""
  loss_fn, trainable = trainable_loss(state, images, labels, extra)
  loss, grads = jax.value_and_grad(loss_fn)(trainable)
  split, _ = _split(state)
  leaves, treedef = jax.tree.flatten(state.params)
  return loss, split.merge(treedef, [jnp.zeros_like(x) for x in leaves], grads)


def train_step(state: TrainState, batch: Any, axis_name: str | None = DATA_AXIS, extra: Any = None) -> Any:
  """One SGD update from this device's `batch` {'image': (B, H, W, 3), 'label': (B, C)}.

  Gradients (and the loss) are averaged over `axis_name`, so every device applies the same update; with
  `state.accum_steps` > 1 the device batch is cut into micro-batches whose gradients are averaged first,
  which gives the update of the whole batch at a fraction of the activation memory. `axis_name=None`
  runs it outside any device mapping. Only the trainable params (`state.split`) are differentiated, and
  only their gradients are averaged and counted in `grad_norm`; frozen params are passed through untouched.
  `extra` is passed, unchanged and undifferentiated, to `state.loss_fn` with every (micro-)batch. Returns (new state, {'loss', 'lr', 'grad_norm'}).
  """
  split, _ = _split(state)
  leaves, treedef, trainable = split.partition(state.params)

  def grad_fn(images, labels):
    loss_fn, _ = trainable_loss(state, images, labels, extra)
    return jax.value_and_grad(loss_fn)(trainable)

  images, labels = batch['image'], batch['label']
  k = state.accum_steps
  if k == 1:
    loss, grads = grad_fn(images, labels)
  else:

    def micro(x):
      return x.reshape((k, x.shape[0] // k) + x.shape[1:])

    def body(carry, mb):
      loss, grads = grad_fn(*mb)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
    (loss, grads), _ = lax.scan(body, zeros, (micro(images), micro(labels)))
    loss, grads = jax.tree.map(lambda x: x / k, (loss, grads))
  loss, grads = _pmean((loss, grads), axis_name)
  metrics = {'loss': loss, 'lr': state.lr_fn(state.step), 'grad_norm': optax.tree.norm(grads)}
  # The optimizer (and its masks) sees the whole tree; the frozen zeros and their zero updates are dead
  # code XLA drops, and the frozen params are passed through rather than added to (-0.0 + 0.0 is +0.0).
  full = split.merge(treedef, [jnp.zeros_like(x) for x in leaves], grads)
  updates, opt_state = state.tx.update(full, state.opt_state, state.params)
  _, _, new = split.partition(optax.apply_updates(state.params, updates))
  params = split.merge(treedef, leaves, new)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# --- host-side (numpy) form of the state, as it is checkpointed -----------------------------------------


def state_to_tree(state: TrainState) -> dict[str, Any]:
  """{'step', 'params', 'opt_state'} as plain nested dicts of numpy arrays (copies)."""
  tree = {
    'step': state.step,
    'params': state.params,
    'opt_state': flax.serialization.to_state_dict(state.opt_state),
  }
  return jax.tree.map(lambda x: np.array(x), tree)


def tree_to_state(state: TrainState, tree: Any) -> TrainState:
  """The inverse of `state_to_tree`, using `state` for the structure and the static fields."""
  params = jax.tree.map(np.asarray, tree['params'])
  return state.replace(
    step=np.asarray(tree['step']),
    params=params,
    opt_state=flax.serialization.from_state_dict(state.opt_state, tree['opt_state']),
    frozen=_prepare(state, params),
  )
