"""The certification core on a GPU: every method's certificate of a linear classifier stays inside
its exact region, batching does not change a run's rows, and both model formats load and agree
with the CPU. Skipped without CUDA; `make gpu-session` runs them on a bare GPU machine (a Python
with torch, numpy, scipy and pytest: no nbval, no install)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from rddrs.core.certify import ABSTAIN, certify
from rddrs.core.optimize import find_smoothing
from rddrs.core.presets import PRESETS
from rddrs.studies.validity import LinearClassifier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

ROOT = Path(__file__).resolve().parents[1]
DATA, MODELS = ROOT / "data", ROOT / "data" / "models"
CUDA = torch.device("cuda")


@pytest.mark.parametrize("method", ["rs", "ddrs", "ancer", "rddrs"])
def test_every_method_certifies_a_linear_classifier_within_its_exact_region_on_cuda(method):
    """Under any fixed law the smoothed linear classifier answers sign(w.x + b), so the exact
    certified l2 radius is |w.x + b| / ||w|| and a certificate's ellipsoid must keep
    |w.x + b| >= gap ||S w||; each certificate may be wrong with probability alpha at most."""
    d, batch, n0, n, alpha = 784, 24, 100, 10_000, 1e-3
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(d, generator=gen, dtype=torch.float64) / d**0.5
    model = LinearClassifier(w.float(), 0.1).to(CUDA)
    x = (0.5 + 0.3 * torch.randn(batch, d, generator=gen)).to(CUDA)
    searches = {k: s for k, s in PRESETS["smoke"].search.items()}
    law, _ = find_smoothing(method, model, x, list(range(batch)), 0.25, seed=0, settings=searches)
    assert law.param.device.type == "cuda"
    cert = certify(model, x, law, list(range(batch)), n0, n, alpha, seed=0)
    score = model.score(x).double().cpu().numpy()
    reach = model.scaled_normal(law).norm(dim=1).double().cpu().numpy()
    ok = cert.predict != ABSTAIN
    assert ok.sum() >= batch // 2
    right = ok & (cert.predict == (score > 0))
    wrong_side = ok & ~right
    too_far = right & (cert.gap * reach > np.abs(score) * (1 + 1e-5))
    # every certificate holds with probability >= 1 - alpha: more than 1 failure in 24 has p < 3e-4
    assert wrong_side.sum() + too_far.sum() <= stats.binom.isf(1e-4, batch, alpha)
    exact_l2 = np.abs(score) / float(w.norm())
    assert (cert.radius[right & ~too_far] <= exact_l2[right & ~too_far] * (1 + 1e-5)).all()


@pytest.fixture(scope="module")
def mnist():
    from rddrs.pipeline.data import load_dataset

    return load_dataset(DATA, train=False)


@pytest.mark.parametrize("method", ["rs", "ddrs", "ancer", "rddrs"])
def test_batching_does_not_change_a_runs_rows_on_cuda(mnist, tmp_path, method):
    from rddrs.pipeline.models import load_model
    from rddrs.pipeline.results import read_rows
    from rddrs.pipeline.runs import run_certification
    from rddrs.pipeline.settings import make_settings

    images, labels = mnist
    settings = make_settings(method, 0.25, MODELS / "mnist_cnn_sigma0.25.pt", "smoke", device="cuda")
    model = load_model(settings.model, device=CUDA)
    rows = {}
    for batch in (1, 4):
        out = tmp_path / f"{batch}.tsv"
        run_certification(settings, model, images[:4], labels[:4], 0, out, inputs_per_batch=batch, progress=False)
        rows[batch] = read_rows(out)
    for i in range(4):
        one, four = rows[1][i], rows[4][i]
        assert (one["predict"], one["search"]) == (four["predict"], four["search"])
        for key in ("gap", "radius", "proxy_radius", "sigma_min", "sigma_max"):
            assert one[key] == pytest.approx(four[key], rel=1e-3, abs=1e-6), (i, key)


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_both_model_formats_load_on_cuda_and_agree_with_the_cpu(mnist, suffix):
    from rddrs.pipeline.models import load_model

    images = mnist[0][:16]
    path = MODELS / f"mnist_cnn_sigma0.25{suffix}"
    on_gpu = load_model(path, device=CUDA)(images.to(CUDA)).cpu()
    on_cpu = load_model(path)(images)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)
    assert (on_gpu.argmax(1) == on_cpu.argmax(1)).all()
