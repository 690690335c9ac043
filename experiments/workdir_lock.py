"""One run per workdir: an advisory lock file, WORKDIR/.lock.

``hold(workdir)`` takes an exclusive ``fcntl.flock`` on the file for the
run's lifetime and writes the holder's pid, host and start time into it. A
second run on the same workdir (another process, or the same one) fails at
once with :class:`WorkdirLockedError` naming the holder. The kernel drops
the lock when its process dies, even by kill -9, so a lock file left by a
dead run is taken over (with a warning naming it). On a multi-host run only
process 0 takes the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Iterator

import jax
from absl import logging as absl_logging

__all__ = ["LOCK_FILE", "WorkdirLockedError", "hold"]

LOCK_FILE = ".lock"


class WorkdirLockedError(ValueError):
  """Another run holds the workdir (a ValueError: the --workdir value is the
  problem, and the absl mains print it as one line)."""


def _holder(text: str) -> str:
  try:
    info = json.loads(text)
    return (f"pid {info['pid']} on host {info['host']}, since "
            f"{info['started']}")
  except (ValueError, KeyError, TypeError):
    return "a process that left no pid"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/.lock for the body (process 0 only on a multi-host run).

  Raises:
    WorkdirLockedError: another run holds it.
  """
  if jax.process_index():
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      with open(path, encoding="utf-8", errors="replace") as f:
        holder = _holder(f.read())
      raise WorkdirLockedError(
          f"{workdir} is in use by another run ({holder}; lock file {path}); "
          "wait for it to finish, stop it, or use another --workdir") from None
    with open(path, encoding="utf-8", errors="replace") as f:
      left = f.read().strip()
    if left:    # its holder died without releasing it (kill -9, a crash)
      absl_logging.warning("taking over the lock %s left by %s, which is no "
                           "longer running", path, _holder(left))
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)      # released cleanly: nothing to take over
  finally:
    os.close(fd)              # closing drops the flock
