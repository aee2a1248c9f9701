"""`ModelConfig`: the engine reads the model description shared with the simulator
(policy.model: config.json read as transformers reads it, refused where the engine cannot
honour it). This module only keeps the engine's import path."""
from policy.model import ARCHITECTURES, GELU_ACTS, ROPE_TYPES, ModelConfig

__all__ = ["ARCHITECTURES", "GELU_ACTS", "ROPE_TYPES", "ModelConfig"]
