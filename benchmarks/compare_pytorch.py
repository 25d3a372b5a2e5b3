#!/usr/bin/env python3
"""The training steps of benchmarks/step_bench.cpp, timed in PyTorch with Hugging Face PEFT's algorithms,
and the table of both (scripts/bench.sh --pytorch runs it).

    compare_pytorch.py --threads T [--reps 9] [--ours step_bench.json]

Each step is a frozen d x d layer with bias (float32, entries U(-1, 1)), N tokens, rank r = 16,
alpha = 2r: forward, then backward of a given upstream gradient.
  base  y = x Wᵀ + b (F.linear); backward computes dL/dx.
  lora  PEFT's LoRA layer (tuners/lora/layer.py): y = base(x) + lora_B(lora_A(x)) * scaling, dropout
        Identity; backward computes dA, dB and dL/dx.
  dora  PEFT's DoRA (tuners/lora/dora.py, DoraLinearLayer.forward): lora_weight = lora_B(lora_A(I)).T
        formed from an identity of d_in rows, n = ||W + scaling lora_weight||_row detached,
        y = base(x) + (m/n - 1) (base(x) - b) + (m/n) lora_B(lora_A(x)) scaling; backward computes
        dA, dB, dm and dL/dx.
With dx = 0, x does not require grad: PyTorch computes no dL/dx (the base step is then its forward).

Each figure is the median over --reps measurements of the mean step time over enough steps to last
about 50 ms, after two warm-up steps; gradients are set to None before each step, as
optimizer.zero_grad() does. Prints JSON lines, or with --ours (Google Benchmark's JSON output of
step_bench, with repetitions) the table of both and their ratios.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(d, n) for d in (1024, 2048, 4096) for n in (1, 64, 512)]
RANK = 16


def make_step(kind, d, n, r, input_grad):
    gen = torch.Generator().manual_seed(d * 1000 + n)

    def uniform(*shape):
        return torch.rand(*shape, generator=gen) * 2 - 1

    weight, bias = uniform(d, d), uniform(d)  # frozen: no grad
    x = uniform(n, d).requires_grad_(input_grad)
    g = uniform(n, d)
    lora_a = (uniform(r, d) / d**0.5).requires_grad_()
    lora_b = uniform(d, r).requires_grad_()
    alpha = 2.0 * r  # as step_bench's config
    scaling = alpha / r
    with torch.no_grad():
        magnitude = torch.linalg.norm(weight + scaling * (lora_b @ lora_a), dim=1)
    magnitude.requires_grad_()
    params = [x, lora_a, lora_b, magnitude]

    def zero_grad():
        for p in params:
            p.grad = None

    def base():
        zero_grad()
        y = F.linear(x, weight, bias)
        if input_grad:
            y.backward(g)

    def lora():
        zero_grad()
        y = F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scaling
        y.backward(g)

    def dora():
        zero_grad()
        result = F.linear(x, weight, bias)
        x_eye = torch.eye(lora_a.shape[1], dtype=x.dtype)
        lora_weight = F.linear(F.linear(x_eye, lora_a), lora_b).T
        weight_norm = torch.linalg.norm(weight + scaling * lora_weight.detach(), dim=1).detach()
        mag_norm_scale = (magnitude / weight_norm).view(1, -1)
        base_result = result - bias
        lora_result = F.linear(F.linear(x, lora_a), lora_b)
        result = result + (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling
        result.backward(g)

    return {"base": base, "lora": lora, "dora": dora}[kind]


def median_step_seconds(step, reps):
    step()
    step()
    t0 = time.perf_counter()
    step()
    once = max(time.perf_counter() - t0, 1e-6)
    count = max(1, int(0.05 / once))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(count):
            step()
        samples.append((time.perf_counter() - t0) / count)
    return statistics.median(samples)


def pytorch_times(reps, kinds):
    times = {}
    for input_grad in (True, False):
        for d, n in SHAPES:
            for kind in kinds:
                seconds = median_step_seconds(make_step(kind, d, n, RANK, input_grad), reps)
                times[(kind, d, n, int(input_grad))] = seconds
    return times


def our_times(path):
    """Medians from step_bench's JSON (--benchmark_repetitions=K): BM_Step_<Kind>/d:../N:../r:../dx:.._median."""
    with open(path) as f:
        report = json.load(f)
    times = {}
    for b in report["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        name = b["run_name"]  # BM_Step_LoRA/d:4096/N:512/r:16/dx:1
        parts = name.split("/")
        kind = parts[0].replace("BM_Step_", "").lower()
        fields = dict(p.split(":") for p in parts[1:])
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
        entry = {"seconds": b["real_time"] * scale}
        if "of_peak" in b:
            entry["of_peak"] = b["of_peak"]
            entry["GFLOPS"] = b["GFLOPS"]
        times[(kind, int(fields["d"]), int(fields["N"]), int(fields["dx"]))] = entry
    return times


def print_table(ours, theirs):
    print("Training step of a d x d float layer with bias, r = 16; median times; ratio = peft / PyTorch"
          " (below 1: peft is faster). PyTorch's DoRA is PEFT's algorithm.")
    for dx in (1, 0):
        print()
        print("with the input gradient (dL/dx)" if dx else "without the input gradient (a first layer)")
        print(f"{'d':>5} {'N':>4} | {'base ms':>9} {'torch':>9} {'ratio':>6} {'GEMM':>5} | "
              f"{'LoRA ms':>9} {'torch':>9} {'ratio':>6} | {'DoRA ms':>9} {'torch+PEFT':>10} {'ratio':>6}")
        for d, n in SHAPES:
            row = f"{d:>5} {n:>4} |"
            for kind in ("base", "lora", "dora"):
                o = ours.get((kind, d, n, dx))
                t = theirs.get((kind, d, n, dx))
                if o is None or t is None:
                    row += f" {'-':>9} {'-':>9} {'-':>6}"
                else:
                    width = 10 if kind == "dora" else 9
                    row += f" {1e3 * o['seconds']:>9.3f} {1e3 * t:>{width}.3f} {o['seconds'] / t:>6.2f}"
                if kind == "base":
                    eff = o.get("of_peak") if o else None
                    row += f" {'' if eff is None else f'{100 * eff:.0f}%':>5}"
                row += " |" if kind != "dora" else ""
            copy, lora = ours.get(("copyx", d, n, 1)), ours.get(("lora", d, n, dx))
            if copy and lora:
                row += f" | copy of X {100 * copy['seconds'] / lora['seconds']:.1f}% of LoRA's"
            print(row)
    print()
    print("GEMM: the base step's flops (2 d² N per product with W) over its time, as a share of the "
          "machine's measured float peak (step_bench's of_peak).")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, required=True, help="PyTorch's intra-op threads")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--ours", help="step_bench's JSON output, to print the comparison table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    theirs = pytorch_times(args.reps, ("base", "lora", "dora"))
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    if args.ours:
        print_table(our_times(args.ours), theirs)
    else:
        for (kind, d, n, dx), seconds in sorted(theirs.items()):
            print(json.dumps({"kind": kind, "d": d, "N": n, "r": RANK, "dx": dx, "seconds": seconds}))


if __name__ == "__main__":
    main()
