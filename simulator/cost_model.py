"""How long one engine step takes: the simulator's only stand-in for the GPU.

Three cost models, one contract (`CostModel.step_time(batch) -> seconds`):

- `RooflineCostModel`: peak rates x efficiencies from a `HardwareSpec`, work from a
  `ModelSpec`. No profiling; any model on any GPU.
- `FittedCostModel`: a linear model fitted on a real engine's `steps.parquet` by
  `fit_calibration` (CLI: `python -m simulator.calibrate`), stored as a calibration file.
- `ReplayCostModel`: a real run's measured step durations, in order. With `strict=True` it
  also checks that the simulator scheduled the same batch shapes: the policy-equivalence test.

Every model reads the step through `Batch.features()`: the counters of the
`steps.parquet` row.
"""
import datetime
import json
import pathlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from simulator.hardware import GiB, HardwareSpec

if TYPE_CHECKING:   # pandas only where a steps table is read: not on the simulator's path
    import pandas as pd

CALIBRATION_FORMAT = "twinserve-calibration/1"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# ---- the model's shape ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The numbers of a dense decoder-only transformer that set its cost."""
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    dtype_bytes: int = 2
    attention_bias: bool = False
    qk_norm: bool = False           # Qwen3: an RMSNorm over each head's q and k

    def __post_init__(self):
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                      "intermediate_size", "vocab_size", "dtype_bytes"):
            value = getattr(self, field)
            _require(isinstance(value, int) and value >= 1,
                     f"model {self.name!r}: {field} must be a positive integer, got {value!r}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"model {self.name!r}: num_heads ({self.num_heads}) must be a multiple of "
                 f"num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_hf_config(cls, d: dict, name: str | None = None) -> "ModelSpec":
        """From a Hugging Face `config.json` dict (what `conf/model/<name>.yaml` holds under
        `hf_config`). Mixture-of-experts configs are refused: their cost is not modelled."""
        name = name or d.get("_name_or_path") or d.get("model_type") or "model"
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                    "intermediate_size", "vocab_size"):
            _require(key in d, f"model {name!r}: hf_config has no {key!r}")
        _require(not (d.get("num_experts") or d.get("num_local_experts")),
                 f"model {name!r}: mixture-of-experts models are not modelled by the simulator")
        dtype = d.get("torch_dtype") or d.get("dtype") or "bfloat16"
        _require(dtype in DTYPE_BYTES, f"model {name!r}: unknown torch_dtype {dtype!r} "
                 f"(known: {sorted(DTYPE_BYTES)})")
        heads = d["num_attention_heads"]
        return cls(name=name, num_layers=d["num_hidden_layers"], hidden_size=d["hidden_size"],
                   num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                   intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"],
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   dtype_bytes=DTYPE_BYTES[dtype], attention_bias=bool(d.get("attention_bias", False)),
                   qk_norm=str(d.get("model_type", "")).startswith("qwen3"))

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's linear layers (QKV, O, gate/up/down)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size

    @property
    def matmul_params(self) -> int:
        """Linear-layer weights of all layers (no embedding, LM head or norms)."""
        return self.num_layers * self.layer_matmul_params

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """All parameters (tied embeddings counted once), as Hugging Face counts them."""
        h = self.hidden_size
        per_layer = self.layer_matmul_params + 2 * h
        if self.attention_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embeddings = self.lm_head_params * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    def kv_heads_per_rank(self, tp: int) -> int:
        """KV heads one tensor-parallel rank holds (replicated when there are fewer than tp)."""
        return max(1, self.num_kv_heads // tp)

    def kv_bytes_per_token(self, tp: int = 1) -> int:
        """K and V of one token over all layers, on one rank."""
        return 2 * self.num_layers * self.kv_heads_per_rank(tp) * self.head_dim * self.dtype_bytes

    def check_tp(self, tp: int) -> None:
        _require(isinstance(tp, int) and tp >= 1, f"tp must be a positive integer, got {tp!r}")
        _require(self.num_heads % tp == 0,
                 f"model {self.name!r}: tp={tp} does not divide num_heads={self.num_heads}")
        _require(self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0,
                 f"model {self.name!r}: tp={tp} and num_kv_heads={self.num_kv_heads} must divide "
                 "one another")


def kv_pool_blocks(model: ModelSpec, hw: HardwareSpec, block_size: int,
                   gpu_memory_utilization: float, tp: int = 1,
                   activation_reserve_bytes: int = 2 * GiB) -> int:
    """KV blocks per GPU, sized as the engine does: (memory x utilization - weights/tp -
    activation reserve) / bytes per block, where a block is K and V of `block_size` tokens in
    every layer for this rank's KV heads. `activation_reserve_bytes` stands for the peak
    activation memory, CUDA context and graph pools the engine measures at start-up (the
    2 GiB default is a lead until the engine reports its measured value).
    Raises ValueError if nothing is left for the KV cache (the model does not fit)."""
    _require(0 < gpu_memory_utilization <= 1,
             f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    _require(isinstance(block_size, int) and block_size >= 1,
             f"block_size must be a positive integer, got {block_size!r}")
    model.check_tp(tp)
    budget = hw.memory_bytes * gpu_memory_utilization
    free = budget - model.weight_bytes / tp - activation_reserve_bytes
    block_bytes = block_size * model.kv_bytes_per_token(tp)
    blocks = int(free // block_bytes)
    _require(blocks >= 1,
             f"model {model.name!r} does not fit on {hw.name} with tp={tp}: "
             f"{budget / GiB:.1f} GiB usable (memory_gib={hw.memory_gib} x "
             f"gpu_memory_utilization={gpu_memory_utilization}) - weights "
             f"{model.weight_bytes / tp / GiB:.1f} GiB - activation reserve "
             f"{activation_reserve_bytes / GiB:.1f} GiB leaves {free / GiB:.2f} GiB, "
             f"less than one KV block ({block_bytes} bytes)")
    return blocks


# ---- cost models ------------------------------------------------------------------
class CostModel(ABC):
    """Seconds one engine step takes."""

    @abstractmethod
    def predict(self, features: dict) -> float:
        """Step time from `batch.features()`."""

    def step_time(self, batch) -> float:
        return self.predict(batch.features())

    def reset(self) -> None:
        """Forget per-run state (the simulator calls it at the start of every run)."""


class RooflineCostModel(CostModel):
    """A step is a sequence of kernel groups; each takes max(FLOPs / achievable FLOP/s,
    bytes / achievable bandwidth), and the groups add up (they run one after another):

        linear   max(2 Pm T' / tp / F,  Pm b / tp / BW)       weights read once per step
        lm_head  max(2 Pv S / tp / F,   Pv b / tp / BW)       only if S > 0
        decode   max(A Cd / F,          K Cd / BW)            attention over each decode's KV
        prefill  max(A Pp / F,          K Ckv / BW)           chunk attention incl. cached context
        allreduce  2 L (lat + 2 (tp-1)/tp T h b / IC)         only if tp > 1
        cpu      step + seq B + (launch L if eager)

    Pm: linear-layer params, Pv: vocab x hidden, b: bytes per value, T: batched tokens,
    T': T padded to the CUDA-graph size for a graphed decode-only step, S: sampled
    positions, A = 4 L heads head_dim / tp (FLOPs per query-key pair, QK^T and PV),
    K: KV bytes per token per rank, Cd: decode context tokens (decode_context_tokens),
    Pp: causal query-key pairs of prefill chunks (prefill_attention_pairs), Ckv: their
    context after the step (prefill_kv_tokens, cached prefix included), B: sequences,
    L: layers, h: hidden, IC: interconnect bytes/s. A step is eager if it has prefill
    tokens or its decode batch is larger than the largest CUDA graph.
    """

    def __init__(self, model: ModelSpec, hw: HardwareSpec, tp: int = 1):
        model.check_tp(tp)
        _require(tp == 1 or hw.interconnect_gbs > 0,
                 f"hardware {hw.name!r} has interconnect_gbs=0: cannot model tp={tp}")
        self.model, self.hw, self.tp = model, hw, tp
        F, BW, b = hw.flops, hw.bandwidth, model.dtype_bytes
        # Seconds per unit of work, precomputed so `predict` is a handful of multiplies.
        self.linear_flop_s = 2 * model.matmul_params / tp / F        # per token
        self.linear_bytes_s = model.matmul_params * b / tp / BW      # per step
        self.lm_flop_s = 2 * model.lm_head_params / tp / F           # per sampled token
        self.lm_bytes_s = model.lm_head_params * b / tp / BW         # per step with a sample
        heads_per_rank = model.num_heads // tp
        self.attn_flop_s = 4 * model.num_layers * heads_per_rank * model.head_dim / F  # per pair
        self.kv_read_s = model.kv_bytes_per_token(tp) / BW           # per context token
        if tp > 1:
            self.allreduce_fixed_s = 2 * model.num_layers * hw.allreduce_latency_s
            self.allreduce_token_s = (2 * model.num_layers * 2 * (tp - 1) / tp
                                      * model.hidden_size * b / (hw.interconnect_gbs * 1e9))
        else:
            self.allreduce_fixed_s = self.allreduce_token_s = 0.0
        self.eager_launch_s = hw.layer_launch_s * model.num_layers

    def predict(self, f: dict) -> float:
        hw = self.hw
        num_seqs, tokens = f["num_seqs"], f["num_batched_tokens"]
        padded = hw.graph_batch_size(num_seqs) if f["num_prefill_tokens"] == 0 else 0
        t = max(self.linear_flop_s * (padded or tokens), self.linear_bytes_s)
        if f["num_sampled"]:
            t += max(self.lm_flop_s * f["num_sampled"], self.lm_bytes_s)
        decode_ctx = f["decode_context_tokens"]
        t += max(self.attn_flop_s * decode_ctx, self.kv_read_s * decode_ctx)
        if f["prefill_kv_tokens"]:
            t += max(self.attn_flop_s * f["prefill_attention_pairs"],
                     self.kv_read_s * f["prefill_kv_tokens"])
        if self.tp > 1:
            t += self.allreduce_fixed_s + self.allreduce_token_s * tokens
        t += hw.step_overhead_s + hw.seq_overhead_s * num_seqs
        if not padded:
            t += self.eager_launch_s
        return t


class FittedCostModel(CostModel):
    """Step time = intercept + sum(coefficient x feature), with one linear model for
    decode-only steps (`num_prefill_tokens == 0`, CUDA-graph replays on the engine) and one
    for steps with prefill tokens ("mixed"). Features are `Batch.features()` keys.

    The calibration file (JSON, written by `fit_calibration`):

        {"format": "twinserve-calibration/1",
         "model": "qwen3-0.6b", "device": "NVIDIA H100 80GB HBM3", "tp": 1,
         "engine_commit": "<git commit>" | null, "command": "<exact command that produced it>",
         "source": "<what the steps came from>", "created": "<ISO date>",
         "regimes": {"decode": {"features": [...], "coefficients": {name: seconds per unit},
                                "intercept_s": s, "fit": {"n_steps", "mape", "r2", ...}},
                     "mixed":  {...same keys...}}}
    """

    def __init__(self, calibration: dict, source: str = "<calibration>"):
        _require(calibration.get("format") == CALIBRATION_FORMAT,
                 f"{source}: format is {calibration.get('format')!r}, expected {CALIBRATION_FORMAT!r}")
        regimes = calibration.get("regimes") or {}
        self.calibration, self.source = calibration, source
        self.terms = {}
        for regime in ("decode", "mixed"):
            _require(regime in regimes, f"{source}: no {regime!r} regime in 'regimes'")
            r = regimes[regime]
            for key in ("features", "coefficients", "intercept_s"):
                _require(key in r, f"{source}: regime {regime!r} has no {key!r}")
            missing = [name for name in r["features"] if name not in r["coefficients"]]
            _require(not missing, f"{source}: regime {regime!r} has no coefficient for {missing}")
            self.terms[regime] = (float(r["intercept_s"]),
                                  [(name, float(r["coefficients"][name])) for name in r["features"]])

    @classmethod
    def load(cls, path) -> "FittedCostModel":
        path = pathlib.Path(path)
        with open(path) as f:
            return cls(json.load(f), source=str(path))

    def predict(self, f: dict) -> float:
        intercept, terms = self.terms["decode" if f["num_prefill_tokens"] == 0 else "mixed"]
        t = intercept
        for name, coef in terms:
            t += coef * f[name]
        return t


# Work the engine does per step, by regime (all are Batch.record() columns). Decode-only:
# sequences (input prep, LM head rows) and KV read. Mixed: also GEMM tokens and attention work.
DEFAULT_FEATURES = {
    "decode": ["num_seqs", "decode_context_tokens"],
    "mixed": ["num_batched_tokens", "num_seqs", "num_sampled", "decode_context_tokens",
              "prefill_context_tokens"],
}


def nonnegative_lstsq(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: solve, drop the most negative column,
    solve again, until none is negative. A greedy active-set method: always non-negative,
    and the exact NNLS optimum in the usual case of a few useless features dropping out."""
    active = list(range(X.shape[1]))
    coef = np.zeros(X.shape[1])
    while active:
        scale = np.abs(X[:, active]).max(axis=0)
        scale[scale == 0] = 1.0          # conditioning: features span 1 .. 1e7
        sol = np.linalg.lstsq(X[:, active] / scale, y, rcond=None)[0] / scale
        if (sol >= 0).all():
            coef[active] = sol
            break
        del active[int(np.argmin(sol))]
    return coef


def fit_regime(steps: "pd.DataFrame", features: list[str]) -> dict:
    """One regime's linear model: intercept (a column of ones) + features, non-negative."""
    X = np.column_stack([np.ones(len(steps))] + [steps[f].to_numpy(float) for f in features])
    y = steps["duration_s"].to_numpy(float)
    coef = nonnegative_lstsq(X, y)
    pred = X @ coef
    ape = np.abs(pred - y) / y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((pred - y) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return {"features": list(features),
            "coefficients": {f: float(c) for f, c in zip(features, coef[1:])},
            "intercept_s": float(coef[0]),
            "fit": {"n_steps": int(len(y)), "mape": float(ape.mean()),
                    "p90_ape": float(np.percentile(ape, 90)), "max_ape": float(ape.max()),
                    "r2": r2, "mean_duration_s": float(y.mean())}}


def fit_calibration(steps: "pd.DataFrame", meta: dict, features: dict | None = None) -> dict:
    """A calibration dict (see `FittedCostModel`) fitted on `steps` (a steps.parquet
    frame). `meta` supplies model, device, command and optionally tp, engine_commit, source.
    Raises ValueError if a column is missing or a regime has too few steps to fit."""
    features = features or DEFAULT_FEATURES
    for key in ("model", "device", "command"):
        if not meta.get(key):
            raise ValueError(f"calibration metadata needs {key!r}")
    needed = {"duration_s", "num_prefill_tokens"} | {f for fs in features.values() for f in fs}
    missing = sorted(needed - set(steps.columns))
    if missing:
        raise ValueError(f"steps table lacks columns {missing}")
    if (steps["duration_s"] <= 0).any():
        raise ValueError("steps table has durations <= 0")
    is_decode = steps["num_prefill_tokens"] == 0
    regimes = {}
    for regime, rows in (("decode", steps[is_decode]), ("mixed", steps[~is_decode])):
        if len(rows) < 2 * (len(features[regime]) + 1):
            raise ValueError(f"only {len(rows)} {regime} steps: too few to fit "
                             f"{len(features[regime]) + 1} coefficients (run a longer workload)")
        regimes[regime] = fit_regime(rows, features[regime])
    return {"format": CALIBRATION_FORMAT, "model": meta["model"], "device": meta["device"],
            "tp": int(meta.get("tp", 1)), "engine_commit": meta.get("engine_commit"),
            "command": meta["command"], "source": meta.get("source", "engine steps.parquet"),
            "created": datetime.date.today().isoformat(), "regimes": regimes}


class ReplayCostModel(CostModel):
    """The durations of a recorded run (`steps.parquet` of one replica), step by step.
    With `strict`, step i must have the recorded `num_seqs` and `num_batched_tokens`:
    a mismatch means the two runs' policies diverged, and raises RuntimeError."""

    def __init__(self, steps: "pd.DataFrame", strict: bool = True, source: str = "<steps>"):
        need = ["duration_s"] + (["num_seqs", "num_batched_tokens"] if strict else [])
        missing = [c for c in need if c not in steps.columns]
        _require(not missing, f"{source}: replay needs columns {missing}")
        if "replica" in steps.columns:
            _require(steps["replica"].nunique() <= 1,
                     f"{source}: replay takes one replica's steps, found replicas "
                     f"{sorted(steps['replica'].unique())}")
        if "step" in steps.columns:
            steps = steps.sort_values("step", kind="stable")
        self.durations = steps["duration_s"].astype(float).tolist()
        self.shapes = (list(zip(steps["num_seqs"].astype(int).tolist(),
                                steps["num_batched_tokens"].astype(int).tolist()))
                       if strict else None)
        self.strict, self.source, self.next_step = strict, source, 0

    @classmethod
    def load(cls, path, strict: bool = True) -> "ReplayCostModel":
        import pandas as pd
        return cls(pd.read_parquet(path), strict=strict, source=str(path))

    def reset(self) -> None:
        self.next_step = 0

    def predict(self, f: dict) -> float:
        i = self.next_step
        if i >= len(self.durations):
            raise RuntimeError(f"replay: the simulator asked for step {i} but {self.source} "
                               f"records only {len(self.durations)} steps (the schedules diverged "
                               "or the workloads differ)")
        if self.strict and (f["num_seqs"], f["num_batched_tokens"]) != self.shapes[i]:
            seqs, tokens = self.shapes[i]
            raise RuntimeError(
                f"replay: schedules diverged at step {i}: the simulator scheduled "
                f"num_seqs={f['num_seqs']}, num_batched_tokens={f['num_batched_tokens']}; "
                f"{self.source} recorded num_seqs={seqs}, num_batched_tokens={tokens}")
        self.next_step = i + 1
        return self.durations[i]


# ---- configuration ----------------------------------------------------------------
COST_MODELS = ("roofline", "fitted", "replay")


@dataclass(frozen=True, slots=True)
class CostModelConfig:
    """kind: roofline | fitted | replay. path: the calibration JSON (fitted) or a run's
    steps.parquet (replay); relative paths are tried from the working directory, then from
    the repository root. strict: replay checks batch shapes step by step."""
    kind: str = "roofline"
    path: str | None = None
    strict: bool = True

    def __post_init__(self):
        _require(self.kind in COST_MODELS,
                 f"cost_model.kind must be one of {COST_MODELS}, got {self.kind!r}")
        _require(self.kind == "roofline" or bool(self.path),
                 f"cost_model.kind={self.kind!r} needs cost_model.path")


def _resolve(path: str) -> pathlib.Path:
    for candidate in (pathlib.Path(path), REPO_ROOT / path):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"cost_model.path {path!r} not found (tried the working directory "
                            f"and {REPO_ROOT})")


def _same_model(a: str, b: str) -> bool:
    return a.rsplit("/", 1)[-1].lower() == b.rsplit("/", 1)[-1].lower()


def build_cost_model(cfg: CostModelConfig, model: ModelSpec, hw: HardwareSpec, tp: int = 1) -> CostModel:
    """The cost model `cfg` names. A calibration must be for this model and tp."""
    if cfg.kind == "roofline":
        return RooflineCostModel(model, hw, tp)
    path = _resolve(cfg.path)
    if cfg.kind == "replay":
        return ReplayCostModel.load(path, strict=cfg.strict)
    fitted = FittedCostModel.load(path)
    calib = fitted.calibration
    _require(_same_model(str(calib.get("model", "")), model.name),
             f"{path}: calibrated for model {calib.get('model')!r}, not {model.name!r}")
    _require(int(calib.get("tp", 1)) == tp, f"{path}: calibrated for tp={calib.get('tp')}, not tp={tp}")
    return fitted
