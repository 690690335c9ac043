"""Sharded training: meshes from the config, named shardings, host batches,
checkpoints across meshes, multi-host start-up.

tests/conftest.py gives the process eight CPU devices
(--xla_force_host_platform_device_count=8).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from extrapolax.experiments import configs, data, sharding, trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
needs_8 = pytest.mark.skipif(jax.device_count() < 8,
                             reason="needs 8 devices (tests/conftest.py)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tokens"))


def _tiny(data_dir, steps=4, **mesh):
  config = configs.get_config(f"tiny.py:steps={steps}")
  config.log_every = 1
  config.checkpoint_every = 2
  config.data.cache_dir = data_dir
  for axis, size in mesh.items():
    config.mesh[axis] = size
  return config


def _params(model):
  return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in
          nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _flat_specs(tree):
  return {sharding._path_name(path): s.spec for path, s in  # pylint: disable=protected-access
          jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------
# The mesh and its errors.


def test_default_config_is_one_device():
  config = configs.get_config("tiny.py")
  assert sharding.mesh_sizes(config) == dict(data=1, fsdp=1, tensor=1,
                                             context=1)
  mesh = sharding.mesh_from_config(config)
  assert mesh.size == 1 and mesh.axis_names == sharding.MESH_AXES


@needs_8
def test_mesh_errors_name_the_sizes():
  with pytest.raises(ValueError, match=r"data=3 .* needs 3 devices; 8"):
    sharding.make_mesh({"data": 3})
  config = configs.get_config("tiny.py")
  config.mesh.tensor = 0
  with pytest.raises(ValueError, match=r"config.mesh.tensor=0"):
    sharding.mesh_sizes(config)
  config = configs.get_config("tiny.py")
  config.mesh.data = 3
  with pytest.raises(ValueError, match=r"batch_size=16 .* mesh.data \* "
                     r"mesh.fsdp = 3 \* 1 = 3"):
    trainer.validate_config(config)
  config = configs.get_config("tiny.py")
  config.mesh.context = 3
  with pytest.raises(ValueError, match=r"train_len=128 .* mesh.context=3"):
    trainer.validate_config(config)
  config = configs.get_config("tiny.py")
  config.unlock()
  config.mesh.pipeline = 2
  with pytest.raises(ValueError, match=r"unknown config.mesh field.*pipeline"):
    sharding.mesh_sizes(config)


# ----------------------------------------------------------------------------
# Shardings.


@needs_8
def test_parameters_follow_the_logical_axis_rules(data_dir):
  config = _tiny(data_dir)
  config.model.vocab_size = 256
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  _, params = trainer.init_params(config, mesh)
  specs = _flat_specs(jax.tree.map(lambda x: x.sharding, params))
  assert specs["embed/embedding"] == P("tensor", None)
  assert specs["blocks/0/attn/q_proj/kernel"] == P("fsdp", "tensor", None)
  assert specs["blocks/1/attn/k_proj/kernel"] == P("fsdp", "tensor", None)
  assert specs["blocks/0/attn/o_proj/kernel"] == P("tensor", None, "fsdp")
  assert specs["blocks/0/mlp/gate/kernel"] == P("fsdp", "tensor")
  assert specs["blocks/0/mlp/down/kernel"] == P("tensor", "fsdp")
  assert specs["blocks/0/attn_norm/scale"] == P(None)
  # The values do not depend on the mesh.
  _, alone = trainer.init_params(config)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(alone)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A dimension the axis does not divide stays replicated on it: 4 heads
  # and 2 kv heads over tensor=8; the MLP width 192 is divisible.
  wide = sharding.make_mesh(dict(tensor=8))
  specs = _flat_specs(sharding.param_shardings(params, wide))
  assert specs["blocks/0/attn/q_proj/kernel"] == P(None, None, None)
  assert specs["blocks/0/mlp/up/kernel"] == P(None, "tensor")


@needs_8
def test_optimizer_state_shards_like_the_parameters(data_dir):
  config = _tiny(data_dir)
  config.model.vocab_size = 256
  mesh = sharding.make_mesh(dict(fsdp=4, tensor=2))
  _, params = trainer.init_params(config, mesh)
  optimizer = trainer.make_optimizer(config)
  params_sh, opt_sh, batch_sh = trainer.step_shardings(params, optimizer,
                                                       mesh)
  specs = {jax.tree_util.keystr(path): s.spec for path, s in
           jax.tree_util.tree_leaves_with_path(opt_sh)}
  mu = [v for k, v in specs.items()
        if "mu['blocks'][0]['attn']['q_proj']['kernel']" in k]
  nu = [v for k, v in specs.items()
        if "nu['blocks'][0]['mlp']['down']['kernel']" in k]
  assert mu == [P("fsdp", "tensor", None)]
  assert nu == [P("tensor", "fsdp")]
  counts = [v for k, v in specs.items() if k.endswith("count")]
  assert counts and all(v == P() for v in counts)
  assert batch_sh.spec == P(("data", "fsdp"), "context")
  assert _flat_specs(params_sh)["blocks/0/mlp/gate/kernel"] == P("fsdp",
                                                                 "tensor")


# ----------------------------------------------------------------------------
# Each host reads its own rows.


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_sources_serve_row_ranges(data_dir, packing):
  store = data.build_store(
      data.default_store_path(data_dir, "python_stdlib", "byte", "train"),
      "python_stdlib", "byte", split="train")
  source = data.TrainSource(store, seq_len=64, batch_size=8, seed=3,
                            packing=packing)
  whole = source.batch(5)
  part = source.batch(5, rows=(2, 6))
  for key in whole:
    if whole[key] is not None:
      np.testing.assert_array_equal(part[key], np.asarray(whole[key])[2:6])
  with pytest.raises(ValueError, match=r"rows=\(6, 2\) must be"):
    source.batch(5, rows=(6, 2))
  task = data.TaskSource("copy", seq_len=64, batch_size=8, seed=1)
  whole, part = task.batch(2), task.batch(2, rows=(5, 8))
  for key in whole:
    if whole[key] is not None:
      np.testing.assert_array_equal(part[key], np.asarray(whole[key])[5:8])


@needs_8
def test_host_batch_builds_the_global_batch_from_its_rows():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, context=2))
  spec = sharding.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  full = {"tokens": rng.integers(0, 256, (8, 16)).astype(np.int32),
          "weights": rng.random((8, 16)).astype(np.float32)}
  asked = []

  def rows(lo, hi):
    asked.append((lo, hi))
    return {k: v[lo:hi] for k, v in full.items()}

  out = sharding.host_batch(rows, spec, (8, 16))
  assert asked == [(0, 8)]     # one process holds every row here
  for key, value in full.items():
    np.testing.assert_array_equal(np.asarray(out[key]), value)
    assert out[key].sharding.spec == P(("data", "fsdp"), "context")
    assert out[key].addressable_shards[0].data.shape == (2, 8)
  with pytest.raises(ValueError, match=r"rows\['tokens'\] has shape"):
    sharding.host_batch(lambda lo, hi: {"tokens": full["tokens"][:3]}, spec,
                        (8, 16))


# ----------------------------------------------------------------------------
# Training on meshes equals one device.


@needs_8
def test_tiny_trains_the_same_on_2x2x2_and_2x4_meshes(data_dir, tmp_path,
                                                    monkeypatch):
  from extrapolax.attention import context_parallel  # pylint: disable=import-outside-toplevel
  calls = []
  original = context_parallel.ContextParallel.__call__
  monkeypatch.setattr(context_parallel.ContextParallel, "__call__",
                      lambda self, request: calls.append(
                          request.query.shape) or original(self, request))
  trainer._cached_train_step.cache_clear()  # pylint: disable=protected-access
  runs = {}
  for name, mesh in [("one", {}),
                     ("data_fsdp_tensor", dict(data=2, fsdp=2, tensor=2)),
                     ("data_context", dict(data=2, context=4))]:
    calls.clear()
    runs[name] = trainer.train(_tiny(data_dir, **mesh), str(tmp_path / name))
    # Attention splits the sequence exactly when the mesh has a context
    # axis (each of the 2 layers traced once).
    assert bool(calls) == ("context" in name), (name, calls)
  base = runs["one"].metrics
  assert [m["step"] for m in base] == [1, 2, 3, 4]
  assert base[-1]["loss"] < base[0]["loss"]
  for name in ("data_fsdp_tensor", "data_context"):
    got = runs[name].metrics
    for key in ("loss", "grad_norm"):
      np.testing.assert_allclose([m[key] for m in got],
                                 [m[key] for m in base], rtol=2e-5,
                                 err_msg=f"{name} {key}")
    ref, out = _params(runs["one"].model), _params(runs[name].model)
    for path in ref:
      np.testing.assert_allclose(out[path], ref[path], rtol=1e-4, atol=2e-6,
                                 err_msg=f"{name} {path}")
  q = runs["data_fsdp_tensor"].model.blocks[0].attn.q_proj.kernel[...]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert len(q.sharding.device_set) == 8


# ----------------------------------------------------------------------------
# Checkpoints move between meshes.

_CONTINUE_ON_ONE_DEVICE = r"""
import json, sys
import jax
from extrapolax.experiments import trainer
workdir = sys.argv[1]
config = trainer.read_config(workdir)
config.train_steps = 4
for axis in ("data", "fsdp", "tensor", "context"):
  config.mesh[axis] = 1
