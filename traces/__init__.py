"""Request traces: the shipped data files, their loaders and synthetic workloads.

    from traces import TraceConfig, load_trace, materialize
    df = load_trace(TraceConfig(name="azure_conv", num_requests=1000))
    requests = materialize(df, block_size=16, vocab_size=151936, seed=0)

Depends on numpy and pandas only; imports nothing else from twinserve.
"""
from traces.config import TRACE_NAMES, TraceConfig, TraceError
from traces.load import load_trace, trace_path
from traces.materialize import Request, materialize

__all__ = ["TRACE_NAMES", "Request", "TraceConfig", "TraceError", "load_trace",
           "materialize", "trace_path"]
