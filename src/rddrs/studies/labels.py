"""The names a reader sees: every study variant, objective and step rule in words.

Variants have short internal names (``rddrs_capped_adam_from_ancer_capped_adam``) that name their
files; the book never shows them. ``label`` says what a variant is from its settings, with the
words of ``WORDS``; the authors' pipeline has names of its own (``PIPELINE``).
"""

from __future__ import annotations

from rddrs.core.methods import method as method_record

#: the vocabulary of the labels
WORDS = {
    "soft": "soft",
    "clamped": "clamped",
    "capped": "capped",
    "sgd": "plain ascent",
    "adam": "Adam",
    "riemannian adam": "Riemannian Adam",
}

#: the authors' pipeline and its parts, by variant name
PIPELINE = {
    "ddrs_clamped": "DDRS, the authors' (clamped)",
    "ancer_clamped": "ANCER, the authors' (clamped, from their DDRS)",
    "ancer_clamped_lr0.4": "ANCER, the authors' at the paper's other step size 0.4",
    "ancer_clamped_lr1": "ANCER, the authors' at their script's step size 1",
    "rddrs_clamped": "RDDRS, the authors' (clamped, unbounded steps, from their DDRS)",
    "rddrs_clamped_bounded": "RDDRS, the authors' clamp with our step bound",
    "rddrs_soft_unbounded": "RDDRS, unbounded steps without the clamp",
    "ancer_equal_budget": "ANCER with RDDRS' steps and draws",
}


def _number(value: float) -> str:
    return f"{value:g}"


def label(variant, study=None, brief: bool = False) -> str:
    """What ``variant`` (a ``study.Variant`` of the ``study.Study`` ``study``) is, in words: its
    method, then what differs from the preset's search (objective, step rule and size, bound,
    budget, kappa, floor, draws, rotation, restriction),
    then where its search starts (another variant of ``study``). ``brief``: without step sizes
    and bounds."""
    if variant.name in PIPELINE:
        return PIPELINE[variant.name]
    record = method_record(variant.method)
    parts = _parts(variant, brief)
    text = record.label + (f", {', '.join(parts)}" if parts else "")
    if variant.start is not None and study is not None:
        start = study.variant(variant.start)
        if start.method != "ddrs":
            inner = _parts(start, brief)
            text += f", from {method_record(start.method).label}" + (f" ({', '.join(inner)})" if inner else "")
    return text


def _curved(family: str) -> bool:
    """Whether the family's search geometry is curved (its Adam is Riemannian Adam)."""
    from rddrs.core.noise import family_class  # torch, only when a label asks

    return family_class(family).geometry != "euclidean"


def _parts(variant, brief: bool) -> list[str]:
    record = method_record(variant.method)
    s = variant.search
    parts = []
    if "objective" in s:
        parts.append(WORDS[s["objective"]])
    if "step" in s:
        rule = "riemannian adam" if s["step"] == "adam" and _curved(record.family) else s["step"]
        parts.append(WORDS[rule])
    if "lr" in s and not brief:
        parts.append(f"step {_number(s['lr'])}")
    if "max_step" in s and not brief:
        parts.append("unbounded" if not s["max_step"] else f"bound {_number(s['max_step'])}")
    if "iterations" in s and "samples" in s:
        parts.append(f"{s['iterations']} steps × {s['samples']} draws")
    elif "iterations" in s:  # the preset's draws per step
        parts.append(f"{s['iterations']} steps")
    elif "samples" in s:  # the preset's number of steps
        parts.append(f"{s['samples']} draws per step")
    if "kappa" in s:
        parts.append(f"κ = {_number(s['kappa'])}")
    if s.get("floor") is False:
        parts.append("no floor")
    if s.get("antithetic"):
        parts.append("antithetic pairs")
    if "repeat" in s:
        parts.append(f"replicate {s['repeat'] + 1}")
    if s.get("diagonal"):
        parts.append("kept diagonal")
    if variant.rotate is not None:
        parts.append("rotated inputs")
    return parts


#: the authors' pipeline in a few words, for legends and narrow tables
SHORT = {
    "ddrs_clamped": "DDRS (authors')",
    "ancer_clamped": "ANCER (authors')",
    "ancer_clamped_lr0.4": "ANCER (authors', step 0.4)",
    "ancer_clamped_lr1": "ANCER (authors', step 1)",
    "rddrs_clamped": "RDDRS (authors')",
    "rddrs_clamped_bounded": "RDDRS (authors', our bound)",
    "rddrs_soft_unbounded": "RDDRS (no clamp)",
}


def short(variant, study=None) -> str:
    """``label`` in a few words, for legends and narrow tables: the method, its objective, and
    the method its search starts from."""
    if variant.name in SHORT:
        return SHORT[variant.name]
    text = method_record(variant.method).label
    if "objective" in variant.search:
        text += f", {WORDS[variant.search['objective']]}"
    if variant.start is not None and study is not None and study.variant(variant.start).method != "ddrs":
        text += f", from {method_record(study.variant(variant.start).method).label}"
    return text
