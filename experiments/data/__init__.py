"""extrapolax.experiments.data: corpora, tokenizers and document splits."""

from .corpora import (ARCHIVES, CORPUS_NAMES, Corpus, DownloadError,
                      default_cache_dir, documents_sha256, fetch_archive,
                      load_corpus, split_documents, split_indices)
from .tokenizers import ByteTokenizer, Tokenizer, get_tokenizer
