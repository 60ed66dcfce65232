"""Generation engine: prefill + decode with a KV cache (see engine.py)."""

from jaxalign.sampling.engine import (Completions, SamplingParams, filter_logits,
                                      generate, generate_model, sample_tokens)

__all__ = ["Completions", "SamplingParams", "filter_logits", "generate", "generate_model",
           "sample_tokens"]
