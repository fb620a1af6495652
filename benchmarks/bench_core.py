"""Speed of the certification core, as ratios to floors measured in the same run.

1. Certification throughput of each smoothing family (noisy images classified per second
   by ``sample_counts``) divided by the raw forward throughput of the same network on
   clean batches of the same size.
2. RDDRS search: time per input per iteration for 1, 8 and 32 inputs at once, split into
   network time (forward + backward of the same number of images) and the rest (noise,
   gradient matmuls, eigendecompositions, exponential map), and the memory peak.

Usage: python benchmarks/bench_core.py [--device cuda] [--threads 2] [--samples 2000]
Untrained weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from rddrs.certify import sample_counts
from rddrs.models import MnistCNN
from rddrs.noise import Isotropic, NoiseSource
from rddrs.optimize import objective_and_gradient


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device, repeat=3):
    """Best wall time of ``repeat`` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def memory_peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2000, help="gradient samples per input (RDDRS)")
    parser.add_argument("--batch-size", type=int, default=2000, help="noisy images per forward pass")
    parser.add_argument("--cert-samples", type=int, default=20_000, help="certification samples per input")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MnistCNN().to(device, memory_format=torch.channels_last).eval().requires_grad_(False)  # as load_model
    d = 784
    x = torch.rand(4, 1, 28, 28, device=device)
    idx = list(range(4))
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    clean = torch.rand(args.batch_size, 1, 28, 28, device=device)
    with torch.no_grad():
        raw = args.batch_size / best_time(lambda: model(clean), device, repeat=20)
    print(f"\n1. certification throughput (images/s), {args.cert_samples} samples x 4 inputs, "
          f"batch {args.batch_size}")
    print(f"   raw forward of the network: {raw:12.0f}  (the floor, ratio 1)")
    sigma = Isotropic(torch.full((4,), 0.25, device=device), d)
    a = torch.randn(4, d, d, device=device)
    full = sigma.as_full().with_param(a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d, device=device))
    for name, law in [("isotropic", sigma), ("diagonal", sigma.as_diagonal()), ("full SPD", full)]:
        def run():
            sample_counts(model, x, law, idx, args.cert_samples, NoiseSource(0, "estimate", device), args.batch_size)
        rate = 4 * args.cert_samples / best_time(run, device, repeat=5)
        print(f"   {name:10s}: {rate:12.0f}  ratio {rate / raw:.2f}")

    w = a[0] @ a[0].T / d + torch.eye(d, device=device)
    eigh_s = best_time(lambda: torch.linalg.eigh(w), device, repeat=5)
    print(f"\n2. RDDRS search, {args.samples} gradient samples per input (eigh of one 784x784: {eigh_s * 1e3:.0f} ms)")
    print("   inputs  s/input/iter  network  linear algebra+noise  memory peak (MB)")
    for b in (1, 8, 32):
        xb = torch.rand(b, 1, 28, 28, device=device)
        law = Isotropic(torch.full((b,), 0.25, device=device), d).as_full()
        eps = torch.randn(b, args.samples, d, device=device)

        def iteration():
            _, grad = objective_and_gradient(model, xb, law, eps, kappa=1e-6)
            law.step(grad).floor(0.25).eig  # the next iteration's eigendecomposition too

        images = (xb.reshape(b, 1, d) + 0.25 * eps).reshape(-1, 1, 28, 28).requires_grad_(True)

        def network():
            out = torch.log_softmax(model(images), -1)
            torch.autograd.grad(out[:, 0].sum(), images)

        total, net = best_time(iteration, device, 2), best_time(network, device, 2)
        print(f"   {b:6d}  {total / b:12.3f}  {net / total:7.0%}  {1 - net / total:20.0%}  {memory_peak_mb(device):16.0f}")


if __name__ == "__main__":
    main()
