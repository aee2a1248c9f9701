"""4-bit weight quantization as published Hugging Face checkpoints describe it
(config.json `quantization_config`), read once for both executors: the engine builds its
quantized linear layers from it, the simulator its weight bytes.

Supported: GPTQ (AutoGPTQ / GPTQModel / optimum, `checkpoint_format` "gptq" or "gptq_v2")
and AWQ (AutoAWQ, `version` "gemm"), 4 bits, any group size dividing the layers' input
features (or -1: one group per output channel), GPTQ act-order (`desc_act`), symmetric or not.
Everything else is refused with the config field that asks for it.

Only the decoder layers' linear projections (q/k/v/o, gate/up/down) are quantized; the
embeddings, LM head and norms stay in the checkpoint dtype.
"""
from dataclasses import dataclass

PACK = 8                    # 4-bit values per int32
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """method: "gptq" | "awq"; group_size: input features per scale/zero group (-1: all);
    desc_act: GPTQ act-order (rows of a group scattered over the input, named by g_idx);
    sym: symmetric (GPTQ; the zero point is 2^(bits-1)); zero_offset: what the stored zero
    lacks (1 for GPTQ "gptq" checkpoints, whose packer stored zero - 1; 0 for "gptq_v2"
    and AWQ)."""
    method: str
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    zero_offset: int = 0

    def __post_init__(self):
        _require(self.method in ("gptq", "awq"),
                 f"quantization_config.quant_method {self.method!r} is not supported "
                 "(supported: gptq, awq)")
        _require(self.bits == 4, f"quantization_config.bits={self.bits} is not supported "
                 "(only 4-bit weights)")
        _require(self.group_size == -1 or (isinstance(self.group_size, int)
                                           and self.group_size > 0 and self.group_size % PACK == 0),
                 f"quantization_config.group_size must be -1 or a positive multiple of {PACK}, "
                 f"got {self.group_size!r}")
        _require(not (self.desc_act and self.method == "awq"), "AWQ has no desc_act")

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def weight_bytes(self, in_features: int, out_features: int) -> int:
        """Bytes of one [out, in] linear layer's quantized tensors: packed 4-bit values,
        fp16 scales and packed zeros per group, and GPTQ's int32 g_idx."""
        groups = self.num_groups(in_features)
        size = in_features * out_features * self.bits // 8            # qweight
        size += groups * out_features * 2                              # scales (fp16)
        size += groups * out_features * self.bits // 8                 # qzeros
        if self.method == "gptq":
            size += in_features * 4                                    # g_idx
        return size

    @classmethod
    def from_hf(cls, qc: dict) -> "QuantConfig":
        """Read config.json's `quantization_config` as AutoGPTQ / optimum / AutoAWQ write it."""
        _require(isinstance(qc, dict), "quantization_config must be a mapping")
        method = str(qc.get("quant_method", "")).lower()
        bits = qc.get("bits", qc.get("w_bit", 4))
        group_size = qc.get("group_size", qc.get("q_group_size", 128))
        if method == "gptq":
            fmt = str(qc.get("checkpoint_format", "gptq")).lower()
            _require(not qc.get("is_marlin_format"),
                     "quantization_config.is_marlin_format=true (Marlin-repacked weights) is "
                     "not supported; use the original GPTQ checkpoint")
            _require(fmt in GPTQ_FORMATS,
                     f"quantization_config.checkpoint_format {fmt!r} is not supported "
                     f"(supported: {', '.join(GPTQ_FORMATS)})")
            _require(not qc.get("lm_head"), "quantization_config.lm_head=true (a quantized LM "
                     "head) is not supported")
            _require(not qc.get("dynamic"), "quantization_config.dynamic (per-module GPTQ "
                     "settings) is not supported")
            exllama = qc.get("exllama_config") or {}
            _require(exllama.get("version", 2) != 1,
                     "quantization_config.exllama_config.version=1 (exllama v1 layout) is not "
                     "supported")
            return cls("gptq", bits, group_size, bool(qc.get("desc_act", False)),
                       bool(qc.get("sym", True)), 1 if fmt == "gptq" else 0)
        if method == "awq":
            version = str(qc.get("version", "gemm")).lower()
            _require(version in AWQ_VERSIONS,
                     f"quantization_config.version {version!r} is not supported "
                     f"(supported AWQ packings: {', '.join(AWQ_VERSIONS)})")
            skipped = set(qc.get("modules_to_not_convert") or ()) - {"lm_head"}
            _require(not skipped, f"quantization_config.modules_to_not_convert {sorted(skipped)} "
                     "is not supported (every decoder linear layer must be quantized)")
            _require(qc.get("zero_point", True),
                     "quantization_config.zero_point=false is not supported for AWQ")
            return cls("awq", bits, group_size, False, False, 0)
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported "
                         "(supported: gptq, awq)")