result = trainer.train(config, workdir)
print(json.dumps({"devices": jax.device_count(), "metrics": result.metrics}))
"""


@needs_8
def test_checkpoint_written_on_8_devices_continues_on_1(data_dir, tmp_path):
  mesh = dict(data=2, fsdp=2, tensor=2)
  reference = trainer.train(_tiny(data_dir, **mesh), str(tmp_path / "ref"))
  first = trainer.train(_tiny(data_dir, steps=2, **mesh),
                        str(tmp_path / "moved"))
  # The sharded checkpoint restores on one device, bit for bit.
  model, _ = trainer.load_model(str(tmp_path / "moved"))
  restored = _params(model)
  for path, value in _params(first.model).items():
    np.testing.assert_array_equal(restored[path], value, err_msg=path)
  assert len(model.blocks[0].mlp.up.kernel[...].sharding.device_set) == 1
  # ... or onto yet another mesh.
  other = sharding.make_mesh(dict(fsdp=4, tensor=2))
  model, _ = trainer.load_model(str(tmp_path / "moved"), mesh=other)
  kernel = model.blocks[0].mlp.up.kernel[...]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert kernel.sharding.mesh.shape["fsdp"] == 4
  for path, value in _params(model).items():
    np.testing.assert_array_equal(restored[path], value, err_msg=path)
  # A fresh single-device process resumes it and continues.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-c", _CONTINUE_ON_ONE_DEVICE,
       str(tmp_path / "moved")], capture_output=True, text=True, env=env,
      cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 1
  got = {m["step"]: m for m in out["metrics"]}
  assert sorted(got) == [1, 2, 3, 4]
  for m in reference.metrics:
    for key in ("loss", "grad_norm"):
      np.testing.assert_allclose(got[m["step"]][key], m[key], rtol=2e-5,
                                 err_msg=f"step {m['step']} {key}")


# ----------------------------------------------------------------------------
# Multi-host start-up.


def test_initialize_distributed_reads_the_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kw: calls.append(kw))
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
               "JAX_PROCESS_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  assert not sharding.initialize_distributed("auto")
  assert not sharding.initialize_distributed("off")
  assert calls == []
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert sharding.initialize_distributed("auto")
  assert calls == [dict(coordinator_address="10.0.0.1:1234",
                        num_processes=4, process_id=3)]
  monkeypatch.setenv("JAX_PROCESS_ID", "three")
  with pytest.raises(ValueError, match=r"JAX_PROCESS_ID='three'"):
    sharding.initialize_distributed("auto")
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
               "JAX_PROCESS_ID"):
    monkeypatch.delenv(name)
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert sharding.initialize_distributed("auto")
  assert calls[-1] == {}          # JAX's own SLURM detection fills the rest
  with pytest.raises(ValueError, match=r"'sometimes' is not one of"):
    sharding.initialize_distributed("sometimes")


_ONE_OF_TWO_PROCESSES = r"""
import json, sys
import jax
from extrapolax.experiments import configs, sharding, trainer
assert sharding.initialize_distributed("auto")
config = configs.get_config("tiny.py:steps=4")
config.log_every, config.checkpoint_every = 1, 2
config.data.cache_dir = sys.argv[2]
config.mesh.data = config.mesh.fsdp = config.mesh.tensor = 2
mesh = sharding.mesh_from_config(config)
rows = sharding.host_rows(sharding.batch_sharding(mesh), (16, 128))
result = trainer.train(config, sys.argv[1])
print(json.dumps({"process": jax.process_index(),
                  "devices": [jax.local_device_count(), jax.device_count()],
                  "rows": rows, "loss": [m["loss"] for m in result.metrics]}))
