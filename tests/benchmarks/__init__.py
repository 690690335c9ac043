"""Smoke tests of the benchmark scripts; ``load`` imports one."""

import importlib.util
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          os.pardir, os.pardir, "benchmarks")


def load(name: str):
  """benchmarks/<name>.py as a module (registered in sys.modules, which its
  dataclasses look up; the benchmarks folder on sys.path for the scripts
  that import each other)."""
  if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module
