"""The model zoo: presets, info records, and orbax checkpoints."""

import dataclasses
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from extrapolax.models import DecoderLM, ModelConfig, num_params
from extrapolax.models import checkpoint_files
from extrapolax.models import pretrained, zoo
from extrapolax.models import zoo_cards

TINY = [n for n in zoo.names() if n.endswith("-tiny")]
# Presets only: names() also lists the real pretrained models (GGUF files,
# tested in test_pretrained.py).
PRESETS = [n for n in zoo.names() if n not in pretrained.MODELS]
ZERO_SHOT = ["rope-linear", "rope-dynamic", "rope-ntk", "rope-yarn",
             "rope-llama3", "rope-lambda"]
TOKENS = jnp.asarray(np.arange(24)[None] * 37 % 256, jnp.int32)


def _params(model):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(
              nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]}


def _assert_same_model(a, b, logits=True):
  assert a.config == b.config
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k
  if logits:
    np.testing.assert_array_equal(np.asarray(a(TOKENS)),
                                  np.asarray(b(TOKENS)))


@pytest.fixture(autouse=True)
def _no_user_checkpoints(monkeypatch, tmp_path):
  """Keeps the user's ~/.cache and $EXTRAPOLAX_CHECKPOINTS out of tests."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.delenv(zoo.CHECKPOINTS_ENV, raising=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A saved t5-tiny checkpoint (copy it before damaging it)."""
  model = zoo.create("t5-tiny", seed=3)
  path = zoo.save_pretrained(model, tmp_path_factory.mktemp("ck") / "t5",
                             info=zoo.info("t5-tiny"))
  return model, path


@pytest.fixture
def ckpt(saved, tmp_path):
  return shutil.copytree(saved[1], tmp_path / "copy")


# ----------------------------------------------------------------------------
# Presets.


def test_names_cover_every_family_in_both_sizes():
  assert zoo.names() == tuple(sorted(set(zoo.names())))
  assert set(pretrained.MODELS) <= set(zoo.names())
  names = PRESETS
  families = {zoo.info(n).family for n in names}
  assert {"nope", "sinusoidal", "learned", "rope", "alibi", "t5", "kerple",
          "fire", "rope-lambda", "rope-window", "hybrid"} | {
              f for f in ZERO_SHOT} <= families
  for family in families:
    assert f"{family}-tiny" in names and f"{family}-small" in names


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_under_eval_shape(name):
  info = zoo.info(name)
  config = zoo.config(name)
  abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  leaves = jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert sum(x.size for x in leaves) == info.num_params
  assert info.name == name == f"{info.family}-{info.size}"
  assert info.train_len == config.max_len == {"tiny": 64,
                                              "small": 512}[info.size]
  assert config.vocab_size == 256 and info.description
  assert ModelConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("name", TINY)
def test_tiny_info_param_count_is_the_real_models(name):
  assert num_params(zoo.create(name)) == zoo.info(name).num_params


@pytest.mark.parametrize("family", ZERO_SHOT)
def test_zero_shot_variants_run_the_rope_weights(family):
  for size, train_len in (("tiny", 64), ("small", 512)):
    info = zoo.info(f"{family}-{size}")
    assert info.weights_from == f"rope-{size}"
    shapes = lambda n: jax.tree_util.tree_map(
        lambda x: (x.shape, x.dtype), nnx.state(nnx.eval_shape(
            lambda: zoo.create(n)), nnx.Param))
    assert shapes(info.name) == shapes(f"rope-{size}")
    spec = zoo.config(info.name).attention[0]
    if family == "rope-lambda":
      assert (spec.mask, spec.num_sinks, spec.window) == ("lambda", 4,
                                                          train_len)
      assert info.mask == f"lambda(sinks=4, window={train_len})"
    else:
      assert spec.rope_scaling["rope_type"] == info.scaling == family[5:]
      assert spec.rope_scaling["factor"] == info.scale == 4.0
      assert (spec.rope_scaling.get("original_max_position_embeddings") or
              spec.rope_max_position_embeddings) in (None, train_len)


