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
    if name == "seeding":
        return "nvidia" if v == "portable" else "portable"
    if v == "auto":                                   # a compile switch
        return True
    if isinstance(v, float) and math.isinf(v):
        return 10.0
    return v + 1 if isinstance(v, int) else v * 1.5 + 0.1


def test_every_noise_law_is_a_config_choice_and_draws_positive_sigmas():
    import torch

    from pipeline.options import NOISE_LAWS, sample_sigma
    assert set(C.NOISE_LAWS) == set(NOISE_LAWS)
    for law in NOISE_LAWS:
        cfg = C.loss_config(law)
        s = sample_sigma(256, cfg, torch.Generator().manual_seed(0))
        assert s.shape == (256,) and (s > 0).all()
        assert f"`{law}`" in DOCS, f"docs do not describe the noise law `{law}`"
    keys = {C.resolve({}, {"loss.noise": law}).run_key() for law in NOISE_LAWS}
    assert len(keys) == len(NOISE_LAWS)                      # each law trains another run


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


def test_precision_recall_equal_the_definition_computed_by_brute_force():
    import numpy as np

    from pipeline.stats import precision_recall
    rng = np.random.default_rng(1)
    real, gen = rng.normal(size=(60, 5)), rng.normal(size=(40, 5)) * 1.3 + 0.2
    d = lambda a, b: np.linalg.norm(a[:, None] - b[None], axis=-1)  # noqa: E731
    r_real = np.sort(d(real, real), axis=1)[:, 3]
    r_gen = np.sort(d(gen, gen), axis=1)[:, 3]
    want_p = np.mean([(d(g[None], real)[0] <= r_real).any() for g in gen])
    want_r = np.mean([(d(x[None], gen)[0] <= r_gen).any() for x in real])
    p, r = precision_recall(gen, real, k=3, )
    assert (p, r) == pytest.approx((want_p, want_r)) and 0 < p < 1 and 0 < r < 1
    assert precision_recall(real, real, k=3) == (1.0, 1.0)


def test_every_metric_names_its_entries_features_and_docs():
    import numpy as np

    from pipeline.metrics import METRICS as _TABLE
    from pipeline.options import METRIC_NAMES
    assert tuple(_TABLE) == METRIC_NAMES, "options.METRIC_NAMES (what the schema accepts) must list metrics.METRICS"

    from pipeline.metrics import FEATURES, METRICS, combine_sets
    for name, m in METRICS.items():
        assert m.features in FEATURES and m.names
        for entry in m.names:
            assert f"`{entry}`" in DOCS or entry in ("fid", "kid"), f"docs do not describe the metric `{entry}`"
        assert f"`{name}`" in DOCS, f"docs do not list `{name}` as a metrics.names choice"
    # K seed sets: mean, SE of the mean, every set's value and the minimum, for every entry alike.
    sets = [{"x": {"value": v, "se": 1.0, "interval": [v - 2, v + 2]}} for v in (3.0, 5.0)]
    c = combine_sets(sets)["x"]
    assert c["value"] == 4.0 and c["se"] == pytest.approx(np.sqrt(2) / 2) and c["sets"] == [3.0, 5.0] and c["min"] == 3.0


def test_every_data_source_is_a_config_choice_read_through_its_entry(tmp_path):
    import numpy as np
    from PIL import Image

    from pipeline.data.encode import dataset_splits
    from pipeline.data.pixels import DataError
    from pipeline.data.readers import load_source
    from pipeline.data.sources import SOURCES
    assert set(SOURCES) == set(C.DataConfig.model_fields["source"].annotation.__args__)
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    import shutil
    shutil.make_archive(str(tmp_path / "imgs"), "zip", tmp_path / "imgs")
    paths = {"folder": tmp_path / "imgs", "zip": tmp_path / "imgs.zip"}
    for name, src in SOURCES.items():
        assert f"`{name}`" in DOCS, f"docs do not describe the data source `{name}`"
        if src.needs_path:
            with pytest.raises(C.ConfigError, match="data.path is required"):
                C.resolve({}, {"data.source": name})
            d = C.resolve({}, {"data.source": name, "data.path": str(paths[name])}).data
            raw = load_source(d, "train")
            assert len(raw.images) == 3 and raw.class_names == ["cat"]
            assert dataset_splits(C.resolve({}, {"data.source": name, "data.path": str(paths[name])})) == list(src.splits)
            with pytest.raises(DataError, match="has no 'test' split"):
                load_source(d, "test")


def test_every_launcher_backend_is_a_config_choice_and_jobs_read_one_env_adapter(monkeypatch):
    from pipeline.backends import BACKENDS, job_env
    from pipeline.launchers import LAUNCHERS, SubmititLauncher
    assert set(BACKENDS) == set(C.LauncherConfig.model_fields["executor"].annotation.__args__) == set(LAUNCHERS)
    for name, b in BACKENDS.items():
        assert f"`{name}`" in DOCS, f"docs do not describe the launcher `{name}`"
        if LAUNCHERS[name] is SubmititLauncher:
            assert isinstance(SubmititLauncher.PARAMETERS[name](C.LauncherConfig()), dict)
    for var in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    assert job_env().scheduler is None and job_env().tasks == 1
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    for var, v in (("SLURM_NODEID", "1"), ("SLURM_CPUS_ON_NODE", "8"), ("SLURM_RESTART_COUNT", "2"),
                   ("SLURM_NTASKS", "4")):
        monkeypatch.setenv(var, v)
    env = job_env()
    assert (env.scheduler, env.job_id, env.node_id, env.cpus, env.attempt, env.tasks) == ("slurm", "42", 1, 8, 2, 4)
    # Nothing but backends.py reads a scheduler's variables.
    readers = [p.name for p in (ROOT / "pipeline").rglob("*.py") if "SLURM_" in p.read_text() and p.name != "backends.py"]
    assert readers == []


def test_precision_recall_on_too_few_images_carry_a_note_that_is_printed():
    """0 +- 0 on a tiny evaluation is explained where it is printed; enough images on both sides: no note."""
    import numpy as np

    from pipeline.metrics import PrecisionRecallMetric
    from pipeline.records import result_line
    rng = np.random.default_rng(0)
    pr = PrecisionRecallMetric()
    few = pr.measure(rng.normal(size=(4, 16)), {"features": rng.normal(size=(8, 16))}, 4)
    assert "4 generated and 8 reference images are too sparse" in few["precision"]["note"]
    rec = {"fid": 300.0, "fid_se": 3.0, "fid_ci95": [294.0, 306.0], "sigma_rel": 0.1, "num_images": 4,
           "ref_num_images": 8, "reference": "r", "feature_net": "f", "sampler": {"nfe": 7, "guidance": 1.0},
           "metrics": {"fid": {"value": 300.0, "se": 3.0}, **few}}
    line = result_line(rec)
    assert line.count("too sparse") == 1 and "precision" in line and "recall" in line, line
    enough = pr.measure(rng.normal(size=(pr.min_images, 16)), {"features": rng.normal(size=(pr.min_images, 16))}, 4)
    assert "note" not in enough["precision"] and "note" not in enough["recall"]
