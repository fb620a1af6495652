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
4. Anatomy of the RDDRS step on the states of a real search (a preset's RDDRS search of test
   image 0 with the trained sigma = 0.25 model, from C = 0.25 I; ``--anatomy-preset``, default
   cpu, or paper: 100 steps at 20 000 samples, minutes on a CPU): the time of the gradient
   (draws, network, products), of the exponential map and of the floor, each eigendecomposition
   timed apart, and ``torch.linalg.matrix_exp`` of the same clamped whitened step, the primitive
   an eigh-free exponential map would use (timed without the spectral radius that the clamp
   needs, so in its favour); with how often the floor and the step bound bind, which decides
   whether a step can skip an eigendecomposition.

5. The network (``rddrs.pipeline.fastnet``): the GEMM peak of this many threads (torch.mm of two
   4096 x 4096 matrices, the floor), and the trained CNN's forward and forward + input gradient
   over ``--draws`` noisy images (default 20 000, the paper's) on both paths, autograd (the path of
   commit 6de0fd1 and before) and fast, in GFLOP/s counted as autograd's dense work (FlopCounterMode)
   and as a share of the peak; then the paper preset's RDDRS step (gradient at 20 000 draws,
   exponential map, floor) on both paths, side by side.
6. Start-up of the command line: the wall time of whole processes ``python -m rddrs --help`` and
   ``python -m rddrs sweep --help`` (the parsers import no torch), best of ``--repeat``, as a
   ratio to ``python -c pass`` (the interpreter's own start-up, the floor), with
   ``python -c "import torch"`` beside them: what a parser that imported torch would add.

Each section reports its user and system CPU time: system time is the kernel's (page faults,
zeroing, mmap/munmap), which ``rddrs.pipeline.allocator`` keeps small. ``RDDRS_TUNE_MALLOC=0 python
benchmarks/bench_core.py`` measures without it.

Usage: python benchmarks/bench_core.py [--device cuda] [--threads 2] [--sections 1,2,3,4,5,6]
       [--anatomy-preset cpu] [--draws 20000] [--repeat 5]
Untrained weights in sections 1-2: speed does not depend on them. Every section runs the network
of the file users run (the ``.pt`` checkpoint, through ``load_model``: the fast path unless
``RDDRS_FAST_NETWORK=0``).
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

from rddrs.core import spd
from rddrs.core.certify import sample_counts
from rddrs.core.noise import Isotropic, NoiseSource
from rddrs.core.optimize import objective_and_gradient
from rddrs.core.presets import preset
from rddrs.pipeline import allocator, fastnet
from rddrs.pipeline.data import load_dataset
from rddrs.pipeline.models import MnistCNN, load_model
from rddrs.studies.claims import iteration_cost

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
    split = _split(after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)
    text = f"   [{name}: wall {wall:.1f} s; all calls: {split}"
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
    print(f"\n1. certification throughput (images/s), {args.cert_samples} samples x 4 inputs, batch {args.batch_size}")
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
            # the chapter's measurement (claims.iteration_cost): a generic C, best of 2 after a warm-up
            cost = iteration_cost(model, xb, 0.25, samples, kappa=1e-6, max_step=0.1, repeat=2)
            share = cost["network"] / cost["total"]
            print(
                f"   {samples:7d}  {b:6d}  {cost['total']:12.3f}  {share:7.0%}  {1 - share:20.0%}"
                f"  {memory_peak_mb(device):16.0f}"
            )


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
from rddrs.pipeline.provenance import provenance
provenance(torch.device("cpu"))
t5 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "rddrs": t2 - t1, "data": t3 - t2, "model": t4 - t3, "sidecar": t5 - t4}))
"""


def whole_process(args):
    model = ROOT / "data/models/mnist_cnn_sigma0.25.pt"
    data = ROOT / "data"
    print(f"\n3. one `rddrs certify --method rs` process: one image, n = 100000, {model.name}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rs.tsv"
        cmd = [
            sys.executable,
            "-m",
            "rddrs",
            "certify",
            "--method",
            "rs",
            "--sigma",
            "0.25",
            "--model",
            str(model),
            "--preset",
            "paper",
            "--count",
            "1",
            "--data",
            str(data),
            "--out",
            str(out),
            "--quiet",
        ]
        before, tic = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        wall = time.perf_counter() - tic
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        row = out.read_text().splitlines()[1].split("\t")
        sampling = float(row[-1])
    parts = json.loads(
        subprocess.run(
            [sys.executable, "-c", _STARTUP, str(model), str(data)], check=True, capture_output=True, text=True, env=env
        ).stdout
    )
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(
        f"   wall {wall:.1f} s = sampling {sampling:.1f} s + start-up {wall - sampling:.1f} s  "
        f"(user {user:.1f} s, system {system:.1f} s = {system / (user + system):.0%} of CPU time)"
    )
    print("   start-up parts, timed apart: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))


def _timed(fn, device):
    """fn's result and its wall time in ms (one call)."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - start) * 1e3


