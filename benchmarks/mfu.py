"""Stage-1 MFU estimate for MobileLLaMA-1.4B shapes on whatever device runs this.

Times forward+backward(+AdamW on a GPU) steps of MobileLLaMA-1.4B (random weights; bf16 on a GPU;
fp32 on CPU with a short sequence and no optimizer state, which would not fit beside the model in
host memory; the optimizer adds no meaningful FLOPs), then MFU = 6 x params x tokens/s / peak FLOP/s. On a GPU
compare tokens/s with the paper's 18,800 tokens/s per A100 (bf16, FlashAttention-2).

    python benchmarks/mfu.py [--seq-len 2048] [--batch 4] [--steps 6] [--peak-flops 312e12]
"""

from __future__ import annotations

import argparse
import time

PAPER_TOKENS_PER_S_A100 = 18_800
A100_BF16_PEAK = 312e12


def detect_peak_flops(device: str) -> float:
    """Dense bf16 peak of known GPUs; for a CPU, a rough fp32 peak from a matmul."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, peak in (
            ("H200", 989e12),
            ("H100", 989e12),
            ("A100", 312e12),
            ("L4", 121e12),
            ("A10", 125e12),
        ):
            if key in name:
                return peak
        return A100_BF16_PEAK
    a = torch.randn(1024, 1024)
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    return 10 * 2 * 1024**3 / (time.perf_counter() - start)


def main() -> None:
    import torch

    import model as mvlm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--peak-flops", type=float, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seq = args.seq_len or (2048 if device == "cuda" else 128)
    batch = args.batch or (4 if device == "cuda" else 1)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = mvlm.build("mobilellama-1.4b", device=device, dtype=dtype)
    if device == "cuda":
        model.config._attn_implementation = "sdpa"
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if device == "cuda" else None
    ids = torch.randint(3, 32000, (batch, seq), device=device)
    times = []
    for _ in range(args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = sorted(times[1:])[len(times[1:]) // 2]
    tok_s = batch * seq / step
    peak = args.peak_flops or detect_peak_flops(device)
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), dtype {dtype}")
    print(f"MobileLLaMA-1.4B: {params:,} params, batch {batch} x {seq} tokens, median step {step:.3f}s")
    print(f"tokens/s {tok_s:,.0f} (paper: {PAPER_TOKENS_PER_S_A100:,} per A100); peak {peak:.3g} FLOP/s")
    print(f"MFU (6 x params x tokens/s / peak): {6 * params * tok_s / peak:.3f}")


if __name__ == "__main__":
    main()
