"""The run report: built by the report stage for a tiny run, rendered in headless Chromium with
every image loaded and no request leaving the machine; its figures are in the MLflow run too."""
import re

import pytest

from chromium_helpers import chromium_or_skip, render
from conftest import tiny_params
from pipeline import config as C
from pipeline.training import TrainHooks, train

pytestmark = pytest.mark.slow


def test_tiny_run_report_renders_offline_in_chromium(tmp_path, fmnist):
    from mlflow.tracking import MlflowClient

    from stages.evaluate import main as evaluate_main
    from stages.reconstruct import main as reconstruct_main
    from stages.report import main as report_main
    chromium = chromium_or_skip()
    params = tiny_params(tmp_path, fmnist, train={"duration_nimg": 64})
    cfg = C.load_config(params)
    res = train(cfg, TrainHooks(progress=False))
    common = ["--params", str(params)]
    assert reconstruct_main([*common, "--out", str(tmp_path / "models")]) == 0
    assert evaluate_main([*common, "--models", str(tmp_path / "models"), "--ref-cache", str(tmp_path / "ref"),
                          "--metrics", str(tmp_path / "metrics"), "--samples", str(tmp_path / "samples")]) == 0
    assert report_main([*common, "--metrics", str(tmp_path / "metrics"), "--models", str(tmp_path / "models"),
                        "--samples", str(tmp_path / "samples"), "--out", str(tmp_path / "reports")]) == 0
    html = (tmp_path / "reports" / "report.html").read_text()
    for needle in ("FID against EMA length", "Loss and learning rate", "Resolved configuration", "fid-helper",
                   "NFE 7", "seeds 0-3", "<th>device</th><td>cpu (", "<th>git revision</th>", "<th>finished</th>",
                   "images/s)</td>"):
        assert needle in html, needle
    assert "final_loss -" not in html and "run_key" not in html.split("Resolved configuration")[0]   # no raw dump
    # Each sample thumbnail opens the full-size grid (a file beside the report, enlarged 3x for 32-pixel images).
    from PIL import Image
    links = re.findall(r"<a href='(figures/samples-[^']+\.png)'", html)
    assert len(links) == 3, links
    for link in links:
        assert Image.open(tmp_path / "reports" / link).size == (2 * 96, 2 * 96)          # 4 images, 2 x 2
    page = render(chromium, (tmp_path / "reports" / "report.html").as_uri(), tmp_path, "run-report")
    print(f"screenshot: {page['screenshot']}; {page['images_loaded']}/{page['images_total']} images; "
          f"{len(page['urls'])} URLs requested")
    # 3 figures (FID, curves, EMA profiles) + one sample grid per EMA length (3)
    assert page["images_total"] == 6 and page["images_loaded"] == 6
    assert page["view_width"] == 1280 and page["page_width"] <= 1280, page        # nothing overflows the window
    assert page["external_requests"] == [], page["external_requests"]      # the page asks for nothing outside
    assert page["non_local_connections"] == [], page["non_local_connections"]   # and nothing left the machine
    runs_link = re.findall(r"<a href='(http://127\.0\.0\.1:5000/#/experiments/\d+/runs)'>", html)
    assert len(runs_link) == 1, "the MLflow runs table is linked (a loopback address, `mlflow ui`'s)"
    rest = html.replace("http://www.w3.org", "").replace(runs_link[0], "")
    assert "http://" not in rest and "https://" not in html              # nothing else points off the page
    # The same figures are in the MLflow run they describe, with the FIDs as nested EMA runs.
    client = MlflowClient(cfg.tracking.uri)
    arts = {a.path for a in client.list_artifacts(res.mlflow_run_id, "report/figures")}
    assert {"report/figures/fid_vs_ema.png", "report/figures/training_curves.png"} <= arts
    kids = client.search_runs([client.get_run(res.mlflow_run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{res.mlflow_run_id}'")
    assert sorted(float(k.data.params["sigma_rel"]) for k in kids) == [0.05, 0.1, 0.15]
    assert all(k.data.metrics["fid"] > 0 for k in kids)
