"""Training with Gaussian augmentation: the three output files, the sidecar, learning,
reproducibility, the augmentation itself, and argument errors.

The smoke run reads the real MNIST under `data/` (which `make test` fetches) and trains
for 3 batches; the other training tests use small slices of it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch

from rddrs import RDDRSError
from rddrs.pipeline import models, train
from rddrs.pipeline.data import load_dataset
from rddrs.pipeline.models import load_model
from rddrs.pipeline.results import model_path

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def mnist_train():
    return load_dataset(DATA, train=True)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One real `run`: 1 epoch of 3 batches of 32 into a temporary directory."""
    out = tmp_path_factory.mktemp("train") / "smoke.pt"
    train.run(
        parse(
            "--sigma",
            "0.25",
            "--epochs",
            "1",
            "--max-batches",
            "3",
            "--batch-size",
            "32",
            "--seed",
            "5",
            "--data",
            str(DATA),
            "--out",
            str(out),
            "--threads",
            "1",
        )
    )
    return out


# --------------------------------------------------------------------------- the smoke run


def test_run_writes_checkpoint_program_and_sidecar_only(smoke):
    assert sorted(p.name for p in smoke.parent.iterdir()) == [
        "smoke.json",
        "smoke.pt",
        "smoke.pt2",
    ]  # and no temporary files left behind


def test_sidecar_holds_settings_log_accuracies_and_provenance(smoke):
    meta = json.loads(smoke.with_suffix(".json").read_text())
    for key in (
        "dataset",
        "arch",
        "settings",
        "seed",
        "epochs",
        "log",
        "clean_test_accuracy",
        "noisy_test_accuracy",
        "versions",
        "git_commit",
        "device",
        "train_seconds",
        "files",
    ):
        assert key in meta, key
    assert meta["arch"] == "MnistCNN" and meta["dataset"] == "mnist"
    settings = meta["settings"]
    assert settings["sigma"] == 0.25 and settings["batch_size"] == 32
    assert settings["max_batches"] == 3 and settings["optimizer"] == "adam"
    assert meta["seed"] == 5 and meta["epochs"] == 1
    [entry] = meta["log"]
    assert entry["epoch"] == 1 and entry["batches"] == 3
    assert 0.5 < entry["loss"] < 5  # near log(10) = 2.30 after 3 steps from random init
    assert 0 <= entry["accuracy"] <= 1
    for key in ("clean_test_accuracy", "noisy_test_accuracy"):
        assert 0 <= meta[key] <= 1
    assert meta["test_images"] == 10000 and meta["train_images"] == 60000
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["git_commit"] is None or (len(meta["git_commit"]) == 40 and int(meta["git_commit"], 16) >= 0)
    assert meta["device"].startswith("cpu") and meta["threads"] == 1
    assert 0 < meta["train_seconds"] < 120
    for name in ("smoke.pt", "smoke.pt2"):
        blob = (smoke.parent / name).read_bytes()
        assert meta["files"][name] == {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def test_checkpoint_loads_with_weights_only_and_names_its_architecture(smoke):
    ckpt = torch.load(smoke, weights_only=True)
    assert ckpt["arch"] == "MnistCNN" and ckpt["settings"]["sigma"] == 0.25
    model = models.ARCHITECTURES[ckpt["arch"]](**ckpt["arch_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_sidecar_accuracies_are_those_of_the_saved_model(smoke):
    meta = json.loads(smoke.with_suffix(".json").read_text())
    test_x, test_y = load_dataset(DATA, train=False)
    model = load_model(smoke)
    assert train.accuracy(model, test_x, test_y) == meta["clean_test_accuracy"]
    assert train.accuracy(model, test_x, test_y, sigma=0.25, seed=5) == meta["noisy_test_accuracy"]


# --------------------------------------------------------------------------- learning


def test_loss_decreases_over_a_few_dozen_batches(mnist_train):
    x, y = mnist_train
    _, log = train.train_model(x[:512], y[:512], sigma=0.25, epochs=4, batch_size=32, lr=2e-3, seed=0)
    losses = [entry["loss"] for entry in log]
    assert [entry["batches"] for entry in log] == [16] * 4
    assert losses[-1] < 0.6 * losses[0], losses
    assert log[-1]["accuracy"] > log[0]["accuracy"]


def test_same_seed_gives_identical_weights_other_seed_does_not(mnist_train):
    x, y = mnist_train
    kwargs = dict(sigma=0.5, epochs=1, batch_size=32, lr=1e-3)
    a, log_a = train.train_model(x[:256], y[:256], seed=11, **kwargs)
    b, log_b = train.train_model(x[:256], y[:256], seed=11, **kwargs)
    c, _ = train.train_model(x[:256], y[:256], seed=12, **kwargs)
    for (name, wa), wb, wc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(wa, wb), name
        assert not torch.equal(wa, wc), name
    assert [e["loss"] for e in log_a] == [e["loss"] for e in log_b]


def test_global_rng_is_left_alone(mnist_train):
    x, y = mnist_train
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train.train_model(x[:64], y[:64], sigma=0.1, epochs=1, batch_size=32, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_every_batch_gets_fresh_unclamped_gaussian_noise(mnist_train, monkeypatch):
    """The network sees x + sigma * eps: residuals of std sigma, mean 0, values outside
    [0, 1], and a new draw each time an image comes back."""
    seen = []

    class Spy(models.MnistCNN):
        def forward(self, inputs):
            seen.append(inputs.detach().clone())
            return super().forward(inputs)

    monkeypatch.setattr(models, "MnistCNN", Spy)
    x, y = mnist_train
    x = x[:64]
    sigma = 0.3
    train.train_model(x, y[:64], sigma=sigma, epochs=2, batch_size=64, seed=0)
    assert len(seen) == 2
    first, second = seen
    # the batch is a permutation of the 64 images: match rows by nearest clean image
    for batch in seen:
        dist = torch.cdist(batch.flatten(1), x.flatten(1))
        residual = batch - x[dist.argmin(1)]
        assert sorted(dist.argmin(1).tolist()) == list(range(64))
        assert abs(residual.std().item() - sigma) < 0.01
        assert abs(residual.mean().item()) < 0.01
        assert batch.min() < -0.5 and batch.max() > 1.5  # no clamping
    first_order = torch.cdist(first.flatten(1), x.flatten(1)).argmin(1)
    second_order = torch.cdist(second.flatten(1), x.flatten(1)).argmin(1)
    noise_1 = first - x[first_order]
    noise_2 = second[second_order.argsort()][first_order] - x[first_order]
    assert not torch.allclose(noise_1, noise_2)  # fresh noise in the second epoch


def test_accuracy_counts_and_noise_is_seeded():
    class FirstPixelSign(torch.nn.Module):  # class 1 iff the first pixel > 0.5
        def forward(self, z):
            return torch.stack([0.5 - z[:, 0, 0, 0], z[:, 0, 0, 0] - 0.5], 1)

    images = torch.zeros(2500, 1, 28, 28)
    images[:1000, 0, 0, 0] = 1.0
    labels = (images[:, 0, 0, 0] > 0.5).long()
    labels[:100] = 0
    assert train.accuracy(FirstPixelSign(), images, labels) == 2400 / 2500
    a = train.accuracy(FirstPixelSign(), images, labels, sigma=0.4, seed=1)
    assert a == train.accuracy(FirstPixelSign(), images, labels, sigma=0.4, seed=1)
    # noise at 0.4 flips a pixel across 0.5 with probability Phi(-1.25) = 0.106
    expected = (2400 * (1 - 0.1056) + 100 * 0.1056) / 2500
    assert abs(a - expected) < 0.02


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--sigma", "0"], "--sigma"),
        (["--sigma", "-0.25"], "--sigma"),
        (["--sigma", "nan"], "--sigma"),
        (["--sigma", "0.25", "--epochs", "0"], "--epochs"),
        (["--sigma", "0.25", "--batch-size", "-1"], "--batch-size"),
        (["--sigma", "0.25", "--lr", "0"], "--lr"),
        (["--sigma", "0.25", "--max-batches", "0"], "--max-batches"),
        (["--sigma", "0.25", "--threads", "0"], "--threads"),
        (["--sigma", "0.25", "--out", "model.pth"], r"\.pt"),
        (["--sigma", "0.25", "--device", "tpu"], "device"),
        (["--sigma", "0.25", "--device", "not a device"], "device"),
    ],
)
def test_bad_arguments_raise_one_line_errors(argv, match, tmp_path):
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "m.pt")]
    with pytest.raises(RDDRSError, match=match) as err:
        train.run(parse(*argv, "--data", str(DATA)))
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_but_unavailable(tmp_path):
    with pytest.raises(RDDRSError, match="CUDA is not available"):
        train.run(parse("--sigma", "0.25", "--device", "cuda", "--data", str(DATA), "--out", str(tmp_path / "m.pt")))


