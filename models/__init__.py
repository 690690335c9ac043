"""extrapolax.models: the decoder LM and its configuration.

KV-cache generation, the model zoo, checkpoints and Hugging Face import land
with the rest of the models issue (see README.md in this folder).
"""

from .config import AttentionSpec, ModelConfig
from .transformer import DecoderLM, num_params