def test_info_records():
  assert zoo.info("rope-tiny").weights_from == "rope-tiny"
  assert zoo.info("rope-tiny").scaling == "none"
  assert zoo.info("rope-window-small").mask == "sliding_window(256)"
  assert zoo.info("hybrid-tiny").position == "rope+nope"
  assert [s.position for s in zoo.config("hybrid-tiny").attention] == [
      "rope", "nope"]
  assert zoo.config("learned-tiny").absolute == "learned"
  small = zoo.config("rope-small")
  assert (small.d_model, small.num_heads, small.kv_heads) == (256, 8, 2)
  with pytest.raises(dataclasses.FrozenInstanceError):
    zoo.info("rope-tiny").train_len = 1


def test_create_seeds_and_overrides():
  a, b = zoo.create("alibi-tiny", seed=1), zoo.create("alibi-tiny", seed=1)
  c = zoo.create("alibi-tiny", rngs=nnx.Rngs(2))
  assert all(np.array_equal(x, _params(b)[k]) for k, x in _params(a).items())
  assert not np.array_equal(_params(a)["['embed']['embedding']"],
                            _params(c)["['embed']['embedding']"])
  model = zoo.create("rope-tiny", num_layers=1, mlp_dim=32)
  assert len(model.blocks) == 1 and model.config.mlp_dim == 32
  assert model(TOKENS).shape == (1, 24, 256)
  # Moving the training length moves the windows and scalings with it.
  assert zoo.config("rope-window-tiny", max_len=256).attention[0].window == 128
  assert zoo.config("rope-yarn-tiny", max_len=64).attention[0].rope_scaling[
      "original_max_position_embeddings"] == 64
  with pytest.raises(ValueError, match="rngs or seed, not both"):
    zoo.create("rope-tiny", seed=1, rngs=nnx.Rngs(1))


def test_unknown_override_and_bad_values_raise():
  with pytest.raises(ValueError, match=r"unknown ModelConfig override\(s\) "
                     r"\['num_layer'\]; allowed: .*'num_layers'"):
    zoo.create("rope-tiny", num_layer=3)
  with pytest.raises(ValueError, match="num_heads=3 must be a multiple"):
    zoo.config("rope-tiny", num_heads=3)


def test_unknown_name_suggests_close_matches():
  with pytest.raises(ValueError, match=r"unknown preset 'rope-tyni'; did you "
                     r"mean 'rope-tiny'.*size in \('tiny', 'small'\)"):
    zoo.info("rope-tyni")
  for fn in (zoo.config, zoo.create):
    with pytest.raises(ValueError, match="unknown preset 'alibi'"):
      fn("alibi")


# ----------------------------------------------------------------------------
# Checkpoints.


@pytest.mark.parametrize("name", ["t5-tiny", "learned-tiny", "hybrid-tiny"])
def test_round_trip_is_bit_exact(name, tmp_path):
  model = zoo.create(name, seed=5)
  path = zoo.save_pretrained(model, tmp_path / name, info={"steps": 0})
  assert sorted(os.listdir(path)) == ["config.json", "info.json",
                                      "manifest.json", "params"]
  with open(os.path.join(path, "info.json"), encoding="utf-8") as f:
    assert json.load(f) == {"steps": 0}
  with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  assert manifest["num_params"] == num_params(model)
  assert manifest["arrays"]["blocks.0.attn.q_proj.kernel"]["shape"] == [
      64, 4, 16]
  _assert_same_model(model, zoo.from_pretrained(path))


def test_info_record_is_saved(saved):
  with open(os.path.join(saved[1], "info.json"), encoding="utf-8") as f:
    assert json.load(f) == dataclasses.asdict(zoo.info("t5-tiny"))


def test_load_by_name_through_the_environment(saved, monkeypatch, tmp_path):
  first, second = tmp_path / "a", tmp_path / "b"
  first.mkdir()
  monkeypatch.setenv(zoo.CHECKPOINTS_ENV, f"{first}{os.pathsep}{second}")
  assert zoo.checkpoint_dirs() == (
      str(first), str(second),
      str(tmp_path / "home" / ".cache" / "extrapolax" / "checkpoints"),
      zoo_cards.PACKAGED_DIR)
  shutil.copytree(saved[1], second / "my-t5-run")
  _assert_same_model(saved[0], zoo.from_pretrained("my-t5-run"))
  with pytest.raises(ValueError, match=r"did you mean 'my-t5-run'"):
    zoo.from_pretrained("my-t5-rnu")


