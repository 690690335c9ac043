"""What a training run logs: metrics.jsonl, TensorBoard events, a progress
bar and absl log lines.

``RunLog`` is entered once per ``trainer.train`` call; on a multi-host run
only process 0 writes the files (the others log to absl only). A resumed run
first drops the records a killed run logged past the checkpoint it resumes
from (``truncate_metrics``; TensorBoard's ``purge_step`` does the same for
events). ``write_eval_scalars`` puts a study's evaluation records into
TensorBoard beside them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import Callable, Mapping, Sequence

import jax
from absl import logging as absl_logging

from extrapolax.experiments import jsonl


def read_metrics(workdir: str) -> list[dict]:
  """The records of metrics.jsonl (empty if there is none; a torn last
  line is dropped with a warning)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  records = []
  for number, record in jsonl.read(path):
    if not isinstance(record, dict) or not isinstance(record.get("step"),
                                                      int):
      raise ValueError(f"{path}:{number}: not a metrics record (no integer "
                       "'step'); fix or delete that line")
    records.append(record)
  return records


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Drops records past the checkpoint a run resumes from (a crash after
  logging, before its checkpoint, would repeat them), and repeated steps
  (the last one kept), in step order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return
  by_step = {r["step"]: r for r in read_metrics(workdir)
             if r["step"] <= last_step}
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(by_step[s]) + "\n" for s in sorted(by_step))
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


class RunLog(contextlib.ExitStack):
  """metrics.jsonl, TensorBoard scalars, the progress bar and absl logs."""

  def __init__(self, workdir: str, config, start: int,
               schedule: Callable[[int], float]):
    super().__init__()
    # Multi-host: process 0 writes metrics and events; the others only log.
    self.writer = self.file = None
    if jax.process_index() == 0:
      truncate_metrics(workdir, start)
      self.writer = summary_writer(workdir, start)
      self.callback(self.writer.close)
      self.file = self.enter_context(open(
          os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8"))
    self.progress = self.enter_context(progress(config.train_steps, start))
    self.schedule = schedule      # updates done -> learning rate
    self.tokens_per_step = config.batch_size * config.train_len
    self.last_step, self.last_time = start, time.perf_counter()
    self.start_time = self.last_time

  def write(self, step: int, out: Mapping, *, written: bool) -> None:
    """Logs step (when ``written``); always restarts the throughput clock."""
    now = time.perf_counter()
    record = {"step": step, "loss": float(out["loss"]),
              "lr": float(self.schedule(step - 1)),
              "grad_norm": float(out["grad_norm"]),
              "tokens_per_sec": self.tokens_per_step * (
                  step - self.last_step) / max(now - self.last_time, 1e-9),
              "tokens": step * self.tokens_per_step,
              "target_tokens": float(out["targets"]),
              "elapsed_sec": now - self.start_time}
    self.last_step, self.last_time = step, now
    if not written or self.file is None:
      return
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec"):
      self.writer.add_scalar(f"train/{key}", record[key], step)
    self.progress.set_postfix(loss=f"{record['loss']:.4f}")
    absl_logging.info("step %d: loss %.4f, lr %.3g, %.0f tokens/s", step,
                      record["loss"], record["lr"], record["tokens_per_sec"])


def summary_writer(workdir: str, start: int):
  import tensorboardX  # pylint: disable=import-outside-toplevel
  # purge_step hides events a killed run logged after its last checkpoint.
  return tensorboardX.SummaryWriter(
      logdir=workdir, purge_step=start + 1 if start else None)


def progress(total: int, initial: int):
  import tqdm  # pylint: disable=import-outside-toplevel
  # disable=None: no bar when stderr is not a terminal (logs, tests).
  return tqdm.tqdm(total=total, initial=initial, unit="step", disable=None,
                   dynamic_ncols=True)


def _tag(text) -> str:
  return re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(text)).strip("_")


def eval_scalar_tag(record: Mapping) -> str:
  """``eval/<experiment>/<variant>/<metric>[_<mode>]_L<eval_len>[_d<depth>]``
  (characters TensorBoard dislikes become _)."""
  from extrapolax.experiments import records  # pylint: disable=import-outside-toplevel
  metric = record["metric"]
  if record.get("mode") == "sliding":
    metric += f"_sliding{record['stride']}"
  elif record.get("mode"):
    metric += f"_{record['mode']}"
  metric += f"_L{record['eval_len']}"
  if record.get("depth") is not None:
    metric += f"_d{record['depth']:g}"
  return "/".join(["eval", _tag(record.get("experiment") or "eval"),
                   _tag(records.variant_label(record)), _tag(metric)])


def write_eval_scalars(workdir: str, records: Sequence[Mapping]) -> int:
  """Writes evaluation records as TensorBoard scalars into ``workdir``
  (``eval_scalar_tag``; the record's step; loss-per-position buckets are
  left out). Only process 0 writes. Returns the scalars written."""
  if jax.process_index() != 0:
    return 0
  shown = [r for r in records if r.get("position") is None]
  if not shown:
    return 0
  import tensorboardX  # pylint: disable=import-outside-toplevel
  # A suffix of its own: event file names only hold the second, and two
  # writers in one second would share (and overwrite) a file.
  writer = tensorboardX.SummaryWriter(
      logdir=workdir, filename_suffix=f".eval{time.time_ns()}")
  try:
    for r in shown:
      writer.add_scalar(eval_scalar_tag(r), float(r["value"]),
                        r.get("step") or 0)
  finally:
    writer.close()
  return len(shown)
