"""The names a reader sees (rddrs.studies.labels): every part of a variant's settings in words,
never a placeholder for a setting the variant leaves to its preset."""

from __future__ import annotations

import pytest

from rddrs.studies.labels import label
from rddrs.studies.study import Study, Variant


@pytest.mark.parametrize(
    "search, words",
    [
        ({"iterations": 30, "samples": 250}, "RDDRS, 30 steps × 250 draws"),
        ({"samples": 250}, "RDDRS, 250 draws per step"),
        ({"iterations": 30}, "RDDRS, 30 steps"),
        ({"samples": 250, "antithetic": True, "repeat": 1}, "RDDRS, 250 draws per step, antithetic pairs, replicate 2"),
    ],
)
def test_budget_in_words(search, words):
    assert label(Variant("v", "rddrs", search)) == words


def test_a_start_is_named_with_its_method():
    study = Study(
        "s",
        2,
        (Variant("a", "ancer", {"objective": "capped"}), Variant("r", "rddrs", {"objective": "soft"}, start="a")),
    )
    assert label(study.variant("r"), study) == "RDDRS, soft, from ANCER (capped)"
