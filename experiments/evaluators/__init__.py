"""Length-extrapolation evaluators: each returns a list of results records.

* :func:`perplexity_vs_length` (perplexity.py): non-overlapping and sliding
  perplexity from 1x to 16x the training length, and loss per position;
  :func:`perplexity_table` reads its records as {length: perplexity}.
* :func:`rope_scaling_sweep` (rope_scaling.py): zero-shot RoPE scalings.
* :func:`perplexity_with_masks` (mask_sweep.py): sliding window and Lambda
  masks at inference.
* :func:`passkey_retrieval` (passkey.py): passkey accuracy, lengths x depths.
* :func:`algorithmic_accuracy` (algorithmic.py): task accuracy vs length.
* :func:`ruler_accuracy` (ruler.py): RULER-style multi-needle, multi-value,
  variable-tracking, common-word and key-value accuracy, lengths x depths.
* variants.py: the same weights with another implementation, RoPE scaling
  or mask; ``describe`` gives a model's record labels.
"""

from .algorithmic import algorithmic_accuracy
from .mask_sweep import perplexity_with_masks
from .passkey import passkey_retrieval
from .perplexity import (StreamScore, default_lengths, perplexity_table,
                         perplexity_vs_length, score_stream)
from .rope_scaling import rope_scaling_sweep
from .ruler import ruler_accuracy
from .variants import describe, rebuild

__all__ = ["algorithmic_accuracy", "perplexity_with_masks",
           "passkey_retrieval", "StreamScore", "default_lengths",
           "perplexity_vs_length", "perplexity_table", "score_stream", "rope_scaling_sweep",
           "ruler_accuracy", "describe", "rebuild"]
