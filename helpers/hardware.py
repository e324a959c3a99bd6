"""What this machine's processor can do: its name and instruction sets as torch reports them, its matrix-multiply
rate in float32 and bf16, and the floor those rates put under a model's latency (tools/benchmark.py prints them).

    from helpers.hardware import cpu_description, matmul_rates, count_flops
    rates = matmul_rates()                      # {"fp32": GFLOP/s, "bf16": GFLOP/s} of torch.mm on 2048^2
    flops = count_flops(model, image, tokens)   # one forward pass, torch.utils.flop_counter's count
    floor_ms = 1000 * flops / (rates["bf16"] * 1e9)   # no engine computes the model faster at that rate

A model is mostly matrix products (convolutions and attention are computed as such), so the rate of one large
torch.mm is what the processor can sustain; the floor is the time the model's FLOPs take at that rate, and the
fraction of it an engine reaches (floor / latency) says how much of the processor the engine uses.
"""
import platform
import statistics
import time

import torch


def cpu_description() -> dict:
    """{"name", "capability", "avx512_bf16", "amx"}: the processor's model name (/proc/cpuinfo where there is one),
    torch's vector capability (AVX2, AVX512, ...) and whether it computes bf16 natively."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    def flag(name):  # torch's own checks (private, so looked up with a default)
        return bool(getattr(torch.cpu, name, lambda: False)())
    return {"name": name, "capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": flag("_is_avx512_bf16_supported"), "amx": flag("_is_amx_tile_supported")}


def matmul_rate(dtype, n=2048, repeats=5) -> float:
    """GFLOP/s of torch.mm on two n x n matrices of `dtype` on the CPU: the median of `repeats` after one warm-up
    (2 n^3 floating-point operations each)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def matmul_rates(n=2048, repeats=5) -> dict:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s}: matmul_rate for each (bf16 is emulated, and slow, without AVX512-BF16
    or AMX)."""
    return {"fp32": matmul_rate(torch.float32, n, repeats), "bf16": matmul_rate(torch.bfloat16, n, repeats)}


def count_flops(model, *inputs) -> int:
    """Floating-point operations of one forward pass model(*inputs), as torch.utils.flop_counter counts them
    (matrix products and convolutions, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.get_total_flops()