def step_anatomy(device, name):
    settings = preset(name).search["rddrs"]
    model = load_model(ROOT / "data/models/mnist_cnn_sigma0.25.pt", device)
    x = load_dataset(ROOT / "data", train=False)[0][:1].to(device)
    lower, d = 0.25, x[0].numel()
    law = Isotropic(torch.full((1,), lower, device=device), d).as_full()
    noise = NoiseSource(0, NoiseSource.OPTIMIZE, device)
    print(
        f"\n4. anatomy of the RDDRS step: {name} preset ({settings.iterations} steps, {settings.samples} samples, "
        f"lr {settings.lr}, max_step {settings.max_step}), test image 0, from C = {lower} I (ms, median)"
    )
    parts = {k: [] for k in ("gradient", "exp", "exp_eigh", "matrix_exp", "floor", "floor_eigh")}
    below, stretch = [], []
    for _ in range(settings.iterations):
        eps = noise.draw([0], settings.samples, d, x.dtype)
        (_, grad), ms = _timed(lambda: objective_and_gradient(model, x, law, eps, settings.kappa), device)
        parts["gradient"].append(ms)
        moved, ms = _timed(lambda: law.step(settings.lr * grad, settings.max_step), device)
        parts["exp"].append(ms)
        w, v = law.eig  # the whitened step, as spd.exp forms it, and its spectral radius
        root = w.sqrt()
        white = spd.sym(v.mT @ (settings.lr * grad) @ v / (root[..., :, None] * root[..., None, :]))
        radius = torch.linalg.eigvalsh(white).abs().amax().item()
        stretch.append(radius / settings.max_step)
        parts["exp_eigh"].append(_timed(lambda: spd.eigh(white), device)[1])
        clamped = white * min(1.0, settings.max_step / radius)
        parts["matrix_exp"].append(_timed(lambda: torch.linalg.matrix_exp(clamped), device)[1])
        parts["floor_eigh"].append(_timed(lambda: spd.eigh(moved.param), device)[1])
        law, ms = _timed(lambda: moved.floor(lower), device)
        parts["floor"].append(ms)
        below.append(int((moved.eig[0] < lower).sum()))
    med = {k: float(torch.tensor(v).median()) for k, v in parts.items()}
    step = med["gradient"] + med["exp"] + med["floor"]
    images = (x.reshape(1, 1, d) + lower * eps).reshape(-1, *x.shape[1:]).requires_grad_(True)

    def network():
        torch.autograd.grad(torch.log_softmax(model(images), -1)[:, 0].sum(), images)

    net = best_time(network, device, 3) * 1e3
    bound = sum(n > 0 for n in below)
    print(
        f"   step {step:.0f} = gradient {med['gradient']:.0f} (network alone {net:.0f}) + exponential map "
        f"{med['exp']:.0f} (its eigh {med['exp_eigh']:.0f}) + floor {med['floor']:.0f} "
        f"(its eigh {med['floor_eigh']:.0f})"
    )
    print(
        f"   matrix_exp of the same clamped step: {med['matrix_exp']:.0f} (ratio to the exp's eigh "
        f"{med['matrix_exp'] / med['exp_eigh']:.2f})"
    )
    print(
        f"   floor binds in {bound}/{len(below)} steps ({min(below)}-{max(below)} eigenvalues below it); "
        f"step bound binds in {sum(r > 1 for r in stretch)}/{len(stretch)} (whitened spectral radius "
        f"{min(stretch):.0f}-{max(stretch):.0f} x max_step)"
    )
    print(
        f"   speed-up of the step if matrix_exp replaced the exp's eigh: "
        f"{step / (step - med['exp_eigh'] + med['matrix_exp']):.2f}; if the exponential map cost nothing: "
        f"{step / (step - med['exp']):.2f}"
    )


