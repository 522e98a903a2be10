"""A fuzzed boundary (hypothesis): params overrides, sweep files, command lines, dataset manifests
and safetensors headers, generated from the schema and from mutations of valid ones.

Every case ends in exit 0 with a valid result, or exit 2 with one line naming the field or file:
never a traceback (any other exception fails the test), never a hang (each example has a deadline),
never a marker file (crafted pickles are among the inputs). The suite runs the `ci` profile: a fixed
seed (derandomized) and a bounded number of examples; `HYPOTHESIS_PROFILE=long` runs many more with
fresh random seeds (README, Failure behaviour)."""
import contextlib
import io
import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from pipeline import config as C
from pipeline import io as pio
from pipeline.errors import PipelineError

settings.register_profile("ci", max_examples=40, derandomize=True, deadline=20_000, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=2_000, deadline=60_000,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"edm2-fuzz-marker-{os.getpid()}"


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


PICKLE = pickle.dumps({"state": Payload()})

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["auto", "cpu", "cuda:0", "bf16", "heun", "asha", "grid", "fashion-mnist", "-1"]))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=6), scalars, max_size=3))
DEFAULT_KEYS = sorted(C.resolve({}).flat())
keys = st.one_of(st.sampled_from(DEFAULT_KEYS), st.sampled_from(DEFAULT_KEYS).map(lambda k: k + ".x"),
                 st.text(alphabet="abcdefghij._", min_size=1, max_size=12))


def run_main(*argv):
    """`python -m pipeline ...` / a stage's main in this process: (exit code, stdout, stderr)."""
    import importlib
    module = argv[0]
    main = importlib.import_module(module + (".__main__" if module == "pipeline" else "")).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv[1:]))
        except SystemExit as e:                          # argparse's own exit
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_contract(code, err, *names):
    """Exit 0, or exit 2 with one non-empty line (naming one of `names` when given); no traceback."""
    lines = [x for x in err.strip().splitlines() if x.strip() and "%|" not in x]
    assert "Traceback" not in err, err
    if code == 0:
        return
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    if names:
        assert any(n in lines[0] for n in names), (names, lines[0])


@pytest.fixture(autouse=True)
def no_marker():
    MARKER.unlink(missing_ok=True)
    yield
    assert not MARKER.exists(), "a crafted pickle was executed"


# ----------------------------------------------------------------------------------------------
# Params overrides: from the schema's own keys, with values of every kind.

@given(st.lists(st.tuples(keys, values), min_size=1, max_size=3))
def test_params_overrides_validate_or_name_the_field(pairs):
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    try:
        cfg = C.resolve(base, dict(pairs))
    except C.ConfigError as err:
        msg = str(err)
        assert msg.strip() and any(k.split(".")[0] in msg for k, _ in pairs), (pairs, msg)
        return
    assert cfg.run_key() and C.resolve(cfg.to_dict()) == cfg        # a valid result round-trips


@given(keys, st.one_of(values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
                       st.text(max_size=16)))
def test_config_command_line_overrides(key, text):
    code, out, err = run_main("pipeline", "config", "--params", str(ROOT / "params.yaml"), "-S", f"{key}={text}")
    assert_contract(code, err, key.split(".")[0], "override")
    if code == 0:
        assert C.resolve(yaml.safe_load(out))


