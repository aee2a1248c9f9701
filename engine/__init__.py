"""The GPU engine: executes the policy layer's batches with a real model.

    from engine import LLM, SamplingParams
    llm = LLM("/tmp/ckpt", max_model_len=4096)
    outs = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=16))
"""
from engine.config import EngineConfig
from engine.engine import LLMEngine, RequestMetrics, RequestOutput
from engine.llm import LLM
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestMetrics", "RequestOutput",
           "SamplingParams"]
