"""Quantized weight storage: weights kept packed in memory and dequantized layer by layer in forward.

gguf_blocks  GGML block types (Q8_0, Q4_0/1, Q5_0/1, Q2_K..Q6_K, F16/BF16/F32) dequantized with torch ops
rowwise      per-row int8 / fp8 (e4m3) quantization, reusable by fp8 matmul code
linear       QuantLinear, the packed Linear
loading      filling a transformer with packed Linears from a load plan (load_transformer's `weights=`)
"""