# ----------------------------------------------------------------------------------------------
# Sweep files: mutations of the tiny sweep, checked by --dry-run (no Ray, no MLflow, no training).

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-project")
    (d / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return d


SWEEP = yaml.safe_load((ROOT / "sweeps" / "tiny.yaml").read_text())
sweep_keys = st.sampled_from(sorted(SWEEP) + ["search.train.ref_lr", "search.loss.P_std", "resources.cpus",
                                              "scheduler.type", "posthoc.guidance", "storage", "name", "bogus"])


@given(st.lists(st.tuples(sweep_keys, st.one_of(values, st.just("__delete__"))), min_size=1, max_size=3),
       st.booleans())
def test_sweep_files_dry_run_or_one_line(project, monkeypatch, mutations, garble):
    raw = json.loads(json.dumps(SWEEP))
    for key, value in mutations:
        parts = key.split(".", 1) if key.startswith("search.") else key.split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            if value == "__delete__":
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = value
    f = project / "s.yaml"
    text = yaml.safe_dump(raw)
    f.write_bytes(text.encode()[: len(text) // 2] + b"\xff: [" if garble else text.encode())
    monkeypatch.chdir(project)
    code, out, err = run_main("pipeline", "sweep", "s.yaml", "--dry-run", "--num-cpus", "1")
    assert_contract(code, err, "s.yaml", *{k.split(".")[0] for k, _ in mutations}, "search", "resources",
                    "scheduler", "sweep", "empty search space", "--num-cpus")
    if code == 0:
        assert "trial" in out


# ----------------------------------------------------------------------------------------------
# Command lines: flags and values drawn from each command's arguments (commands that fail before
# any compute when their inputs are garbage, so a valid-looking case stays cheap). Not `submit`: a
# valid draw would start a real job (tests/system/test_slurm.py and test_failures.py cover its errors).

ARGS = {
    "sample": ["--model", "--num", "--out", "--seed", "--guide", "--guidance", "--batch", "--device", "-S"],
    "results": ["--metrics", "--report", "-S"],
    "runs": ["--experiment", "--sweep", "--uri", "--out"],
    "config": ["--preset", "-S"],
}
arg_values = st.one_of(st.sampled_from(["0", "-1", "nan", "inf", "1e9", "x", "", "cuda:7", "unconditional",
                                        "sqlite:///nowhere/m.db", "http://127.0.0.1:1", "foo://bar", "slurm",
                                        "local", "train.ref_lr=0", "a.npz", "/dev/null", "/proc/x/y"]),
                       st.text(alphabet="abc-=:./019", max_size=10))


@given(st.sampled_from(sorted(ARGS)).flatmap(
    lambda cmd: st.tuples(st.just(cmd), st.lists(st.tuples(st.sampled_from(ARGS[cmd]), arg_values), max_size=4))),
    st.sampled_from(["", "model", "pickle"]))
def test_command_lines_never_trace_back(tmp_path_factory, monkeypatch, cmd_args, model):
    cmd, pairs = cmd_args
    d = tmp_path_factory.mktemp("cli")
    monkeypatch.chdir(d)
    (d / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    argv = [cmd]
    for flag, v in pairs:
        argv += [flag, v]
    if cmd == "sample":
        f = d / "m.safetensors"
        f.write_bytes(PICKLE if model == "pickle" else b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        argv += ["--model", str(f), "--num", "2", "--out", str(d / "o.npz")]
    if cmd == "runs":
        argv += ["--uri", f"sqlite:///{d / 'm.db'}"]
    code, out, err = run_main("pipeline", *argv)
    assert_contract(code, err)


# ----------------------------------------------------------------------------------------------
# Dataset manifests: mutations of a valid one (and garbage bytes), read by the training loader.

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from pipeline.data.manifest import MANIFEST_FORMAT, sha256_files
    d = tmp_path_factory.mktemp("ds") / "train"
    d.mkdir()
    np.save(d / "images.npy", np.random.default_rng(0).integers(0, 255, (4, 1, 32, 32), dtype=np.uint8))
    np.save(d / "labels.npy", np.array([0, 1, 2, 1], dtype=np.int64))
    manifest = {"format": MANIFEST_FORMAT, "count": 4, "shape": [1, 32, 32], "dtype": "uint8", "encoder": "pixel",
                "source": "test", "split": "train", "resolution": 32, "channels": 1, "resize": "pad",
                "label_count": 3, "class_names": ["a", "b", "c"],
                "sha256": sha256_files([d / "images.npy", d / "labels.npy"]), "notes": [], "latent_stats": None}
    return d, manifest


@given(st.lists(st.tuples(st.sampled_from(["format", "count", "shape", "dtype", "encoder", "channels", "label_count",
                                           "sha256", "latent_stats", "bogus"]), st.one_of(values, st.just("__del__"))),
                max_size=3),
       st.one_of(st.none(), st.binary(max_size=40), st.sampled_from([b"[]", b"null", b"\xff\xfe{", PICKLE])))
def test_dataset_manifests_load_or_one_line(dataset, mutations, raw_bytes):
    from pipeline.data.encoded import EncodedDataset
    from pipeline.data.pixels import DataError
    d, manifest = dataset
    m = dict(manifest)
    for k, v in mutations:
        if v == "__del__":
            m.pop(k, None)
        else:
            m[k] = v
    (d / "manifest.json").write_bytes(raw_bytes if raw_bytes is not None else json.dumps(m).encode())
    try:
        ds = EncodedDataset(d)
    except DataError as err:
        assert str(d) in str(err) and len(str(err).splitlines()) == 1, err
        return
    x, labels = ds.get([0, 1])
    assert x.shape == (2, 1, 32, 32)


# ----------------------------------------------------------------------------------------------
# safetensors headers: generated headers and byte-level damage, read by the model and snapshot paths.

dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8", "X", 3])
tensor_entry = st.fixed_dictionaries({
    "dtype": dtypes,
    "shape": st.lists(st.integers(-2, 40), max_size=3),
    "data_offsets": st.lists(st.integers(-8, 600), min_size=2, max_size=2)})


@given(st.dictionaries(st.text(alphabet="abcdefgh._", min_size=1, max_size=8), tensor_entry, max_size=4),
       st.dictionaries(st.sampled_from(["format", "config", "net_args", "nimg", "sigma_rel"]), st.text(max_size=20),
                       max_size=3),
       st.integers(0, 700), st.integers(-16, 16), st.sampled_from(["header", "pickle", "garbage"]))
def test_safetensors_headers_load_or_one_line(tmp_path_factory, header, meta, data_len, length_skew, kind):
    from pipeline.phema import PHEMAError
    from pipeline.snapshots import load_reconstruction
    d = tmp_path_factory.mktemp("st")
    f = d / "ema-0000000128-0.100.safetensors"
    if kind == "pickle":
        f.write_bytes(PICKLE)
    elif kind == "garbage":
        f.write_bytes(os.urandom(data_len))
    else:
        text = json.dumps({**header, "__metadata__": meta}).encode()
        f.write_bytes(struct.pack("<Q", max(0, len(text) + length_skew)) + text + os.urandom(data_len))
    for reader in (lambda: pio.load_safetensors(f), lambda: load_reconstruction(f)):
        try:
            reader()
        except (PipelineError, PHEMAError) as err:
            assert str(f) in str(err) and len(str(err).splitlines()) == 1, err
    code, out, err = run_main("pipeline", "sample", "--params", str(ROOT / "params.yaml"), "--model", str(f),
                              "--num", "1", "--out", str(d / "o.npz"))
    assert_contract(code, err, f.name)
    assert code == 2 and not (d / "o.npz").exists()
    assert re.search(r"safetensors|tensor|header|format|truncated|not a|unreadable", err), err


# ----------------------------------------------------------------------------------------------
# NVIDIA imports: the init arguments a pickle records, drawn from every kind of value (and unknown
# names), in a file built the way NVIDIA's persistence writes one; and data sources: zip archives whose
# entry names, contents and dataset.json are drawn.

NVIDIA_ARGS = ["img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels",
               "model_channels", "channel_mult", "channel_mult_noise", "channel_mult_emb", "num_blocks",
               "attn_resolutions", "label_balance", "concat_balance", "resample_filter", "channels_per_head",
               "dropout", "res_balance", "attn_balance", "clip_act", "bogus"]


@pytest.fixture(scope="module")
def small_net():
    from unit.test_nvidia import our_net
    return our_net()


@given(st.dictionaries(st.sampled_from(NVIDIA_ARGS), st.one_of(values, st.integers(0, 70)), max_size=3),
       st.sampled_from(["edm2-img16-xs-0000002-0.100.pkl", "network-snapshot-0000002-0.050.pkl", "odd.pkl"]))
def test_nvidia_imports_or_one_line(tmp_path_factory, small_net, kwargs, name):
    import sys
    import types

    from pipeline.nvidia import NvidiaImportError, import_files
    from unit.test_nvidia import write_nvidia_pickle
    d = tmp_path_factory.mktemp("nv")
    persistence, util = types.ModuleType("torch_utils.persistence"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):                 # never called: the reader maps this name
        MARKER.write_text("ran")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class EasyDict(dict):
        pass
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")}
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                        "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util})
    try:
        ns = types.SimpleNamespace(src=f"open({str(MARKER)!r}, 'w').write('ran')\n", EasyDict=EasyDict)
        try:
            write_nvidia_pickle(d / name, small_net, ns, extra_kwargs=kwargs)
        except (pickle.PicklingError, TypeError, AttributeError):
            return                                         # a value pickle itself cannot write
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    try:
        written = import_files([d / name], d / "out", log=lambda *_: None)
    except NvidiaImportError as err:
        assert len(str(err).splitlines()) == 1 and str(err).strip(), err
        assert not (d / "out").exists() or not any((d / "out").iterdir())
        return
    assert len(written) == 1 and written[0].is_file()


entry_names = st.one_of(st.sampled_from(["a/x.png", "b/y.png", "../e.png", "/abs/e.png", "a/../../e.png", "dataset.json",
                                         "c:/w.png", "a\\..\\e.png", "x.txt"]),
                        st.text(alphabet="ab/._", min_size=1, max_size=8).map(lambda s: s + ".png"))


@given(st.lists(st.tuples(entry_names, st.sampled_from(["png", "bytes", "json", "empty"])), min_size=1, max_size=5))
def test_zip_sources_read_or_one_line(tmp_path_factory, entries):
    import warnings

    from PIL import Image

    from pipeline.data.pixels import DataError
    from pipeline.data.readers import read_image_zip
    d = tmp_path_factory.mktemp("zip")
    png = io.BytesIO()
    Image.new("L", (8, 8), 128).save(png, format="PNG")
    z = d / "d.zip"
    with warnings.catch_warnings(), zipfile.ZipFile(z, "w") as zf:
        warnings.simplefilter("ignore")
        for name, kind in entries:
            data = {"png": png.getvalue(), "bytes": os.urandom(20), "empty": b"",
                    "json": json.dumps({"labels": [[name, 1]]}).encode()}[kind]
            zf.writestr(name, data)
    try:
        raw = read_image_zip(z)
    except DataError as err:
        assert len(str(err).splitlines()) == 1 and str(err).strip(), err
        return
    assert raw.images                                      # read: then no entry was outside, doubled or too large
    names = [n for n, _ in entries]
    assert not any(n.startswith("/") or ".." in n.replace("\\", "/").split("/") for n in names)
    assert len(set(names)) == len(names)

