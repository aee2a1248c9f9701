"""The serving benchmark client: `python -m bench --url URL --trace NAME --out DIR` replays a
trace against any OpenAI-compatible server (this project's, vLLM, SGLang, a proxy) and
writes a run directory in the project's schema, printing the `vllm bench serve` table."""
