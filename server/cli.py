"""`python -m server`: options spelled as vLLM's `vllm serve` spells them.

    python -m server --model /path/to/Qwen3-0.6B --port 8000 --max-model-len 4096
    python -m server --backend sim --model qwen3-0.6b --hardware h200
    python -m server --backend sim --model qwen3-0.6b --hardware h100 \\
        --cost-model fitted --calibration simulator/calibrations/FILE.json
"""
import argparse
import gc
import sys

from server.backend import BackendDead

ENGINE_ONLY = ("dtype", "device", "attention_backend", "kernel_plan", "seed")
SIM_ONLY = ("hardware", "cost_model", "calibration")
# flag dest -> EngineConfig / SimBackend keyword, where they differ
RENAMED = {"num_gpu_blocks_override": "num_gpu_blocks"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server", description="OpenAI-compatible server for twinserve: the real "
        "engine, or its simulated twin (--backend sim).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    s = p.add_argument_group("HTTP server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every /v1 endpoint")
    s.add_argument("--served-model-name", default=None,
                   help="the model id of the API (/v1/models, the `model` field); default: the "
                        "last part of --model")
    s.add_argument("--max-queued-requests", type=int, default=4096,
                   help="unfinished requests the server holds (waiting + running); past it a "
                        "request gets 503 with Retry-After (default 4096)")
    s.add_argument("--max-request-bytes", type=int, default=16 << 20,
                   help="largest request body; a larger one gets 413 (default 16 MiB)")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="log level of uvicorn (default info)")
    s.add_argument("--disable-uvicorn-access-log", action="store_true",
                   help="no line per HTTP request in the log")

    m = p.add_argument_group("model and backend")
    m.add_argument("--model", required=True,
                   help="engine: a local Hugging Face model directory; sim: a conf/model name "
                        "(e.g. qwen3-0.6b) or a .yaml file like them")
    m.add_argument("--backend", choices=["engine", "sim"], default="engine",
                   help="engine: run the model; sim: the policy with the cost model's step times, "
                        "paced in real time, placeholder text (default engine)")
    m.add_argument("--engine-in-process", action="store_true",
                   help="step the engine (or the twin) in the server's process (default: a "
                        "process of its own, as vLLM's engine core, so HTTP work never delays "
                        "a step)")
    m.add_argument("--hardware", help="sim: a conf/hardware name (e.g. h200) or .yaml file")
    m.add_argument("--cost-model", choices=["roofline", "fitted"],
                   help="sim: how step times are predicted: roofline (from the hardware's peak "
                        "rates) or fitted (a calibration of the engine on that GPU) (default "
                        "roofline)")
    m.add_argument("--calibration",
                   help="sim: the calibration JSON of --cost-model fitted "
                        "(python -m simulator.calibrate writes one)")

    e = p.add_argument_group("engine and policy (defaults: engine.EngineConfig's; the twin "
                             "takes all but --dtype, --device, --attention-backend, --seed)")
    e.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 (default auto: config.json's)")
    e.add_argument("--device", help="auto | cuda | cpu (default auto)")
    e.add_argument("--gpu-memory-utilization", type=float,
                   help="share of GPU memory for weights, activations and KV cache (default 0.9)")
    e.add_argument("--num-gpu-blocks-override", type=int,
                   help="exact number of KV-cache blocks (default: sized from memory)")
    e.add_argument("--max-model-len", type=int,
                   help="longest prompt + output in tokens (default min(8192, the model's))")
    e.add_argument("--block-size", type=int, help="tokens per KV-cache block (default 16)")
    e.add_argument("--max-num-seqs", type=int, help="most sequences in one step (default 256)")
    e.add_argument("--max-num-batched-tokens", type=int,
                   help="token budget of one step (default 8192)")
    e.add_argument("--scheduler-policy", choices=["chunked", "prefill_first"],
                   help="chunked (vLLM V1) or prefill_first (nano-vLLM, vLLM V0) (default chunked)")
    e.add_argument("--long-prefill-token-threshold", type=int,
                   help="cap on one prompt's chunk per step, 0 = the step budget (default 0)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse KV blocks of identical prompt prefixes (default on)")
    e.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="no CUDA graphs (default off; the twin pads steps as the engine would)")
    e.add_argument("--cuda-graph-max-tokens", type=int,
                   help="largest step (tokens) replayed from a CUDA graph; larger ones run "
                        "eagerly (default 8192)")
    e.add_argument("-tp", "--tensor-parallel-size", type=int,
                   help="GPUs the model is split over (default 1)")
    e.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="form step N+1 while step N runs (default on; the twin follows)")
    e.add_argument("--attention-backend", help="auto | torch | triton | flashinfer (default auto)")
    e.add_argument("--kernel-plan", help="a file pinning the skinny-GEMM choice made at start: read "
                   "where it exists (a plan, or a calibration that records one), else timed and written "
                   "there (engine.kernel_plan)")
    e.add_argument("--seed", type=int, help="the engine's sampling stream (default 0)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None}
    if args.backend == "sim":
        if args.hardware is None:
            parser.error("--backend sim needs --hardware (a conf/hardware name, e.g. h200)")
        wrong = sorted(given & set(ENGINE_ONLY))
    else:
        wrong = sorted(given & set(SIM_ONLY))
    if wrong:
        flags = ", ".join("--" + w.replace("_", "-") for w in wrong)
        parser.error(f"{flags} do(es) not apply to --backend {args.backend}")
    if args.cost_model == "fitted" and args.calibration is None:
        parser.error("--cost-model fitted needs --calibration FILE")
    if args.calibration is not None and args.cost_model != "fitted":
        parser.error("--calibration needs --cost-model fitted")
    for flag in ("port", "max_queued_requests", "max_request_bytes"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    return args


SERVER_ARGS = ("host", "port", "api_key", "served_model_name", "max_queued_requests",
               "max_request_bytes", "uvicorn_log_level", "disable_uvicorn_access_log", "backend",
               "model", "engine_in_process")


def make_backend(args: argparse.Namespace):
    """The backend the options describe (loads the model, or the twin's cost model)."""
    kwargs = {RENAMED.get(k, k): v for k, v in vars(args).items()
              if v is not None and k not in SERVER_ARGS}
    if args.backend == "sim" and args.engine_in_process:
        from server.sim import SimBackend
        return SimBackend(args.model, **kwargs)
    if args.engine_in_process:
        from server.backend import EngineBackend
        return EngineBackend(args.model, **kwargs)
    from server.process import engine_process, sim_process
    if args.backend == "sim":
        hardware = kwargs.pop("hardware")
        return sim_process(args.model, hardware, **kwargs)
    return engine_process(args.model, **kwargs)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        backend = make_backend(args)
    except (ValueError, TypeError, FileNotFoundError, BackendDead) as e:   # a bad option or
        sys.exit(f"error: {e}")                                          # conf, a failed start
    import uvicorn

    from server.app import build_app
    app = build_app(backend, args.served_model_name, api_key=args.api_key,
                    max_request_bytes=args.max_request_bytes,
                    max_queued_requests=args.max_queued_requests)
    # The start-up objects (modules, the app, the tokenizer) live as long as the server: out
    # of the garbage collector's scans, so no full collection (~0.1 s on the 2-core CPU)
    # stalls every stream and request at once (vLLM's API server freezes them too)
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                access_log=not args.disable_uvicorn_access_log)
