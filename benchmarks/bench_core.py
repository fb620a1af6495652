"""Speed of the certification core: absolute throughput, ratios to floors measured in the same
run, and where the CPU time went (user vs kernel) in each section.

1. Certification throughput of each smoothing family (noisy images classified per second by
   ``sample_counts``), and its ratio to the raw forward throughput of the same network on
   clean batches of the same size (the floor).
2. RDDRS search: seconds per input per iteration for 1, 8 and 32 inputs at once, at 500 and
   2000 gradient samples, split into network time (forward + backward of the same number of
   images) and the rest (noise, gradient matmuls, eigendecompositions, exponential map).
3. One whole ``rddrs certify`` process (RS, one image, the paper's n = 10^5), split into
   start-up (imports, model, data, sidecar) and sampling (the row's ``seconds``), with the
   start-up's parts timed in a process of their own.

Each section reports its user and system CPU time: system time is the kernel's (page faults,
zeroing, mmap/munmap), which ``rddrs.allocator`` keeps small. ``RDDRS_TUNE_MALLOC=0 python
benchmarks/bench_core.py`` measures without it.

Usage: python benchmarks/bench_core.py [--device cuda] [--threads 2] [--sections 1,2,3]
Untrained weights in sections 1-2: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from rddrs.core.certify import sample_counts
from rddrs.core.noise import Isotropic, NoiseSource
from rddrs.core.optimize import objective_and_gradient
from rddrs.pipeline import allocator
from rddrs.pipeline.models import MnistCNN

ROOT = Path(__file__).resolve().parents[1]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


#: user and system CPU seconds of the timed calls (after their warm-up), for ``cpu_split``
HOT = {"user": 0.0, "system": 0.0}


def best_time(fn, device, repeat=3):
    """Best wall time of ``repeat`` calls after one warm-up call (which pays the first touch of
    new memory; the CPU time of the timed calls is added to ``HOT``)."""
    fn()
    sync(device)
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    HOT["user"] += after.ru_utime - before.ru_utime
    HOT["system"] += after.ru_stime - before.ru_stime
    return min(times)


def memory_peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _split(user: float, system: float) -> str:
    share = system / (user + system) if user + system else 0.0
    return f"user {user:.1f} s, system {system:.1f} s = {share:.0%} of CPU time"


@contextmanager
def cpu_split(name: str):
    """Print the wall, user and system time of the block, with and without the warm-up calls."""
    before, tic, hot = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), dict(HOT)
    yield
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - tic
    text = f"   [{name}: wall {wall:.1f} s; all calls: {_split(after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)}"
    if HOT != hot:
        text += f";\n    timed calls only: {_split(HOT['user'] - hot['user'], HOT['system'] - hot['system'])}"
    print(text + "]")


def throughput(model, device, args):
    d = 784
    x = torch.rand(4, 1, 28, 28, device=device)
    idx = list(range(4))
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


def search_step(model, device, args):
    d = 784
    a = torch.randn(d, d, device=device)
    w = a @ a.T / d + torch.eye(d, device=device)
    eigh_s = best_time(lambda: torch.linalg.eigh(w), device, repeat=5)
    print(f"\n2. RDDRS search step (eigh of one 784x784: {eigh_s * 1e3:.0f} ms)")
    print("   samples  inputs  s/input/iter  network  linear algebra+noise  memory peak (MB)")
    for samples in args.samples:
        for b in args.inputs:
            xb = torch.rand(b, 1, 28, 28, device=device)
            law = Isotropic(torch.full((b,), 0.25, device=device), d).as_full()
            eps = torch.randn(b, samples, d, device=device)

            def iteration():
                _, grad = objective_and_gradient(model, xb, law, eps, kappa=1e-6)
                law.step(grad, 0.1).floor(0.25).eig  # the next iteration's eigendecomposition too

            images = (xb.reshape(b, 1, d) + 0.25 * eps).reshape(-1, 1, 28, 28).requires_grad_(True)

            def network():
                out = torch.log_softmax(model(images), -1)
                torch.autograd.grad(out[:, 0].sum(), images)

            total, net = best_time(iteration, device, 2), best_time(network, device, 2)
            print(f"   {samples:7d}  {b:6d}  {total / b:12.3f}  {net / total:7.0%}  {1 - net / total:20.0%}"
                  f"  {memory_peak_mb(device):16.0f}")


_STARTUP = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from rddrs.cli import build_parser
from rddrs.pipeline.settings import make_settings  # noqa: F401
from rddrs.pipeline.runs import certify_dataset  # noqa: F401
from rddrs.core.certify import certify  # noqa: F401
t2 = time.perf_counter()
from pathlib import Path
from rddrs.pipeline.data import load_dataset
from rddrs.pipeline.models import load_model
images, _ = load_dataset(Path(sys.argv[2]), train=False)
t3 = time.perf_counter()
load_model(sys.argv[1])
t4 = time.perf_counter()
make_settings("rs", 0.25, sys.argv[1], "paper")  # the sidecar's settings: the model's checksum
from rddrs.pipeline.files import provenance
provenance(torch.device("cpu"))
t5 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "rddrs": t2 - t1, "data": t3 - t2, "model": t4 - t3, "sidecar": t5 - t4}))
"""


def whole_process(args):
    model = ROOT / "data/models/mnist_cnn_sigma0.25.pt2"
    data = ROOT / "data"
    print(f"\n3. one `rddrs certify --method rs` process: one image, n = 100000, {model.name}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rs.tsv"
        cmd = [sys.executable, "-m", "rddrs", "certify", "--method", "rs", "--sigma", "0.25", "--model", str(model),
               "--preset", "paper", "--count", "1", "--data", str(data), "--out", str(out), "--quiet"]
        before, tic = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        wall = time.perf_counter() - tic
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        row = out.read_text().splitlines()[1].split("\t")
        sampling = float(row[-1])
    parts = json.loads(subprocess.run([sys.executable, "-c", _STARTUP, str(model), str(data)], check=True,
                                      capture_output=True, text=True, env=env).stdout)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(f"   wall {wall:.1f} s = sampling {sampling:.1f} s + start-up {wall - sampling:.1f} s  "
          f"(user {user:.1f} s, system {system:.1f} s = {system / (user + system):.0%} of CPU time)")
    print("   start-up parts, timed apart: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=lambda t: [int(v) for v in t.split(",")], default=[500, 2000],
                        help="gradient samples per input of section 2 (default 500,2000)")
    parser.add_argument("--inputs", type=lambda t: [int(v) for v in t.split(",")], default=[1, 8, 32],
                        help="inputs searched at once in section 2 (default 1,8,32)")
    parser.add_argument("--batch-size", type=int, default=2000, help="noisy images per forward pass")
    parser.add_argument("--cert-samples", type=int, default=20_000, help="certification samples per input")
    parser.add_argument("--sections", default="1,2,3", help="which sections to run (default 1,2,3)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MnistCNN().to(device, memory_format=torch.channels_last).eval().requires_grad_(False)  # as load_model
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"malloc tuning {allocator.status()}")
    sections = {"1": lambda: throughput(model, device, args), "2": lambda: search_step(model, device, args),
                "3": lambda: whole_process(args)}
    for key in args.sections.split(","):
        with cpu_split(f"section {key}"):
            sections[key]()


if __name__ == "__main__":
    main()
