"""Model definitions."""
from jaxalign.models.transformer import PRESETS, ModelConfig, Transformer, init_model, preset

__all__ = ["PRESETS", "ModelConfig", "Transformer", "init_model", "preset"]
