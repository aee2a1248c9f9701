"""The OpenAI-compatible HTTP server: `python -m server --model DIR` serves the engine;
`python -m server --backend sim --model qwen3-0.6b --hardware h200` serves the digital
twin (the same policy, the cost model's step times, paced in real time).

The engine knows nothing of HTTP: `server.backend.Backend` is what the server drives.
"""
from server.app import build_app
from server.backend import Backend, EngineBackend, Finished, GenerationParams

__all__ = ["Backend", "EngineBackend", "Finished", "GenerationParams", "build_app"]
