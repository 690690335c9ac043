"""Results records: validation, JSON-lines round trip."""

import json
import math

import pytest

from extrapolax.experiments import records


def good(**changes):
  fields = dict(model="rope", pe="rope", scaling="none", scale=1.0,
                mask="causal", train_len=128, eval_len=256, mode="nonoverlap",
                stride=None, task=None, metric="perplexity", value=12.5,
                n_tokens=4096, seed=0, step=100)
  fields.update(changes)
  return fields


def test_make_record_keeps_every_field():
  record = records.make_record(**good(depth=0.5, variant="rope x2"))
  assert set(records.FIELDS) <= set(record)
  assert record["value"] == 12.5 and record["depth"] == 0.5
  assert record["variant"] == "rope x2"


@pytest.mark.parametrize("field", ["model", "value", "mode", "step"])
def test_missing_field_is_named(field):
  fields = good()
  del fields[field]
  with pytest.raises(ValueError, match=field):
    records.make_record(**fields)


def test_unknown_field_is_named():
  with pytest.raises(ValueError, match="colour"):
    records.make_record(**good(colour="red"))


@pytest.mark.parametrize("changes, name", [
    (dict(mode="overlap"), "overlap"),
    (dict(mode="sliding", stride=None), "stride"),
    (dict(mode="nonoverlap", stride=64), "stride"),
    (dict(eval_len=0), "eval_len"),
    (dict(eval_len=2.5), "eval_len"),
    (dict(value="12"), "value"),
    (dict(value=True), "value"),
    (dict(n_tokens=-1), "n_tokens"),
    (dict(model=""), "model"),
    (dict(scale=math.inf), "scale"),
    (dict(depth=1.5), "depth"),
    (dict(seed=-1), "seed"),
])
def test_bad_values_are_named(changes, name):
  with pytest.raises(ValueError, match=name):
    records.make_record(**good(**changes))


def test_none_where_not_applicable():
  record = records.make_record(**good(mode=None, task="passkey", seed=None,
                                     step=None, metric="passkey_accuracy",
                                     value=0.4))
  assert record["mode"] is None and record["seed"] is None


def test_append_and_read_round_trip(tmp_path):
  path = str(tmp_path / "sub" / "results.jsonl")
  rows = [good(), good(mode="sliding", stride=64, value=math.nan),
          good(eval_len=512, value=math.inf)]
  assert records.append(path, rows[:2]) == 2
  assert records.append(path, rows[2:]) == 1
  back = records.read(path)
  assert len(back) == 3
  assert back[0] == records.make_record(**good())
  assert back[1]["stride"] == 64 and math.isnan(back[1]["value"])
  assert back[2]["value"] == math.inf
  with open(path) as f:
    assert len(f.read().splitlines()) == 3


def test_append_validates_everything_before_writing(tmp_path):
  path = str(tmp_path / "results.jsonl")
  records.append(path, [good()])
  with pytest.raises(ValueError, match="mode"):
    records.append(path, [good(eval_len=64), good(mode="bad")])
  assert len(records.read(path)) == 1


def test_read_names_the_bad_line(tmp_path):
  path = tmp_path / "results.jsonl"
  path.write_text(json.dumps(good()) + "\n\n" +
                  json.dumps(good(metric=None)) + "\n")
  with pytest.raises(ValueError, match=r"results.jsonl:3: .*metric"):
    records.read(str(path))


def test_variant_label():
  assert records.variant_label(good()) == "rope"
  assert records.variant_label(good(scaling="yarn", scale=4.0)) == (
      "rope yarn x4")
  assert records.variant_label(
      good(mask="lambda(sinks=4, window=128)")) == (
          "rope lambda(sinks=4, window=128)")
  assert records.variant_label(good(variant="mine")) == "mine"


def test_torn_last_line_is_dropped_then_cut_away(tmp_path, caplog):
  path = str(tmp_path / "results.jsonl")
  records.append(path, [good(), good(eval_len=512)])
  whole = open(path, encoding="utf-8").read()
  with open(path, "a", encoding="utf-8") as f:    # killed mid-append
    f.write(json.dumps(good(eval_len=1024))[:40])
  with caplog.at_level("WARNING"):
    assert [r["eval_len"] for r in records.read(path)] == [256, 512]
  assert "results.jsonl: dropping its last line" in caplog.text
  records.append(path, [good(eval_len=2048)])
  assert [r["eval_len"] for r in records.read(path)] == [256, 512, 2048]
  assert open(path, encoding="utf-8").read().startswith(whole)


def test_complete_last_line_without_newline_is_kept(tmp_path):
  path = tmp_path / "results.jsonl"
  path.write_text(json.dumps(good()) + "\n" + json.dumps(good(eval_len=64)))
  assert len(records.read(str(path))) == 2
  records.append(str(path), [good(eval_len=128)])
  assert [r["eval_len"] for r in records.read(str(path))] == [256, 64, 128]


def test_corrupt_line_in_the_middle_names_file_and_line(tmp_path):
  path = tmp_path / "results.jsonl"
  line = json.dumps(good())
  path.write_text(line + "\n" + line[:30] + "\n" + line + "\n")
  with pytest.raises(ValueError, match=r"results.jsonl:2: not a JSON line"):
    records.read(str(path))
  path.write_text(line + "\n" + line[:30] + "\n" + line[:30])
  with pytest.raises(ValueError, match=r"results.jsonl:2: not a JSON line"):
    records.append(str(path), [good()])     # left as it was
  assert path.read_text().endswith(line[:30])