def _flops(model, x) -> tuple[float, float]:
    """Autograd's dense FLOPs per image: forward, and forward + input gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    images = x[:8].clone().requires_grad_(True)
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model(x[:8])
    with FlopCounterMode(display=False) as both:
        model(images).sum().backward()
    return forward.get_total_flops() / 8, both.get_total_flops() / 8


def network_speed(device, args):
    loaded = load_model(ROOT / "data/models/mnist_cnn_sigma0.25.pt", device)
    paths = {"autograd": getattr(loaded, "model", loaded), "fast": fastnet.fast(getattr(loaded, "model", loaded))}
    if fastnet.network_path(paths["fast"]) != fastnet.FAST:
        del paths["fast"]
    n = args.draws
    a = torch.randn(4096, 4096, device=device)
    peak = 2 * 4096**3 / best_time(lambda: a @ a, device, repeat=5) / 1e9
    image = load_dataset(ROOT / "data", train=False)[0][:1].to(device)
    x = image + 0.25 * torch.randn(n, 1, 28, 28, device=device)
    forward, both = _flops(paths["autograd"], x)
    print(
        f"\n5. the network, {n} draws of test image 0, {torch.get_num_threads()} thread(s): GEMM peak "
        f"{peak:.0f} GFLOP/s (the floor); autograd's work {forward / 1e6:.2f} MFLOP forward, {both / 1e6:.2f} "
        f"forward + input gradient, per image"
    )
    print("   path       forward GFLOP/s (of peak)   forward + input gradient GFLOP/s (of peak)")
    speeds = {}
    for name, model in paths.items():
        with torch.no_grad():
            fwd = n * forward / best_time(lambda: model(x), device, repeat=3) / 1e9

        def gradient():
            xx = x.clone().requires_grad_(True)
            torch.autograd.grad(torch.log_softmax(model(xx), -1)[:, 7].sum(), xx)

        grad = n * both / best_time(gradient, device, repeat=3) / 1e9
        speeds[name] = (fwd, grad)
        print(f"   {name:9s}  {fwd:7.1f} ({fwd / peak:4.0%})               {grad:7.1f} ({grad / peak:4.0%})")
    if "fast" in speeds:
        print(
            f"   fast / autograd: forward {speeds['fast'][0] / speeds['autograd'][0]:.2f}x, forward + input "
            f"gradient {speeds['fast'][1] / speeds['autograd'][1]:.2f}x"
        )
    settings = preset("paper").search["rddrs"]
    steps = {}
    for name, model in paths.items():
        law = Isotropic(torch.full((1,), 0.25, device=device), image[0].numel()).as_full()
        eps = NoiseSource(0, NoiseSource.OPTIMIZE, device).draw([0], settings.samples, image[0].numel(), image.dtype)

        def step():
            _, grad = objective_and_gradient(model, image, law, eps, settings.kappa)
            law.step(settings.lr * grad, settings.max_step).floor(0.25).eig

        steps[name] = best_time(step, device, repeat=3)
    print(
        f"   paper preset RDDRS step ({settings.samples} draws, one image): "
        + ", ".join(f"{name} {seconds * 1e3:.0f} ms" for name, seconds in steps.items())
        + (f"; fast / autograd {steps['autograd'] / steps['fast']:.2f}x" if "fast" in steps else "")
    )


def cli_startup(args):
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    commands = [
        ("python -c pass", ["-c", "pass"]),
        ("rddrs --help", ["-m", "rddrs", "--help"]),
        ("rddrs sweep --help", ["-m", "rddrs", "sweep", "--help"]),
        ('python -c "import torch"', ["-c", "import torch"]),
    ]
    print(f"\n6. command-line start-up (wall s of a whole process, best of {args.repeat})")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    floor = None
    for name, argv in commands:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, *argv], check=True, capture_output=True, env=env)
            times.append(time.perf_counter() - start)
        best = min(times)
        if floor is None:
            floor = best
            print(f"   {name:26s} {best:7.3f}  (the floor, ratio 1)")
        else:
            print(f"   {name:26s} {best:7.3f}  ratio {best / floor:.1f}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"   the processes: {_split(after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--samples",
        type=lambda t: [int(v) for v in t.split(",")],
        default=[500, 2000],
        help="gradient samples per input of section 2 (default 500,2000)",
    )
    parser.add_argument(
        "--inputs",
        type=lambda t: [int(v) for v in t.split(",")],
        default=[1, 8, 32],
        help="inputs searched at once in section 2 (default 1,8,32)",
    )
    parser.add_argument("--batch-size", type=int, default=2000, help="noisy images per forward pass")
    parser.add_argument("--cert-samples", type=int, default=20_000, help="certification samples per input")
    parser.add_argument("--sections", default="1,2,3,4,5,6", help="which sections to run (default 1,2,3,4,5,6)")
    parser.add_argument("--draws", type=int, default=20_000, help="noisy images of section 5 (default 20000)")
    parser.add_argument(
        "--anatomy-preset",
        default="cpu",
        help="the preset whose RDDRS search section 4 follows (default cpu; paper: 100 steps at 20 000 samples)",
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="processes per command of section 6, the best one counts (default 5)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = fastnet.fast(MnistCNN().to(device, memory_format=torch.channels_last).eval().requires_grad_(False))
    print(f"network path of sections 1-2: {fastnet.network_path(model)} (RDDRS_FAST_NETWORK=0: autograd)")
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"malloc tuning {allocator.status()}"
    )
    sections = {
        "1": lambda: throughput(model, device, args),
        "2": lambda: search_step(model, device, args),
        "3": lambda: whole_process(args),
        "4": lambda: step_anatomy(device, args.anatomy_preset),
        "5": lambda: network_speed(device, args),
        "6": lambda: cli_startup(args),
    }
    for key in args.sections.split(","):
        with cpu_split(f"section {key}"):
            sections[key]()


if __name__ == "__main__":
    main()
