# Copyright 2026 The flora_optax Authors.
# SPDX-License-Identifier: Apache-2.0

"""Which outputs of a traced function depend on which inputs.

:func:`flora_optax.quantized` runs its inner transformation leaf by leaf,
which computes what the whole-tree update computes only if the update is
separable over parameter leaves: the update and the state of leaf ``k``
depend on leaf ``k``'s gradient, parameter and state (and on shared scalars
such as a step count), never on another leaf's. This module reads that off
the update's jaxpr: each input gets a set of labels (a bit mask), and every
equation passes the union of its inputs' labels to its outputs. Calls,
``cond``, ``while`` and ``scan`` are followed into their bodies (loops to a
fixed point), so a per-leaf loop (Muon's Newton-Schulz iteration) or a
``cond`` on the step count (``optax.MultiSteps``) does not look coupled; any
other primitive with a sub-program is taken as coupling all its inputs
(conservative: it can only reject, never accept wrongly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jex_core


def _jaxprs(eqn: Any) -> list[Any]:
  """The sub-programs among an equation's parameters."""
  found = []
  for value in eqn.params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(v, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
        found.append(v)
  return found


def _open(j: Any) -> Any:
  return j.jaxpr if isinstance(j, jex_core.ClosedJaxpr) else j


def _union(masks: Sequence[int]) -> int:
  out = 0
  for m in masks:
    out |= m
  return out


def _loop(body: Callable[[list[int]], list[int]], carry: list[int]
          ) -> list[int]:
  """The carry's labels at the fixed point of ``carry |= body(carry)``."""
  while True:
    new = [c | b for c, b in zip(carry, body(carry))]
    if new == carry:
      return carry
    carry = new


def _eqn(eqn: Any, ins: list[int]) -> list[int]:
  """The labels of an equation's outputs from its inputs'."""
  name = eqn.primitive.name
  p = eqn.params
  n_out = len(eqn.outvars)
  if name == 'cond':
    index, ops = ins[0], ins[1:]
    outs = [0] * n_out
    for branch in p['branches']:
      outs = [o | b for o, b in zip(outs, dependencies(_open(branch), ops))]
    return [o | index for o in outs]
  if name == 'while':
    nc, nb = p['cond_nconsts'], p['body_nconsts']
    cconsts, bconsts, carry = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]
    cond, body = _open(p['cond_jaxpr']), _open(p['body_jaxpr'])

    def step(c):
      pred = dependencies(cond, cconsts + c)[0]
      return [b | pred for b in dependencies(body, bconsts + c)]

    return _loop(step, list(carry))
  if name == 'scan':
    nconst, ncarry = p['num_consts'], p['num_carry']
    consts, carry, xs = ins[:nconst], ins[nconst:nconst + ncarry], ins[
        nconst + ncarry:]
    body = _open(p['jaxpr'])
    carry = _loop(lambda c: dependencies(body, consts + c, )[:ncarry],
                  list(carry))
    return dependencies(body, consts + carry + xs)
  subs = _jaxprs(eqn)
  if len(subs) == 1:
    sub = _open(subs[0])
    if len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
      return dependencies(sub, ins)  # a call (jit, custom_jvp, ...)
  return [_union(ins)] * n_out


def dependencies(jaxpr: Any, in_labels: Sequence[int]) -> list[int]:
  """Per output of ``jaxpr`` (a ``Jaxpr``), the union of the labels of the
  inputs it depends on (``in_labels``: one bit mask per input)."""
  env: dict[Any, int] = {}

  def read(v):
    return 0 if isinstance(v, jex_core.Literal) else env.get(v, 0)

  for v, m in zip(jaxpr.invars, in_labels):
    env[v] = m
  for eqn in jaxpr.eqns:
    for v, m in zip(eqn.outvars, _eqn(eqn, [read(x) for x in eqn.invars])):
      env[v] = m
  return [read(v) for v in jaxpr.outvars]


def output_labels(fn: Callable[..., Any], args: Sequence[Any],
                  labels: Sequence[int]) -> list[int]:
  """The labels of each leaf of ``fn(*args)``'s output, from one label mask
  per leaf of ``args`` (arrays or ``ShapeDtypeStruct``\\ s; traced, not
  run)."""
  flat, treedef = jax.tree.flatten(list(args))

  def flat_fn(*leaves):
    return jax.tree.leaves(fn(*jax.tree.unflatten(treedef, leaves)))

  closed = jax.make_jaxpr(flat_fn)(*flat)
  return dependencies(closed.jaxpr, list(labels))
