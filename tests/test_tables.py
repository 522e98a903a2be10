"""The method's options as tables (noise laws, samplers, metrics, data sources, launchers): every
entry reaches the config schema, the record or run key, and the docs."""
import math

import pytest

from conftest import ROOT
from pipeline import config as C

DOCS = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))


def test_every_sampler_setting_that_changes_samples_is_in_the_record_and_eval_key():
    from pipeline.records import eval_key, sampler_record
    s = C.SamplerConfig()
    rec = sampler_record(s)
    for name, field in C.SamplerConfig.model_fields.items():
        off = (field.json_schema_extra or {}).get("run_key") is False
        changed = s.model_copy(update={name: _other(getattr(s, name), name)})
        moved = sampler_record(changed) != rec
        assert moved != off, f"sampler.{name}: {'off_key but in the record' if off else 'changes samples but not the record'}"
        if not off:
            base = {"sampler": rec, "model_file": "m.safetensors"}
            assert eval_key(base) != eval_key({**base, "sampler": sampler_record(changed)})
    assert rec["nfe"] == s.nfe


def _other(v, name):
    if isinstance(v, bool):
        return not v
    if name == "solver":
        return "euler" if v == "heun" else "heun"
    if name == "amp":
        return "bf16" if v == "none" else "none"
    if isinstance(v, float) and math.isinf(v):
        return 10.0
    return v + 1 if isinstance(v, int) else v * 1.5 + 0.1


def test_every_noise_law_is_a_config_choice_and_draws_positive_sigmas():
    import torch

    from pipeline.options import NOISE_LAWS, sample_sigma
    assert set(C.NOISE_LAWS) == set(NOISE_LAWS)
    for law in NOISE_LAWS:
        cfg = C.LossConfig(noise=law)
        s = sample_sigma(256, cfg, torch.Generator().manual_seed(0))
        assert s.shape == (256,) and (s > 0).all()
        assert f"`{law}`" in DOCS, f"docs do not describe the noise law `{law}`"


def test_every_solver_is_a_config_choice_with_its_nfe_in_the_record():
    import torch

    from pipeline.edm import edm_sampler
    from pipeline.options import SOLVERS
    from pipeline.records import sampler_record
    calls = {}
    for name, solver in SOLVERS.items():
        s = C.SamplerConfig(solver=name, steps=5)
        assert sampler_record(s)["nfe"] == s.nfe == solver.nfe(5) and sampler_record(s)["solver"] == name
        n = [0]

        def D(x, sigma):
            n[0] += 1
            return x * 0
        edm_sampler(D, torch.randn(2, 3), steps=5, solver=name)
        calls[name] = n[0]
        assert n[0] == solver.nfe(5), f"{name}: {n[0]} network evaluations, the table says {solver.nfe(5)}"
        assert f"`{name}`" in DOCS, f"docs do not describe the solver `{name}`"


def test_the_readme_is_a_front_door_with_a_map_of_the_whole_tree():
    import re
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    table = text.split("## Map of the code", 1)[1].split("###", 1)[0]
    named = set(re.findall(r"`((?:pipeline|stages|sweeps|benchmarks|scripts|tests|docs)[^` ]*)`", table))
    for path in named:
        assert (ROOT / path).exists(), f"README's map names {path}, which does not exist"
    mapped = {p for p in named if p.endswith(".py")} | {p.rstrip("/") for p in named if p.endswith("/")}
    for f in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = str(f.relative_to(ROOT))
        if f.name == "__init__.py" and f.parent.name == "pipeline":
            continue
        assert rel in mapped or str(f.parent.relative_to(ROOT)) in mapped, f"README's map does not show {rel}"
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        assert (ROOT / link).is_file(), link
