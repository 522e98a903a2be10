"""`dvc repro` runs every stage on a shrunken params file; again is a no-op; `dvc exp run -S` reruns
only the stages that depend on the changed parameter."""
import json
import re
import time
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, tiny_params

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)


def sh(cmd, cwd, timeout=900):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    r = subprocess.run(cmd, cwd=cwd, shell=True, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def project_copy(d):
    """The project's pipeline (dvc.yaml and its code) in folder d, to run DVC on."""
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", d / "dvc.yaml")
    for pkg in ("pipeline", "stages"):
        shutil.copytree(ROOT / pkg, d / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return d


def tiny_repo(d, fmnist, data: dict, run_dir: str):
    """A DVC repository of the project on a shrunken params file (tiny network, 64 images of training)."""
    project_copy(d)
    params = tiny_params(d / "p", fmnist, data={"dataset_dir": "data/encoded", **data},
                         train={"run_dir": run_dir, "duration_nimg": 64, "checkpoint_nimg": 32},
                         metrics={"num_images": 4, "ref_num_images": 8},
                         tracking={"uri": f"sqlite:///{d / 'mlflow.db'}"})
    shutil.move(params, d / "params.yaml")
    (d / ".gitignore").write_text((ROOT / ".gitignore").read_text() + "/p/\n")     # the project's, and the shrunk params' folder
    sh("git init -q && dvc init -q && git add -A && git commit -qm init", d)
    return d


def baseline_commit_line() -> str:
    """The `git add ...` line of docs/pipeline.md's baseline commit (without its comment)."""
    lines = [ln for ln in (ROOT / "docs" / "pipeline.md").read_text().splitlines()
             if ln.startswith("git add ") and "# every file DVC asks git to track" in ln]
    assert len(lines) == 1, lines
    return lines[0].split("#")[0].strip()


def exp_view_line() -> str:
    """docs/pipeline.md's `dvc exp show` view for wide tables."""
    lines = [ln for ln in (ROOT / "docs" / "pipeline.md").read_text().splitlines()
             if ln.startswith("dvc exp show --only-changed --drop")]
    assert len(lines) == 1, lines
    return lines[0].split("  #")[0].strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory, fmnist):
    return tiny_repo(tmp_path_factory.mktemp("dvcrepo"), fmnist, {"max_images": 512}, "runs/tiny")


def test_repro_runs_all_stages_then_is_a_noop(repo):
    out = sh("dvc repro", repo)
    for stage in ("fetch", "encode", "reference", "train", "reconstruct", "evaluate", "report"):
        assert f"Running stage '{stage}'" in out, out[-2000:]
    metrics = json.loads(sh("dvc metrics show --json", repo))
    head = metrics[""]["data"]["metrics/fid.json"]["data"]                # the headline: flat, few keys
    assert set(head) == {"fid", "fid_lo", "fid_hi", "sigma_rel", "kid", "tied"}
    assert head["fid_lo"] <= head["fid"] <= head["fid_hi"] and head["sigma_rel"] in (0.05, 0.1, 0.15)
    assert "metrics/fid_vs_ema.csv" not in metrics[""]["data"]                  # data for plots, not a metric
    fid = json.loads((repo / "metrics/fid_points.json").read_text())["fid"]
    assert set(fid) == {"ema_0.050", "ema_0.100", "ema_0.150"} and all(v > 0 for v in fid.values())
    shown = sh("COLUMNS=120 dvc metrics show", repo)
    assert max(len(line) for line in shown.splitlines()) <= 120 and "…" not in shown, shown
    train = metrics[""]["data"]["metrics/train.json"]["data"]          # git-tracked training headline
    assert set(train) == {"final_loss", "images_per_s"} and train["final_loss"] is not None and train["images_per_s"] > 0
    assert json.loads((repo / "runs/tiny/train_summary.json").read_text())["nimg"] == 64
    # `dvc plots show`: the PNG figures, on a page that asks nothing of the network.
    sh("dvc plots show", repo)
    page = (repo / "dvc_plots" / "index.html").read_text()
    for fig in ("fid_vs_ema.png", "training_curves.png", "ema_profiles.png", "samples-ema-"):
        assert fig in page, fig
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert len(list((repo / "dvc_plots" / "static").glob("*.png"))) >= 6
    # `python -m pipeline results` (the end of `make run`): every EMA length, the best, where to look.
    res = sh("python -m pipeline results", repo).strip().splitlines()
    assert sum("sigma_rel 0." in line and "FID" in line for line in res) >= 3 and "<- best" in "\n".join(res)
    assert any(line.startswith("training: 64 images") for line in res), res
    mlflow_line = next(line for line in res if line.startswith("MLflow: "))
    assert mlflow_line.startswith("MLflow: mlflow ui --backend-store-uri sqlite:///"), res
    runs_url = re.search(r"then open (http://127\.0\.0\.1:5000/#/experiments/\d+/runs)", mlflow_line).group(1)
    assert f"<a href='{runs_url}'>" in (repo / "reports" / "report.html").read_text()   # the report links it too
    runs = sh("python -m pipeline runs", repo)          # the main job's runs by default: one row per training
    lines = runs.splitlines()
    assert max(map(len, lines)) <= 120 and "best_fid" in lines[0] and "FINISHED" in runs, runs
    row = next(line for line in lines if "dvc-train" in line)          # named for what it is
    assert "[" in row and not row.rstrip().endswith(" -"), row           # best FID with its interval, a final loss
    every = sh("python -m pipeline runs --all", repo)
    assert " 0.05 " in every and every.count("dvc-train") == 3, every
    assert sorted(p.name for p in (repo / "runs/tiny/snapshots").iterdir())[0] == "phema-0000000032-0.050.safetensors"
    # The baseline commit of docs/pipeline.md tracks every file DVC asks git to track: nothing is left untracked.
    sh(baseline_commit_line(), repo)
    status = sh("git status --porcelain", repo).splitlines()
    assert not [ln for ln in status if ln.startswith("??")] and any("models/.gitignore" in ln for ln in status), status
    sh("git commit -qm repro", repo)
    again = sh("dvc repro", repo)
    assert "Running stage" not in again and "up to date" in again.lower()


def test_exp_run_set_param_reruns_only_dependent_stages(repo):
    out = sh("dvc exp run -S train.ref_lr=0.005", repo)
    ran = {s for s in ("encode", "reference", "train", "reconstruct", "evaluate", "report")
           if f"Running stage '{s}'" in out}
    assert ran == {"train", "reconstruct", "evaluate", "report"}, out[-3000:]
    assert out.count("value(s) differ from the committed") == 1, out[-3000:]     # the params note once, not per stage
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["ref_lr"] == 0.005
    summary = json.loads((repo / "runs/tiny/train_summary.json").read_text())
    assert summary["status"] == "finished" and summary["nimg"] == 64
    # The old run folder (another configuration) was moved aside, not mixed with the new one.
    assert any(p.name.startswith("tiny.") for p in (repo / "runs").iterdir())
    # `dvc exp show` has the training columns (metrics/train.json) for the baseline and the experiment.
    import csv
    import io
    table = list(csv.DictReader(io.StringIO(sh("dvc exp show --csv --no-pager 2>/dev/null", repo))))
    assert len(table) >= 2 and all(row.get("final_loss") not in (None, "", "!") for row in table), table
    assert {row["train.ref_lr"] for row in table} >= {"0.01", "0.005"}
    out = sh("dvc exp run -S sampler.steps=5", repo)
    ran = {s for s in ("encode", "reference", "train", "reconstruct", "evaluate", "report")
           if f"Running stage '{s}'" in out}
    assert ran == {"evaluate", "report"}, out[-3000:]
    # MLflow agrees with metrics/fid_records.json for the current settings; the NFE-7 children stay beside.
    from mlflow.tracking import MlflowClient
    records = json.loads((repo / "metrics/fid_records.json").read_text())
    assert {r["sampler"]["nfe"] for r in records} == {9}
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run_id = json.loads((repo / "runs/tiny/train_summary.json").read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    exp_name = run.data.tags.get("dvc_experiment")             # traced back to `dvc exp show`'s name
    assert exp_name and exp_name in {row["Experiment"] for row in table}, (exp_name, table)
    assert run.info.run_name == f"dvc-train {exp_name} ref_lr=0.005 {run.data.tags['run_key'][:8]}", run.info.run_name
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    by_key = {c.data.tags["eval_key"]: c for c in children}
    for r in records:
        assert by_key[r["eval_key"]].data.metrics["fid"] == pytest.approx(r["fid"])
        assert by_key[r["eval_key"]].data.params["nfe"] == "9"
    assert {c.data.params["nfe"] for c in children} == {"7", "9"}
    assert run.data.metrics["best_fid"] == pytest.approx(min(r["fid"] for r in records))


@pytest.mark.slow
def test_queued_experiments_share_the_projects_run_and_mlflow_store(repo):
    """`dvc exp run --queue -S 'sampler.steps=choice(...)'` + `dvc queue start`: DVC runs each experiment in
    a copy of the repository without the git-ignored run folder and MLflow store; the copies use the
    project's (workspace.py): no retraining (the run's snapshots are reused), one MLflow store."""
    sh("dvc repro", repo)                                         # (a no-op after the tests above)
    sh("git add -A && (git diff --cached --quiet || git commit -qm baseline)", repo)   # the baseline commit
    summary = repo / "runs/tiny/train_summary.json"
    before = summary.read_text()
    sh("dvc exp run --queue -S 'sampler.steps=choice(4,6)'", repo)
    sh("dvc queue start -j 1", repo)
    deadline = time.time() + 1200
    while time.time() < deadline:
        status = sh("dvc queue status", repo)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert status.count("Success") == 2, status
    assert summary.read_text() == before                          # the run was not trained again
    assert not (repo / "runs" / "keyed").exists()                 # same training params: the baseline's folder
    import csv
    import io
    table = list(csv.DictReader(io.StringIO(sh("dvc exp show --csv --no-pager 2>/dev/null", repo))))
    steps = {row["sampler.steps"]: row for row in table if row.get("fid") not in (None, "", "!", "-")}
    assert {"4", "6"} <= set(steps), table
    # The documented narrow view (docs/pipeline.md): the headline and what differs, within 120 columns.
    view = sh(f"COLUMNS=120 {exp_view_line()} --no-pager", repo)
    header = next(ln for ln in view.splitlines() if "Experiment" in ln).split()
    assert {"fid", "fid_lo", "fid_hi", "sigma_rel", "kid", "tied", "sampler.steps"} <= set(header), view
    assert max(len(ln) for ln in view.splitlines()) <= 120, view
    from mlflow.tracking import MlflowClient                       # both evaluations in the project's store
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run_id = json.loads(summary.read_text())["mlflow_run_id"]
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")
    assert {"7", "11"} <= {c.data.params["nfe"] for c in children}
    # `pipeline compare` between the two queued experiments, by their DVC names: same seeds -> paired.
    names = [steps[k]["Experiment"] for k in ("4", "6")]
    assert all(names), table
    out = sh(f"python -m pipeline compare {names[0]} {names[1]}", repo)
    assert f"A = {names[0]} (metrics/fid_records.json at {names[0]})" in out, out
    fid_lines = [ln for ln in out.splitlines() if ln.strip().startswith("fid ")]
    assert len(fid_lines) == 4 and all("paired)" in ln for ln in fid_lines), out      # 3 EMA lengths + best vs best
    assert all(("not resolved" in ln) or ("resolved: B" in ln) for ln in fid_lines), out
    # An evaluation of another protocol (fewer generated images) is refused with the reason, in one line.
    other = json.loads((repo / "metrics/fid_records.json").read_text())
    for r in other:
        r["num_images"] = 2
    (repo / "other.json").write_text(json.dumps(other))
    r = subprocess.run([sys.executable, "-m", "pipeline", "compare", names[0], "other.json"], cwd=repo,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    assert r.returncode == 2 and "are not comparable: their evaluations differ in generated images (4 vs 2)" in r.stderr, \
        r.stderr


def test_a_teammate_pulls_a_finished_run_from_a_dvc_remote_and_retrains_nothing(repo, tmp_path):
    """`pipeline share on` + a local-folder DVC remote: push; a fresh clone pulls, `dvc repro` runs
    nothing, and an evaluation-only change reruns only evaluate and report (from the pulled snapshots'
    reconstructions and reference statistics)."""
    remote = tmp_path / "remote"
    out = sh("python -m pipeline share on", repo)
    assert "runs/tiny/snapshots (train)" in out and "runs/tiny/metrics.jsonl (train)" in out, out
    assert "now in DVC's cache" in out, out
    assert "dvc commit -f fetch train" in out, out
    sh(f"dvc remote add -d shared {remote} && git add -A && git commit -qm 'share runs' && dvc push -q", repo)
    clone = tmp_path / "clone"
    sh(f"git clone -q {repo} {clone} && cd {clone} && dvc pull -q", tmp_path)
    assert (clone / "runs/tiny/snapshots").is_dir() and (clone / "models/ema").is_dir()
    again = sh("dvc repro", clone)
    assert "Running stage" not in again and "up to date" in again.lower(), again[-2000:]
    out = sh("dvc exp run -S sampler.steps=3", clone)
    ran = {s for s in ("fetch", "encode", "reference", "train", "reconstruct", "evaluate", "report")
           if f"Running stage '{s}'" in out}
    assert ran == {"evaluate", "report"}, out[-3000:]
    assert {r["sampler"]["steps"] for r in json.loads((clone / "metrics/fid_records.json").read_text())} == {3}
    off = sh("python -m pipeline share off", clone)
    assert "out of DVC's cache" in off and (clone / "dvc.yaml").read_text().count("cache: false           # share:") == 4


def test_every_stage_lists_its_script_and_every_module_it_imports(root):
    """A stage reruns when any code it runs changes: its own script and the import closure of it
    within the project (function-level imports included) are all deps in dvc.yaml."""
    import re

    import yaml
    from deps_helpers import closure
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"fetch", "encode", "reference", "train", "reconstruct", "evaluate", "report"}
    assert "${data.path}" in stages["encode"]["deps"]                 # the raw input itself, hashed by DVC
    for name, stage in stages.items():
        m = re.match(r"python -m (stages\.\w+)", stage["cmd"])
        assert m, f"{name}: cmd {stage['cmd']!r} does not run a stage module"
        script = root / (m.group(1).replace(".", "/") + ".py")
        listed = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
        needed = {str(p.relative_to(root)) for p in closure(script)}
        assert str(script.relative_to(root)) in needed
        missing = sorted(needed - listed)
        assert not missing, f"dvc.yaml stage {name} does not list {missing} (imported by {script.name})"
    # and the check is not vacuous: evaluate runs the sampler and the network
    assert {"pipeline/edm.py", "pipeline/networks.py"} <= {str(p.relative_to(root)) for p in
                                                           closure(root / "stages/evaluate.py")}


def test_encode_depends_on_the_images_of_data_path(tmp_path):
    """With data.path set, DVC hashes its contents: one changed image makes the encode stage (and with it
    everything downstream) out of date; `dvc repro encode` re-encodes it."""
    from PIL import Image
    import numpy as np
    d = project_copy(tmp_path / "repo")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(source="folder", path="images", resolution=16, channels=3, resize="center-crop")
    (d / "params.yaml").write_text(yaml.safe_dump(raw))
    rng = np.random.default_rng(0)
    for i in range(3):
        (d / "images" / "00000").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"images/00000/img{i:08d}.png")
    (d / "images" / "dataset.json").write_text(json.dumps({"labels": [[f"00000/img{i:08d}.png", i] for i in range(3)]}))
    (d / ".gitignore").write_text("/data/\n")
    sh("git init -q && dvc init -q && git add -A && git commit -qm init && dvc repro encode", d)
    assert "up to date" in sh("dvc status encode", d).lower()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / "images/00000/img00000001.png")
    status = sh("dvc status encode", d)
    assert "changed deps" in status and "images" in status, status
    out = sh("dvc repro encode", d)
    assert "Running stage 'encode'" in out
    manifest = json.loads((d / "data/encoded/train/manifest.json").read_text())
    assert manifest["labels_from"] == "dataset.json" and manifest["count"] == 3
    # Own data with a held-out reference: the fetch stage fetches nothing, and says so.
    raw["metrics"]["reference"], raw["data"]["reference_split"] = "held-out", 1
    (d / "params.yaml").write_text(yaml.safe_dump(raw))
    out = sh("dvc repro fetch", d)
    assert "nothing to fetch for data.source=folder" in out, out
    assert [p.name for p in (d / "data/raw/fashion-mnist").iterdir()] == ["NOT-FETCHED.txt"]


