"""Model building blocks: tensor-parallel linears, embedding/LM head, RMSNorm, RoPE, SwiGLU
and paged attention with its backends."""