def test_zero_shot_preset_loads_the_saved_rope_weights(monkeypatch, tmp_path):
  monkeypatch.setenv(zoo.CHECKPOINTS_ENV, str(tmp_path))
  rope = zoo.create("rope-tiny", seed=7)
  zoo.save_pretrained(rope, tmp_path / "rope-tiny")
  yarn = zoo.from_pretrained("rope-yarn-tiny")
  assert yarn.config == zoo.config("rope-yarn-tiny")
  assert _params(yarn).keys() == _params(rope).keys()
  assert all(np.array_equal(x, _params(rope)[k])
             for k, x in _params(yarn).items())
  # Weights saved under the rope name must be a plain causal rope model.
  zoo.save_pretrained(zoo.create("alibi-tiny"), tmp_path / "rope-tiny",
                      overwrite=True)
  with pytest.raises(ValueError, match="rope-lambda-tiny runs the weights of "
                     "rope-tiny, but the checkpoint .* is not a plain causal "
                     "rope model"):
    zoo.from_pretrained("rope-lambda-tiny")


def test_preset_without_saved_weights_says_how_to_get_some():
  # The tiny presets ship trained; the small ones are built on demand.
  with pytest.raises(ValueError, match=r"no trained weights exist for preset "
                     r"'alibi-small'.*zoo.create\('alibi-small'\) builds it "
                     r"with random weights.*python -m extrapolax.experiments"
                     r".zoo_build alibi-small"):
    zoo.from_pretrained("alibi-small")
  with pytest.raises(ValueError, match=r"'rope-yarn-small'.* nor 'rope-small'"):
    zoo.from_pretrained("rope-yarn-small")
  assert zoo.info("alibi-small").card == {
      "trained": False, "preset": "alibi-small",
      "build": "python -m extrapolax.experiments.zoo_build alibi-small"}
  with pytest.raises(ValueError, match=r"neither a checkpoint directory nor "
                     r"a saved checkpoint name.*did you mean 'rope-tiny'"):
    zoo.from_pretrained("rope-tinyy")
  with pytest.raises(ValueError, match="no checkpoint directory at"):
    zoo.from_pretrained(os.path.join("no", "such", "dir"))


def _chunk(path, array):
  """The data file orbax/tensorstore wrote for one array."""
  files = glob.glob(os.path.join(path, "params", array, "[0-9]*"))
  assert len(files) == 1, sorted(os.listdir(os.path.join(path, "params")))
  return files[0]


def _flip(path, offset=None, count=16):
  size = os.path.getsize(path)
  offset = size // 2 if offset is None else offset
  with open(path, "r+b") as f:
    f.seek(offset)
    data = f.read(count)
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in data))


def _edit_json(path, edit):
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  edit(data)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)


