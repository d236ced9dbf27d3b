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

from bit.errors import ConfigError
from bit.parallel import DATA_AXIS

MOMENTUM = 0.9  # official BiT: SGD with momentum 0.9, no weight decay


class TrainState(train_state.TrainState):
  """flax's TrainState (step, params, opt_state, apply_fn, tx) plus the static bits of the step.

  `lr_fn(step)` is the learning-rate schedule (for the logged `lr`; the optimizer holds the same function).
  `accum_steps` splits each device's batch into that many micro-batches whose gradients are averaged.
  """

  lr_fn: Callable = struct.field(pytree_node=False)
  accum_steps: int = struct.field(pytree_node=False, default=1)


def lr_schedule(supports, base_lr: float):
  """The BiT learning rate for step boundaries [warmup, decay1, decay2, decay3, total], in-graph.

  Linear warmup from 0 over `warmup` steps, then `base_lr` divided by 10 at each decay boundary strictly
  below the step: the official `get_lr`, and `bit.hyperrule.lr_schedule` for boundaries given explicitly
  (a config's `schedule`) rather than derived from the dataset size.
  """
  supports = [int(s) for s in supports]
  warmup, decays = supports[0], supports[1:-1]
  base_lr = float(base_lr)

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    num_decays = sum((step > s).astype(jnp.float32) for s in decays)
    decayed = base_lr * jnp.power(jnp.float32(0.1), num_decays)
    if warmup == 0:
      return decayed
    return jnp.where(step < warmup, base_lr * step / warmup, decayed)

  return fn


def make_optimizer(lr_fn, *, trainable_mask=None) -> optax.GradientTransformation:
  """The one optimizer of the project: SGD, momentum 0.9, no weight decay, learning rate `lr_fn(step)`.

  `trainable_mask` (a tree of bools shaped like the params, or None for all-trainable) is the hook for
  freezing: frozen parameters get an update of exactly zero and no momentum state.
  """
  tx = optax.chain(optax.trace(decay=MOMENTUM, nesterov=False), optax.scale_by_learning_rate(lr_fn))
  if trainable_mask is not None:
    labels = jax.tree.map(lambda t: 'train' if t else 'freeze', trainable_mask)
    tx = optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)
  return tx


def create_state(model, params, lr_fn, *, accum_steps: int = 1, trainable_mask=None) -> TrainState:
  """A fresh TrainState at step 0 for `model` (a linen module) and its params."""
  if int(accum_steps) < 1:
    raise ConfigError(f'config.accum_steps must be >= 1, got {accum_steps}.')
  tx = make_optimizer(lr_fn, trainable_mask=trainable_mask)
  return TrainState.create(
    apply_fn=model.apply, params=params, tx=tx, lr_fn=lr_fn, accum_steps=int(accum_steps)
  )


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy against (possibly MixUp-mixed) one-hot labels, in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(labels.astype(jnp.float32) * logp, axis=-1))


def _pmean(x, axis_name):
  return x if axis_name is None else lax.pmean(x, axis_name)


def train_step(state: TrainState, batch, axis_name: str | None = DATA_AXIS):
  """One SGD update from this device's `batch` {'image': (B, H, W, 3), 'label': (B, C)}.

  Gradients (and the loss) are averaged over `axis_name`, so every device applies the same update; with
  `state.accum_steps` > 1 the device batch is cut into micro-batches whose gradients are averaged first,
  which gives the update of the whole batch at a fraction of the activation memory. `axis_name=None`
  runs it outside any device mapping. Returns (new state, {'loss', 'lr', 'grad_norm'}).
  """

  def loss_fn(params, images, labels):
    return cross_entropy(state.apply_fn({'params': params}, images), labels)

  grad_fn = jax.value_and_grad(loss_fn)
  images, labels = batch['image'], batch['label']
  k = state.accum_steps
  if k == 1:
    loss, grads = grad_fn(state.params, images, labels)
  else:

    def micro(x):
      return x.reshape((k, x.shape[0] // k) + x.shape[1:])

    def body(carry, mb):
      loss, grads = grad_fn(state.params, *mb)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = lax.scan(body, zeros, (micro(images), micro(labels)))
    loss, grads = jax.tree.map(lambda x: x / k, (loss, grads))
  loss, grads = _pmean((loss, grads), axis_name)
  metrics = {'loss': loss, 'lr': state.lr_fn(state.step), 'grad_norm': optax.tree.norm(grads)}
  return state.apply_gradients(grads=grads), metrics


def eval_step(state: TrainState, batch, axis_name: str | None = DATA_AXIS):
  """Counts over this device's `batch` {'image', 'label': int (B,), 'mask': bool (B,)}, summed over devices.

  Returns {'correct1', 'correct5', 'count', 'loss_sum'}; padded examples (mask False) count for nothing.
  """
  logits = state.apply_fn({'params': state.params}, batch['image']).astype(jnp.float32)
  labels = batch['label'].astype(jnp.int32)
  mask = batch['mask'].astype(jnp.float32)
  k = min(5, logits.shape[-1])
  _, top = lax.top_k(logits, k)
  hit1 = (top[:, 0] == labels).astype(jnp.float32)
  hit5 = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  out = {
    'correct1': jnp.sum(hit1 * mask),
    'correct5': jnp.sum(hit5 * mask),
    'count': jnp.sum(mask),
    'loss_sum': jnp.sum(nll * mask),
  }
  return out if axis_name is None else lax.psum(out, axis_name)


# --- host-side (numpy) form of the state, as it is checkpointed -----------------------------------------


def state_to_tree(state: TrainState) -> dict[str, Any]:
  """{'step', 'params', 'opt_state'} as plain nested dicts of numpy arrays (copies)."""
  tree = {
    'step': state.step,
    'params': state.params,
    'opt_state': flax.serialization.to_state_dict(state.opt_state),
  }
  return jax.tree.map(lambda x: np.array(x), tree)


def tree_to_state(state: TrainState, tree) -> TrainState:
  """The inverse of `state_to_tree`, using `state` for the structure and the static fields."""
  return state.replace(
    step=np.asarray(tree['step']),
    params=jax.tree.map(np.asarray, tree['params']),
    opt_state=flax.serialization.from_state_dict(state.opt_state, tree['opt_state']),
  )