"""


@needs_8
def test_two_processes_train_like_one_device(data_dir, tmp_path):
  """Multi-host on one machine: two processes of 4 CPU devices each,
  started through $JAX_COORDINATOR_ADDRESS (gloo collectives)."""
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  reference = trainer.train(_tiny(data_dir), str(tmp_path / "one"))
  procs = []
  for rank in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank))
    procs.append(subprocess.Popen(
        [sys.executable, "-c", _ONE_OF_TWO_PROCESSES, str(tmp_path / "two"),
         data_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, cwd=REPO))
  outs = []
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  assert sorted(o["process"] for o in outs) == [0, 1]
  assert all(o["devices"] == [4, 8] for o in outs)
  # Each process built only its half of the batch rows.
  assert sorted(tuple(o["rows"]) for o in outs) == [(0, 8), (8, 16)]
  for out in outs:
    np.testing.assert_allclose(out["loss"],
                               [m["loss"] for m in reference.metrics],
                               rtol=2e-5)
  # Process 0 wrote the workdir's files; the checkpoint is complete.
  assert len(trainer.read_metrics(str(tmp_path / "two"))) == 4
  model, _ = trainer.load_model(str(tmp_path / "two"))
  assert model.blocks[0].attn.q_proj.kernel[...].shape == (64, 4, 16)