def test_latent_pipeline_end_to_end_with_a_small_random_vae(tmp_path, fmnist):
    """data.encoder: vae (EDM2's convention): encode (latents for training, pixels for the reference) ->
    train -> reconstruct -> evaluate (samples decoded by the VAE before Inception) -> report, by dvc repro."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the optional [vae] extra")
    import torch
    d = tmp_path / "repo"
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=4, sample_size=32).save_pretrained(tmp_path / "vae")
    tiny_repo(d, fmnist, {"max_images": 48, "encoder": "vae", "vae_path": str(tmp_path / "vae"), "resolution": 16,
                          "channels": 4}, "runs/vae")
    out = sh("dvc repro", d)
    for stage in ("encode", "reference", "train", "reconstruct", "evaluate", "report"):
        assert f"Running stage '{stage}'" in out, out[-2000:]
    train_m = json.loads((d / "data/encoded/train/manifest.json").read_text())
    test_m = json.loads((d / "data/encoded/test/manifest.json").read_text())
    assert train_m["encoder"] == "vae" and train_m["latent_convention"] == "edm2" and train_m["shape"] == [8, 16, 16]
    assert test_m["encoder"] == "pixel" and test_m["shape"] == [3, 32, 32]          # the reference: pixels
    records = json.loads((d / "metrics/fid_records.json").read_text())
    assert len(records) == 3 and all(r["fid"] > 0 for r in records)
    grid = d / "reports/samples" / records[0]["extra"]["samples"]
    from PIL import Image
    assert Image.open(grid).mode == "RGB"                                         # decoded RGB, not 4 latent planes
    assert Image.open(next((d / "runs/vae/samples").glob("samples-*.png"))).mode == "RGB"   # training's grid too
