"""The fast network (rddrs.pipeline.fastnet) against autograd, the ground truth: the same logits bit
for bit, the same input gradients within float32 rounding (ties in the max pool included), the
fallbacks, and the switch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rddrs import RDDRSError
from rddrs.pipeline import fastnet
from rddrs.pipeline.data import load_dataset
from rddrs.pipeline.models import MnistCNN, load_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "models" / "mnist_cnn_sigma0.25.pt"
#: normwise relative difference allowed between the two paths' input gradients: float32 rounding
#: of sums taken in another order (measured about 2e-7)
GRAD_RTOL = 1e-5


def plain(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MnistCNN().to(memory_format=torch.channels_last).eval().requires_grad_(False)


def both(model: nn.Module, x: torch.Tensor, weights: torch.Tensor | None = None):
    """(logits, input gradient of sum(weights * logits)) of ``model`` and of its fast twin."""
    fast = fastnet.FastCNN(model, fastnet.extension())
    out = []
    for m in (model, fast):
        xx = x.clone().requires_grad_(True)
        logits = m(xx)
        w = torch.ones_like(logits) if weights is None else weights
        (grad,) = torch.autograd.grad((w * logits).sum(), xx)
        out.append((logits.detach(), grad))
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module", autouse=True)
def built():
    if fastnet.extension() is None:
        pytest.fail("the fast network's kernels did not build on this machine (a C++ compiler and ninja are needed)")


@pytest.mark.parametrize("batch", [1, 2, 7, 256, 2000])
def test_logits_equal_and_gradients_agree_on_random_inputs(batch):
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch)) * 1.4 - 0.2
    weights = torch.randn(batch, 10, generator=torch.Generator().manual_seed(1))
    (logits, grad), (fast_logits, fast_grad) = both(plain(), x, weights)
    assert torch.equal(fast_logits, logits)
    assert relative(fast_grad, grad) < GRAD_RTOL
    assert grad.abs().sum() > 0  # the comparison is not between zeros


def test_twenty_thousand_draws_of_a_real_image_with_the_trained_model():
    """The paper preset's batch: 20 000 noisy copies of a test image, the trained classifier, the
    gradient of the log-probability of its class (what the searches take)."""
    image = load_dataset(ROOT / "data", train=False)[0][:1]
    x = image + 0.25 * torch.randn(20_000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = load_model(MODEL)
    assert isinstance(model, fastnet.FastCNN)
    reference = model.model
    outs = []
    for m in (reference, model):
        xx = x.clone().requires_grad_(True)
        logits = m(xx)
        (grad,) = torch.autograd.grad(torch.log_softmax(logits, -1)[:, 7].sum(), xx)
        outs.append((logits.detach(), grad))
    assert torch.equal(outs[1][0], outs[0][0])
    assert relative(outs[1][1], outs[0][1]) < GRAD_RTOL


@pytest.mark.parametrize("image", ["constant", "zero", "blocks", "binary"])
def test_ties_in_the_max_pool_take_the_first_maximum_as_autograd_does(image):
    """Images whose convolution outputs tie inside pooling windows: the gradient must land where
    autograd puts it (the first maximum), element by element."""
    g = torch.Generator().manual_seed(3)
    x = {
        "constant": torch.full((4, 1, 28, 28), 0.5),
        "zero": torch.zeros(4, 1, 28, 28),
        "blocks": torch.rand(4, 1, 7, 7, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3),
        "binary": (torch.rand(4, 1, 28, 28, generator=g) > 0.5).float(),
    }[image]
    weights = torch.randn(4, 10, generator=g)
    (logits, grad), (fast_logits, fast_grad) = both(plain(1), x, weights)
    assert torch.equal(fast_logits, logits)
    torch.testing.assert_close(fast_grad, grad, rtol=1e-5, atol=1e-6)


def test_a_nan_input_gives_nan_logits_on_both_paths():
    x = torch.rand(3, 1, 28, 28)
    x[1, 0, 5, 5] = float("nan")
    (logits, _), (fast_logits, _) = both(plain(), x)
    assert torch.isnan(fast_logits[1]).all() == torch.isnan(logits[1]).all()
    assert torch.isnan(fast_logits[1]).any() and torch.isfinite(fast_logits[[0, 2]]).all()
    assert torch.equal(fast_logits[[0, 2]], logits[[0, 2]])


def test_what_the_kernels_do_not_take_goes_through_the_model():
    model = plain()
    fast = fastnet.FastCNN(model, fastnet.extension())
    x64 = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    double = fastnet.FastCNN(plain().double(), fastnet.extension())
    with torch.no_grad():
        torch.testing.assert_close(double(x64), double.model(x64), rtol=0, atol=0)  # float64: autograd's
    trained = plain().requires_grad_(True)  # weights that take gradients (training): autograd
    wrapped = fastnet.FastCNN(trained, fastnet.extension())
    wrapped(torch.rand(2, 1, 28, 28)).sum().backward()
    assert trained.features[0].weight.grad is not None
    with pytest.raises(RuntimeError):  # a wrong shape fails as the model itself fails
        fast(torch.rand(2, 1, 20, 20))


def test_only_the_family_is_recognised():
    assert fastnet.recognise(plain()) is not None
    padded = plain()
    padded.features[0].padding = (1, 1)
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    avg = plain()
    avg.features[2] = nn.AvgPool2d(2)
    for model in (padded, other, avg):
        assert fastnet.recognise(model) is None
        assert fastnet.fast(model) is model
    assert fastnet.network_path(other) == fastnet.AUTOGRAD
    program = load_model(MODEL.with_suffix(".pt2"))  # a torch.export program keeps the autograd path
    assert fastnet.network_path(program) == fastnet.AUTOGRAD


def test_the_switch(monkeypatch):
    monkeypatch.setenv(fastnet.SWITCH, "0")
    assert fastnet.network_path(load_model(MODEL)) == fastnet.AUTOGRAD
    monkeypatch.setenv(fastnet.SWITCH, "1")
    assert fastnet.network_path(load_model(MODEL, probabilities=True)) == fastnet.FAST  # through LogOutputs
    monkeypatch.setenv(fastnet.SWITCH, "maybe")
    with pytest.raises(RDDRSError, match="RDDRS_FAST_NETWORK='maybe' is not a switch"):
        load_model(MODEL)


def test_an_unknown_switch_is_one_line_from_the_command_line(tmp_path):
    out = tmp_path / "rs.tsv"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rddrs",
            "certify",
            "--method",
            "rs",
            "--sigma",
            "0.25",
            "--model",
            str(MODEL),
            "--preset",
            "smoke",
            "--count",
            "1",
            "--data",
            str(ROOT / "data"),
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, fastnet.SWITCH: "yes"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "rddrs certify: error: RDDRS_FAST_NETWORK='yes' is not a switch: set it to 1 (the fast network) or 0 (autograd)"
    ]
    assert not out.exists()


def test_the_command_line_option_turns_it_off(tmp_path):
    from rddrs.cli import main
    from rddrs.pipeline.results import read_sidecar

    out = tmp_path / "rs.tsv"
    try:
        assert (
            main(
                [
                    "--autograd-network",
                    "certify",
                    "--method",
                    "rs",
                    "--sigma",
                    "0.25",
                    "--model",
                    str(MODEL),
                    "--preset",
                    "smoke",
                    "--count",
                    "1",
                    "--data",
                    str(ROOT / "data"),
                    "--out",
                    str(out),
                    "--quiet",
                ]
            )
            == 0
        )
    finally:
        os.environ.pop(fastnet.SWITCH, None)
    assert read_sidecar(out)["provenance"]["network"] == fastnet.AUTOGRAD


def test_a_machine_that_cannot_build_falls_back_with_one_line(tmp_path):
    """No working compiler (CXX=false) and an empty extension cache: one line, once, and the
    autograd path gives the same logits."""
    script = (
        "import torch\nfrom rddrs.pipeline import fastnet\nfrom rddrs.pipeline.models import load_model\n"
        f"m = load_model({str(MODEL)!r}); load_model({str(MODEL)!r})\n"
        "print(fastnet.network_path(m), m(torch.zeros(1, 1, 28, 28)).shape[1])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CXX": "false", "TORCH_EXTENSIONS_DIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [fastnet.AUTOGRAD, "10"]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rddrs: the fast network could not be built (")
    assert lines[0].endswith("; using autograd")


def test_a_program_runs_in_the_fast_memory_format_with_the_checkpoints_logits():
    program, checkpoint = load_model(MODEL.with_suffix(".pt2")), load_model(MODEL)
    weight = dict(program.named_parameters())["program.features.3.weight"]  # conv2: 16 input channels
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(program(x), checkpoint(x))
