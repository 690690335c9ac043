"""extrapolax.experiments.data: text and tasks -> tokens -> training rows.

corpus (``load_corpus``) -> whole-document split (``split_documents``) ->
tokenizer (``get_tokenizer``) -> token store on disk (``build_store``,
``TokenStore``) -> packed rows (``pack``, ``PackedBatch``) -> training
batches as a pure function of (seed, step) (``TrainSource``), optionally
with sampled training positions (``positions``: randomized, PoSE, CREAM,
E^2-LLM; ``PositionSampling``), optionally mixed with short passkey
examples (``RetrievalMix``). Synthetic
tasks (``get_task``, ``TaskSource``), the passkey prompt
(``passkey_prompt``) and the RULER-style prompts (``ruler.ruler_prompt``)
are byte-level text. ``eval_documents(config,
workdir=...)``: a run's held-out documents, as its evaluators score them.
"""

from .corpora import (ARCHIVES, CORPUS_NAMES, Corpus, DownloadError,
                      default_cache_dir, documents_sha256, fetch_archive,
                      load_corpus, split_documents, split_indices)
from .held_out import eval_documents
from .packing import (PACKING_METHODS, PackedBatch, Packing, materialize,
                      pack, pack_documents)
from . import positions
from . import ruler
from .pipeline import RetrievalMix, TaskSource, TrainSource
from .positions import PositionSampling
from .positions import from_text as position_sampler
from .store import SPLITS, TokenStore, build_store, default_store_path
from .tasks import (TASK_NAMES, Task, TaskExample, examples_to_batch,
                    get_task, passkey_prompt, short_passkey_prompt)
from .tokenizers import ByteTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "ARCHIVES", "CORPUS_NAMES", "Corpus", "DownloadError",
    "default_cache_dir", "documents_sha256", "fetch_archive", "load_corpus",
    "split_documents", "split_indices", "eval_documents",
    "PACKING_METHODS", "PackedBatch", "Packing", "materialize", "pack",
    "pack_documents",
    "RetrievalMix", "TaskSource", "TrainSource", "positions", "ruler", "PositionSampling",
    "position_sampler",
    "SPLITS", "TokenStore", "build_store", "default_store_path",
    "TASK_NAMES", "Task", "TaskExample", "examples_to_batch", "get_task",
    "passkey_prompt", "short_passkey_prompt",
    "ByteTokenizer", "Tokenizer", "get_tokenizer",
]