def test_missing_data_directory(tmp_path):
    with pytest.raises(RDDRSError, match="does not exist"):
        train.run(parse("--sigma", "0.25", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.pt")))


def test_data_directory_without_mnist(tmp_path):
    with pytest.raises(RDDRSError, match="MNIST not found"):
        train.run(parse("--sigma", "0.25", "--data", str(tmp_path), "--out", str(tmp_path / "m.pt")))


def test_sigma_is_required():
    with pytest.raises(SystemExit):
        parse("--epochs", "1")


def test_cli_reports_one_line_and_exits_2(capsys):
    from rddrs.cli import main

    assert main(["train", "--sigma", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sigma must lie in [1e-06, 1000], got -1.0" in err


def test_model_path_names_dataset_and_sigma_with_two_decimals():
    assert model_path(0.5) == Path("data/models/mnist_cnn_sigma0.50.pt")
    assert model_path(0.12, "elsewhere") == Path("elsewhere/mnist_cnn_sigma0.12.pt")
    assert model_path(0.25, dataset="fashion-mnist") == Path("data/models/fashion-mnist_cnn_sigma0.25.pt")


def test_the_default_output_is_model_path(monkeypatch):
    """`rddrs train` writes where the runs look for the model: one function names it."""
    saved = []
    monkeypatch.setattr(train, "train_model", lambda *args, **kwargs: (torch.nn.Identity(), []))
    monkeypatch.setattr(train, "accuracy", lambda *args, **kwargs: 0.5)
    monkeypatch.setattr(train, "save", lambda model, meta, out: saved.append((meta, out)))
    train.run(parse("--sigma", "0.5", "--data", str(DATA)))
    [(meta, out)] = saved
    assert out == model_path(0.5) and meta["dataset"] == "mnist"
