"""A timer that ends the process when one training program hangs.

Some XLA:CPU programs wedge at random on jaxlib 0.10.2; the hung row is
counted in ``quality_hung.json`` so that ``--resume`` goes on without it.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from benchmarks.quality.settings import NAME

_TIMERS: list[Any] = []


def hung_path(out: str) -> str:
  """Where the hung rows are counted."""
  return os.path.join(out, f'{NAME}_hung.json')


def read_hung(out: str) -> dict[str, int]:
  """How many times each row hung (by :func:`row_key`)."""
  if not os.path.exists(hung_path(out)):
    return {}
  with open(hung_path(out)) as f:
    return json.load(f)


def row_key(task: str, optimizer: str, ratio: int | None) -> str:
  """A row's name in the hung counts."""
  return f'{task}/{optimizer}/{ratio or "-"}'


def arm_watchdog(seconds: float | None, out: str = '',
                  row: str = '') -> None:
  """(Re)starts a timer that ends the process if a row hangs.

  The hung row is counted in ``quality_hung.json`` so that ``--resume``
  skips it after ``MAX_HANGS`` tries. ``seconds=None`` only cancels.
  """
  while _TIMERS:
    _TIMERS.pop().cancel()
  if seconds:

    def fire():
      print(f'watchdog: {row} did not finish in {seconds:g} s; exiting '
            '(rerun with --resume)', flush=True)
      hung = read_hung(out)
      hung[row] = hung.get(row, 0) + 1
      with open(hung_path(out), 'w') as f:
        json.dump(hung, f)
      os._exit(3)  # pylint: disable=protected-access

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    _TIMERS.append(timer)

