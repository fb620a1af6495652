"""The base classifier and `load_model`: checkpoints and torch.export programs agree
(logits and input gradients), the probabilities wrapper, the committed models, and errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import raises_one_line
from torch import nn

from rddrs import RDDRSError
from rddrs.pipeline.data import load_dataset
from rddrs.pipeline.files import one_line
from rddrs.pipeline.models import ExportedModel, LogOutputs, MnistCNN, load_model
from rddrs.pipeline.train import save

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "data" / "models"
# committed models and the clean accuracy each must reach on the first 1000 test images
COMMITTED = {"0.12": 0.97, "0.25": 0.97, "0.50": 0.95}


def fresh_model(seed: int = 0) -> MnistCNN:
    torch.manual_seed(seed)
    return MnistCNN().eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A randomly initialised MnistCNN saved as X.pt, X.pt2 and X.json by `train.save`."""
    model = fresh_model(1)
    out = tmp_path_factory.mktemp("models") / "m.pt"
    save(model, {"arch": "MnistCNN", "arch_kwargs": {"num_classes": 10}, "settings": {"sigma": 0.25}}, out)
    return model, out


@pytest.fixture(scope="module")
def test_images():
    x, y = load_dataset(REPO / "data", train=False)
    return x[:1000], y[:1000]


def logits_and_input_gradient(model, x):
    """Logits and the gradient of a fixed scalar function of them with respect to x."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    weights = torch.linspace(-1, 1, out.shape[1])
    (grad,) = torch.autograd.grad((out.log_softmax(1) * weights).sum(), x)
    return out.detach(), grad


# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("n", [1, 2, 7])
def test_architecture_maps_images_to_ten_logits(n):
    assert MnistCNN()(torch.rand(n, 1, 28, 28)).shape == (n, 10)


def test_architecture_is_the_papers_small_cnn():
    model = MnistCNN()
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(16, 1, 5, 5), (16,), (32, 16, 5, 5), (32,), (10, 512), (10,)]
    assert sum(p.numel() for p in model.parameters()) == 18378


# --------------------------------------------------------------------------- load_model


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_loaded_model_is_frozen_in_eval_mode_and_matches_the_original(saved, suffix):
    original, out = saved
    model = load_model(out.with_suffix(suffix))
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 18378
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-6, rtol=1e-6)
    assert model.eval() is model  # callers may call eval() on any loaded model


@pytest.mark.parametrize("n", [1, 3, 17])
def test_checkpoint_and_program_agree_on_logits_and_input_gradients(saved, n):
    _, out = saved
    torch.manual_seed(n)
    x = torch.rand(n, 1, 28, 28)  # every batch size: the batch dimension is dynamic
    logits_pt, grad_pt = logits_and_input_gradient(load_model(out), x)
    logits_pt2, grad_pt2 = logits_and_input_gradient(load_model(out.with_suffix(".pt2")), x)
    assert logits_pt.shape == (n, 10)
    torch.testing.assert_close(logits_pt2, logits_pt, atol=1e-5, rtol=1e-5)
    assert grad_pt.abs().sum() > 0
    torch.testing.assert_close(grad_pt2, grad_pt, atol=1e-6, rtol=1e-4)


def test_saving_the_same_weights_twice_gives_the_same_bytes(saved, tmp_path):
    model, out = saved
    again = tmp_path / "again.pt"
    save(model, {"arch": "MnistCNN", "arch_kwargs": {"num_classes": 10}, "settings": {"sigma": 0.25}}, again)
    for suffix in (".pt", ".pt2"):
        assert again.with_suffix(suffix).read_bytes() == out.with_suffix(suffix).read_bytes()


def test_format_is_read_from_the_content_not_the_suffix(saved, tmp_path):
    original, out = saved
    swapped_program = tmp_path / "program.pt"
    swapped_program.write_bytes(out.with_suffix(".pt2").read_bytes())
    swapped_checkpoint = tmp_path / "checkpoint.pt2"
    swapped_checkpoint.write_bytes(out.read_bytes())
    x = torch.rand(2, 1, 28, 28)
    assert isinstance(load_model(swapped_program), ExportedModel)
    assert isinstance(load_model(swapped_checkpoint).model, MnistCNN)  # inside fastnet.FastCNN
    for path in (swapped_program, swapped_checkpoint):
        with torch.no_grad():
            torch.testing.assert_close(load_model(path)(x), original(x))


def test_bare_state_dict_takes_its_architecture_from_the_sidecar(tmp_path):
    original = fresh_model(2)
    path = tmp_path / "bare.pt"
    torch.save(original.state_dict(), path)
    with pytest.raises(RDDRSError, match="no sidecar"):
        load_model(path)
    path.with_suffix(".json").write_text(json.dumps({"arch": "MnistCNN"}))
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(x), original(x))


def test_probabilities_are_wrapped_into_log_probabilities(tmp_path):
    inner = fresh_model(3)
    probs = nn.Sequential(inner, nn.Softmax(dim=1)).eval()
    program = torch.export.export(probs, (torch.rand(2, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "probs.pt2"
    torch.export.save(program, path)
    model = load_model(path, probabilities=True)
    assert isinstance(model, LogOutputs) and not model.training
    x = torch.rand(6, 1, 28, 28, requires_grad=True)
    out = model(x)
    torch.testing.assert_close(out, inner(x).log_softmax(1), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.argmax(1), inner(x).argmax(1))
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # without the flag the probabilities come back as they are
    torch.testing.assert_close(load_model(path)(x), probs(x))


def test_zero_probabilities_give_finite_log_outputs():
    model = LogOutputs(nn.Identity())
    p = torch.tensor([[1.0, 0.0], [0.25, 0.75]], requires_grad=True)
    out = model(p)
    assert torch.isfinite(out).all() and out[0, 1] < -80
    assert torch.equal(out.argmax(1), torch.tensor([0, 1]))
    out.sum().backward()
    assert torch.isfinite(p.grad).all()


def test_program_refuses_training_mode(saved):
    _, out = saved
    model = load_model(out.with_suffix(".pt2"))
    with pytest.raises(RDDRSError, match="eval mode"):
        model.train()


# --------------------------------------------------------------------------- errors


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def torch_saved(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


class NotATensor:
    pass


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing.pt", "no such file"),
        (lambda d: d, "is a directory, not a regular file"),
        (lambda d: write_bytes(d / "empty.pt", b""), "cannot read"),
        (lambda d: write_bytes(d / "text.pt", b"not a model\n" * 10), "cannot read"),
        (lambda d: torch_saved(d / "list.pt", [1, 2, 3]), "not a checkpoint"),
        (
            lambda d: torch_saved(d / "object.pt", {"state_dict": {}, "x": NotATensor()}),
            "is a pickled .*NotATensor, not a checkpoint",
        ),  # weights_only refuses arbitrary objects
        (
            lambda d: torch_saved(d / "arch.pt", {"state_dict": MnistCNN().state_dict(), "arch": "ResNet50"}),
            "unknown architecture",
        ),
        (
            lambda d: torch_saved(d / "shape.pt", {"state_dict": nn.Linear(3, 2).state_dict(), "arch": "MnistCNN"}),
            "do not fit",
        ),
    ],
)
def test_bad_files_raise_one_line_errors(make, match, tmp_path):
    path = make(tmp_path)
    with pytest.raises(RDDRSError, match=match) as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_a_pickled_model_gets_a_short_clean_line(tmp_path):
    """torch.load's refusal of a pickled module runs to 1200 characters with terminal codes."""
    msg = raises_one_line(load_model, torch_saved(tmp_path / "whole.pt", MnistCNN()))
    assert "whole.pt is a pickled rddrs.pipeline.models.MnistCNN, not a checkpoint" in msg
    assert len(msg) < 300 and msg.isprintable()


