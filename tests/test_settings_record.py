"""One record of a run's settings (``settings.RunRequest``): the command line's options, the run
specifications, the sidecar's settings and the study specs are all made from it, so a new setting
is one field there."""

from dataclasses import fields
from pathlib import Path

import pytest

from rddrs.cli import build_parser
from rddrs.core.presets import SEARCH_OPTIONS, Search
from rddrs.pipeline.runspec import _RUN_FIELDS, RunSpec
from rddrs.pipeline.settings import RunRequest, RunSettings, make_settings, request_fields
from rddrs.studies.study import Study, Variant, study_specs

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "models" / "mnist_cnn_sigma0.25.pt"
REQUEST = {f.name for f in fields(RunRequest)}


def _certify_options() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest for a in sub.choices["certify"]._actions}


def test_every_setting_is_an_option_of_certify_and_a_field_of_the_run_specs():
    options = _certify_options()
    assert REQUEST - {"search"} <= options
    assert set(SEARCH_OPTIONS) <= options and set(SEARCH_OPTIONS) <= {f.name for f in fields(Search)}
    assert REQUEST <= {f.name for f in fields(RunSpec)} and REQUEST <= {f.name for f in fields(RunSettings)}
    assert REQUEST | {"kind", "source"} == set(_RUN_FIELDS)


def test_the_sidecar_records_every_setting_resolved():
    settings = make_settings("rddrs", 0.25, MODEL, "smoke", seed=3, rotate=7, search={"lr": 0.5})
    recorded = settings.comparable()
    # every setting but where the model and the device are (a run may move) and the model's hash
    assert set(recorded) == (REQUEST | {"model_sha256"}) - {"model", "device", "dataset"}
    assert recorded["seed"] == 3 and recorded["rotate"] == 7 and recorded["n"] == 200
    assert recorded["search"]["rddrs"]["lr"] == 0.5 and recorded["search"]["ddrs"]["lr"] == 1e-3
    assert isinstance(settings, RunRequest) and request_fields(settings)["preset"] == "smoke"


def test_a_spec_and_a_study_variant_resolve_to_the_settings_the_same_request_gives(tmp_path):
    request = RunRequest(method="ancer", sigma=0.25, model=str(MODEL), preset="smoke", search={"kappa": 1.0})
    spec = RunSpec.of(request, tmp_path / "a.tsv", ranges=((0, 2),))
    assert spec.request() == request
    assert spec.settings() == make_settings("ancer", 0.25, MODEL, "smoke", search={"kappa": 1.0})
    study = Study("s", 2, (Variant("k1", "ancer", {"kappa": 1.0}),))
    specs = study_specs(study, 0.25, "smoke", tmp_path, models=MODEL.parent)
    assert specs["k1"].request().search == {"kappa": 1.0}
    assert specs["k1"].settings().comparable()["search"]["ancer"]["kappa"] == 1.0


def test_a_request_without_a_model_or_with_a_bad_setting_is_one_line():
    from rddrs import RDDRSError
    from rddrs.pipeline.settings import resolve

    with pytest.raises(RDDRSError, match="needs a model"):
        resolve(RunRequest(method="rs", sigma=0.25))
    with pytest.raises(RDDRSError, match="alpha must lie in"):
        resolve(RunRequest(method="rs", sigma=0.25, model=str(MODEL), alpha=2.0))
