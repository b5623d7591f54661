"""Shipping: GGUF export, quantization, the llama.cpp runtime and device benchmarks."""