def test_one_line_drops_terminal_codes_and_clips():
    err = RuntimeError("\x1b[1mdo this\x1b[0m only\n\tif you\x07 trust it " + "x" * 500)
    text = one_line(err, 100)
    assert text.startswith("RuntimeError: do this only if you trust it xx") and text.endswith("...")
    assert len(text) == len("RuntimeError: ") + 100 and text.isprintable()
    assert one_line(err) == "RuntimeError: do this only if you trust it " + "x" * 500


def test_damaged_program_raises(saved, tmp_path):
    _, out = saved
    damaged = tmp_path / "damaged.pt2"
    with zipfile.ZipFile(out.with_suffix(".pt2")) as src, zipfile.ZipFile(damaged, "w") as dst:
        for name in src.namelist():
            if not name.endswith("models/model.json"):  # drop the graph
                dst.writestr(name, src.read(name))
    with pytest.raises(RDDRSError, match="torch.export program") as err:
        load_model(damaged)
    assert "\n" not in str(err.value)


def test_truncated_file_raises(saved, tmp_path):
    _, out = saved
    for suffix in (".pt", ".pt2"):
        truncated = write_bytes(tmp_path / f"truncated{suffix}", out.with_suffix(suffix).read_bytes()[:5000])
        with pytest.raises(RDDRSError):
            load_model(truncated)


def test_bad_sidecar_raises(tmp_path):
    path = torch_saved(tmp_path / "bare.pt", MnistCNN().state_dict())
    for text in ("{not json", json.dumps({"sigma": 0.25}), json.dumps({"arch": "Nope"})):
        path.with_suffix(".json").write_text(text)
        with pytest.raises(RDDRSError, match="sidecar|unknown architecture"):
            load_model(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_but_unavailable(saved):
    with pytest.raises(RDDRSError, match="CUDA is not available"):
        load_model(saved[1], device="cuda")


# --------------------------------------------------------------------------- committed models


@pytest.mark.parametrize("sigma", COMMITTED)
def test_committed_checkpoint_and_program_agree(sigma, test_images):
    pt = MODELS / f"mnist_cnn_sigma{sigma}.pt"
    x = test_images[0][:64]
    logits_pt, grad_pt = logits_and_input_gradient(load_model(pt), x)
    logits_pt2, grad_pt2 = logits_and_input_gradient(load_model(pt.with_suffix(".pt2")), x)
    torch.testing.assert_close(logits_pt2, logits_pt, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_pt2, grad_pt, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sigma", COMMITTED)
def test_committed_model_is_accurate_and_described_by_its_sidecar(sigma, test_images):
    pt = MODELS / f"mnist_cnn_sigma{sigma}.pt"
    meta = json.loads(pt.with_suffix(".json").read_text())
    assert meta["arch"] == "MnistCNN" and meta["settings"]["sigma"] == float(sigma)
    assert meta["settings"]["max_batches"] is None
    for path in (pt, pt.with_suffix(".pt2")):
        assert meta["files"][path.name]["bytes"] == path.stat().st_size
    x, y = test_images
    with torch.no_grad():
        acc = (load_model(pt)(x).argmax(1) == y).float().mean().item()
    assert acc >= COMMITTED[sigma]
    assert meta["clean_test_accuracy"] >= COMMITTED[sigma]
    assert meta["noisy_test_accuracy"] >= COMMITTED[sigma] - 0.03
