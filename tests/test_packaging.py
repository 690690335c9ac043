"""The folders install under the one import name ``extrapolax``."""

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_installed_names():
  import extrapolax.attention  # pylint: disable=import-outside-toplevel
  import extrapolax.experiments  # pylint: disable=import-outside-toplevel,unused-import
  import extrapolax.models  # pylint: disable=import-outside-toplevel,unused-import
  import extrapolax.pallas_kernels  # pylint: disable=import-outside-toplevel,unused-import
  assert pathlib.Path(extrapolax.attention.__file__).parent == ROOT / "attention"


def test_wheel_maps_folders_into_the_namespace(tmp_path):
  pytest.importorskip("setuptools")
  subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
       "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
      check=True, cwd=tmp_path)
  wheel, = tmp_path.glob("extrapolax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  for folder in ("common", "attention", "pallas_kernels", "models", "experiments"):
    assert f"extrapolax/{folder}/__init__.py" in names
  assert "extrapolax/attention/xla_chunked.py" in names
  top = {n.split("/")[0] for n in names}
  assert top == {"extrapolax", wheel.name.split("-")[0] + "-" +
                 wheel.name.split("-")[1] + ".dist-info"}, top
  assert not any(n.startswith("extrapolax/tests") for n in names)


def test_source_checkout_reads_as_one_package():
  """src/extrapolax/<folder> links each folder back, so IDEs resolve
  ``extrapolax.X`` in a checkout without installing it."""
  view = ROOT / "src" / "extrapolax"
  for folder in ("common", "attention", "pallas_kernels", "models", "experiments"):
    link = view / folder
    assert link.is_symlink(), link
    assert link.resolve() == (ROOT / folder).resolve()
  code = ("import extrapolax.attention as a, pathlib, sys; "
          "print(pathlib.Path(a.__file__).resolve())")
  out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""},
                       capture_output=True, text=True).stdout.strip()
  assert out == str((ROOT / "attention" / "__init__.py").resolve())
