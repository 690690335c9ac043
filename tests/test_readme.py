"""The README stays true: its quickstart runs and its test command is CI's."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_runs():
  blocks = re.findall(r"```python\n(.*?)```", README, re.S)
  assert blocks, "README has no python block"
  namespace = {}
  exec(compile("\n".join(blocks), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  out, y = namespace["out"], namespace["y"]
  assert out.shape == (2, 1024, 8, 64) and np.isfinite(np.asarray(out)).all()
  assert y.shape == (2, 1024, 512) and np.isfinite(np.asarray(y)).all()
  assert namespace["attention_factor"] > 1.0    # YaRN's factor at 4x
  np.testing.assert_allclose(namespace["chunked"], namespace["dense"],
                             atol=1e-4)         # use_implementation
  assert namespace["tokens"].shape == (1, 8 + 64)


def test_ci_runs_the_readme_test_command():
  command = re.search(r"## Test\n\n```bash\n(.*?)\n```", README).group(1)
  assert command in (ROOT / ".ci" / "run").read_text()