def test_checkpoint_layout(ckpt):
  params = os.path.join(ckpt, "params")
  with open(os.path.join(ckpt, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  for array in manifest["arrays"]:     # one zarr directory per array
    assert os.path.isfile(os.path.join(params, array, ".zarray"))
    assert f"params/{array}/.zarray" in manifest["files"]
  on_disk = {os.path.relpath(os.path.join(d, f), ckpt).replace(os.sep, "/")
             for d, _, fs in os.walk(ckpt) for f in fs}
  # Every file is listed with its sha256, config.json and info.json too.
  assert on_disk == set(manifest["files"]) | {"manifest.json"}
  assert {"config.json", "info.json"} <= set(manifest["files"])
  assert manifest["version"] == 2 and manifest["checksum"] == "sha256"
  entry = manifest["files"]["config.json"]
  assert entry["sha256"] == checkpoint_files.file_digest(
      os.path.join(ckpt, "config.json"))


def test_truncated_array_file_raises(ckpt):
  chunk = _chunk(ckpt, "blocks.1.mlp.up.kernel")
  with open(chunk, "r+b") as f:
    f.truncate(os.path.getsize(chunk) // 2)
  with pytest.raises(ValueError, match=r"damaged checkpoint .*: params/"
                     r"blocks\.1\.mlp\.up\.kernel/0\.0 \(array blocks\.1\.mlp"
                     r"\.up\.kernel\) has \d+ bytes, \d+ when saved "
                     r"\(truncated\)"):
    zoo.from_pretrained(ckpt)


def test_flipped_bytes_raise(ckpt):
  _flip(_chunk(ckpt, "embed.embedding"))
  with pytest.raises(ValueError, match=r"params/embed\.embedding/0\.0 \(array "
                     r"embed\.embedding\) fails its checksum"):
    zoo.from_pretrained(ckpt)


def test_missing_array_file_raises(ckpt):
  os.remove(_chunk(ckpt, "final_norm.scale"))
  with pytest.raises(ValueError, match=r"params/final_norm\.scale/0 \(array "
                     r"final_norm\.scale\) is missing"):
    zoo.from_pretrained(ckpt)


def test_damage_past_the_file_checks_is_caught_by_the_array_checksum(ckpt):
  # As if the bytes had changed before the manifest recorded them: the file
  # checks pass, orbax decodes (zstd frames carry no checksum) or fails, and
  # either way the load raises and names what is wrong.
  chunk = _chunk(ckpt, "embed.embedding")
  _flip(chunk)
  rel = "params/embed.embedding/" + os.path.basename(chunk)

  def fix(manifest):
    manifest["files"][rel]["sha256"] = checkpoint_files.file_digest(chunk)
  _edit_json(os.path.join(ckpt, "manifest.json"), fix)
  with pytest.raises(ValueError, match=r"damaged checkpoint .*(array "
                     r"embed\.embedding fails its checksum|orbax cannot read)"):
    zoo.from_pretrained(ckpt)


def test_wrong_checksum_names_the_array(ckpt):
  def edit(manifest):
    manifest["arrays"]["blocks.1.attn.t5_table"]["crc32"] = "00000000"
  _edit_json(os.path.join(ckpt, "manifest.json"), edit)
  with pytest.raises(ValueError, match=r"array blocks\.1\.attn\.t5_table fails "
                     "its checksum"):
    zoo.from_pretrained(ckpt)


def test_damaged_orbax_metadata_raises(ckpt):
  with open(os.path.join(ckpt, "params", "_METADATA"), "r+b") as f:
    f.truncate(10)
  with pytest.raises(ValueError, match=r"params/_METADATA \(orbax's metadata\) "
                     "has 10 bytes"):
    zoo.from_pretrained(ckpt)


def test_config_of_another_model_with_the_same_shapes_is_refused(tmp_path):
  # rope -> alibi: the same arrays, another model; only the checksum of
  # config.json tells them apart.
  path = zoo.save_pretrained(zoo.create("rope-tiny"), tmp_path / "rope")
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    f.write(zoo.config("alibi-tiny").to_json())
  with pytest.raises(checkpoint_files.CheckpointError, match=r"damaged "
                     r"checkpoint .*: config.json \(the model's config\) "
                     "fails its checksum"):
    zoo.from_pretrained(path)


def test_damaged_info_json_is_named(ckpt):
  with open(os.path.join(ckpt, "info.json"), "a", encoding="utf-8") as f:
    f.write(" ")
  with pytest.raises(ValueError, match=r"info.json \(metadata\) has \d+ "
                     r"bytes, \d+ when saved \(grown\)"):
    zoo.from_pretrained(ckpt)


def test_version_1_manifest_still_loads_with_a_warning(saved, ckpt):
  def downgrade(manifest):   # crc32 of the params/ files, as version 1 had
    manifest["version"], manifest["checksum"] = 1, "crc32"
    manifest["files"] = {
        name[len("params/"):]: {"size": entry["size"],
                                "crc32": checkpoint_files.file_digest(
                                    os.path.join(ckpt, name), "crc32")}
        for name, entry in manifest["files"].items()
        if name.startswith("params/")}
  _edit_json(os.path.join(ckpt, "manifest.json"), downgrade)
  with pytest.warns(UserWarning, match="version 1 manifest"):
    _assert_same_model(saved[0], zoo.from_pretrained(ckpt), logits=False)
  _flip(_chunk(ckpt, "embed.embedding"))
  with pytest.raises(ValueError, match=r"params/embed\.embedding/0\.0 \(array "
                     r"embed\.embedding\) fails its checksum \(crc32"), (
                         pytest.warns(UserWarning)):
    zoo.from_pretrained(ckpt)


def test_missing_manifest_is_an_incomplete_checkpoint(ckpt):
  os.remove(os.path.join(ckpt, "manifest.json"))
  with pytest.raises(ValueError, match=r"incomplete checkpoint: .* has no "
                     "manifest.json"):
    zoo.from_pretrained(ckpt)


@pytest.mark.parametrize("field,value,message", [
    ("num_heads", 8, r"blocks\.0\.attn\.k_proj\.kernel: shape \(64, 2, 16\) "
     r"in checkpoint, \(64, 2, 8\) expected by config.json \(and \d+ more"),
    ("d_model", 128, r"blocks\.0\.attn\.k_proj\.kernel: shape \(64, 2, 16\) "
     r"in checkpoint, \(128, 2, 32\) expected by config.json"),
    ("param_dtype", "bfloat16", r"blocks\.0\.attn\.k_proj\.kernel: dtype "
     "float32 in checkpoint, bfloat16 expected by config.json"),
    ("num_layers", 3, r"arrays missing from checkpoint: \['blocks\.2\."),
])
def test_config_that_disagrees_with_the_weights_raises(ckpt, field, value,
                                                       message):
  _edit_json(os.path.join(ckpt, "config.json"),
             lambda config: config.update({field: value}))
  with pytest.raises(ValueError, match=message):
    zoo.from_pretrained(ckpt)


def test_overwrite_protection(saved, tmp_path):
  model, _ = saved
  path = zoo.save_pretrained(model, tmp_path / "ck")
  other = zoo.create("t5-tiny", seed=11)
  with pytest.raises(ValueError, match="already exists.*overwrite=True"):
    zoo.save_pretrained(other, path)
  _assert_same_model(model, zoo.from_pretrained(path), logits=False)
  zoo.save_pretrained(other, path, overwrite=True)
  _assert_same_model(other, zoo.from_pretrained(path), logits=False)
  foreign = tmp_path / "notes"
  foreign.mkdir()
  (foreign / "thesis.tex").write_text("keep me")
  with pytest.raises(ValueError, match="refusing to delete"):
    zoo.save_pretrained(model, foreign, overwrite=True)
  assert (foreign / "thesis.tex").read_text() == "keep me"
  empty = tmp_path / "empty"
  empty.mkdir()
  zoo.save_pretrained(model, empty)     # an empty directory is fine


def test_failed_overwrite_keeps_the_old_checkpoint(saved, monkeypatch,
                                                  tmp_path):
  model, _ = saved
  path = zoo.save_pretrained(model, tmp_path / "ck")

  def broken():
    raise OSError("disk full")

  with monkeypatch.context() as patch:
    patch.setattr(zoo, "_checkpointer", broken)
    with pytest.raises(OSError, match="disk full"):
      zoo.save_pretrained(zoo.create("t5-tiny", seed=9), path, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["ck"]       # no staging left over
  _assert_same_model(model, zoo.from_pretrained(path), logits=False)


def test_save_rejects_bad_arguments(saved, tmp_path):
  with pytest.raises(ValueError, match="needs a DecoderLM"):
    zoo.save_pretrained(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tmp_path / "x")
  with pytest.raises(ValueError, match="not JSON-serialisable"):
    zoo.save_pretrained(saved[0], tmp_path / "y", info={"a": object()})
  assert not os.path.exists(tmp_path / "x")
  assert not os.path.exists(tmp_path / "y")
