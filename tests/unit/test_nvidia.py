"""NVIDIA EDM2's network pickles and raw snapshots, imported without running anything in them.

The tests write files in NVIDIA's on-disk layout themselves (no download, no NVIDIA code): the network is
this project's, its modules pickled the way EDM2's persistence does it (a call of
torch_utils.persistence._reconstruct_persistent_obj with the class name, the module source and the
state). The module source and the reconstructor both write a marker file if anything ever runs them."""
import collections
import pickle
import sys
import types

import nvidia_reference  # noqa: E402
import pytest
import torch

from pipeline import config as C
from pipeline.networks import Precond, build_network
from pipeline.nvidia import NvidiaImportError, import_files, read_pickle

NET = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8],
       "channels_per_head": 16}


class _Persistent:
    """Pickles as EDM2's persistent objects do: a reduce to the persistence reconstructor with `meta`."""

    def __init__(self, class_name, state, module_src):
        self.meta = {"type": "class", "version": 4, "module_src": module_src, "class_name": class_name,
                     "state": state}

    def __reduce__(self):
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,)


def _nvidia_tree(module, module_src, init_kwargs=None):
    """This project's module tree as EDM2's pickle holds it (float16 tensors, out_conv named as NVIDIA's)."""
    state = dict(module.__dict__)
    state["_parameters"] = collections.OrderedDict(
        (k, torch.nn.Parameter(v.detach().half(), requires_grad=v.requires_grad) if v is not None else None)
        for k, v in module._parameters.items())
    state["_buffers"] = collections.OrderedDict((k, v.half() if v is not None and v.is_floating_point() else v)
                                                for k, v in module._buffers.items())
    children = collections.OrderedDict()
    for k, child in module._modules.items():
        children["out_conv" if k == "conv_out" else k] = _nvidia_tree(child, module_src)
    state["_modules"] = children
    if isinstance(module, torch.nn.ModuleDict):              # a plain torch container, by class reference
        obj = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
        obj.__dict__.update({k: v for k, v in state.items()})
        return obj
    state["_init_args"], state["_init_kwargs"] = (), dict(init_kwargs or {})
    return _Persistent(type(module).__name__, state, module_src)


@pytest.fixture
def nvidia_modules(tmp_path, monkeypatch):
    """EDM2's module names exist while pickling (as they do on NVIDIA's machines) and are gone before reading;
    anything that runs the embedded source or the reconstructor writes a marker."""
    marker = tmp_path / "EXECUTED"
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        marker.write_text("reconstructor ran")
        raise AssertionError("the persistence reconstructor ran")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        pass
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict
    for name, mod in {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                      "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    src = f"open({str(marker)!r}, 'w').write('module source ran')\n"
    yield types.SimpleNamespace(marker=marker, src=src, EasyDict=EasyDict)
    assert not marker.exists(), marker.read_text()


def write_nvidia_pickle(path, net: Precond, ns, label_dim=10, extra_kwargs=None, encoder="StandardRGBEncoder",
                        top=None):
    kw = {"img_resolution": net.img_resolution, "img_channels": net.img_channels, "label_dim": label_dim,
          "use_fp16": True, "sigma_data": 0.5, "logvar_channels": 128, **NET, "dropout": 0.0, "label_balance": 0.5,
          "concat_balance": 0.5, "res_balance": 0.3, "clip_act": 256, "channel_mult_noise": None,
          "channel_mult_emb": None, "resample_filter": [1, 1], "attn_balance": 0.3, **(extra_kwargs or {})}
    data = ns.EasyDict(ema=_nvidia_tree(net, ns.src, kw),
                       encoder=_Persistent(encoder, {"init_kwargs": {}}, ns.src), **(top or {}))
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def our_net(label_dim=10, seed=0):
    torch.manual_seed(seed)
    cfg = C.resolve({}, {"data.resolution": 16, **{f"network.{k}": v for k, v in NET.items()}})
    net = build_network(cfg, 16, 1, label_dim)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)                # not the zero-initialised gains
    return net


def _forget(*names):
    for n in names:
        sys.modules.pop(n, None)


def test_released_model_imports_without_running_code_and_equals_the_network(tmp_path, nvidia_modules):
    net = our_net()
    src = write_nvidia_pickle(tmp_path / "edm2-img16-xs-2147483-0.135.pkl", net, nvidia_modules)
    _forget("torch_utils.persistence", "dnnlib.util")      # reading must not need (or import) them
    out = tmp_path / "imported"
    [dst] = import_files([src], out, log=lambda *_: None)
    assert dst.name == "ema-2147483648-0.135.safetensors"   # kimg 2147483 -> 2^31 images
    from pipeline.generation import load_model
    model, meta = load_model(dst)
    assert meta["source_file"] == src.name and len(meta["source_sha256"]) == 64
    assert meta["sigma_rel"] == 0.135 and meta["net_args"] == {"img_resolution": 16, "img_channels": 1, "label_dim": 10}
    want = {k: v.half().float() for k, v in net.state_dict().items()}
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    x, sigma = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 3.0])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 7]), 10).float()
    ref = our_net()
    ref.load_state_dict(want)
    with torch.no_grad():
        assert torch.equal(model(x, sigma, labels), ref.eval()(x, sigma, labels))


def test_raw_snapshots_import_and_reconstruct(tmp_path, nvidia_modules):
    """NVIDIA's raw snapshots (two EMA lengths, every 1024 images here) go through the reconstruct stage."""
    folder = tmp_path / "nvidia"
    folder.mkdir()
    for i, kimg in enumerate((1, 2, 3)):                  # nimg 1024, 2048, 3072
        for j, std in enumerate((0.050, 0.100)):
            write_nvidia_pickle(folder / f"network-snapshot-{kimg:07d}-{std:.3f}.pkl", our_net(seed=10 * i + j),
                                nvidia_modules, top={"loss_fn": _Persistent("EDM2Loss", {"P_mean": -0.4, "P_std": 1.0,
                                                                                          "sigma_data": 0.5},
                                                                            nvidia_modules.src)})
    _forget("torch_utils.persistence", "dnnlib.util")
    out = tmp_path / "snapshots"
    written = import_files([folder], out, log=lambda *_: None)
    assert sorted(p.name for p in written)[:2] == ["phema-0000001024-0.050.safetensors",
                                                    "phema-0000001024-0.100.safetensors"]
    from pipeline.reconstruction import reconstruct
    from pipeline.snapshots import check_reconstruction
    summary = reconstruct(out, [0.07], out_dir=tmp_path / "ema")
    meta = check_reconstruction(tmp_path / "ema" / "ema-0000003072-0.070.safetensors")
    assert meta["config"]["loss"]["P_mean"] == -0.4 and meta["config"]["loss"]["P_std"] == 1.0   # how it was trained
    assert summary["target_nimg"] == 3072 and (tmp_path / "ema" / "ema-0000003072-0.070.safetensors").is_file()


@pytest.mark.parametrize("case,needle", [
    ("unknown-class", "class 'Sneaky'"),
    ("other-callable", "posix.system"),
    ("bad-kwargs", "channel_mult_emb=8"),
    ("truncated", "truncated"),
])
def test_refused_in_one_line(tmp_path, nvidia_modules, case, needle):
    path = tmp_path / "edm2-img16-xs-0000001-0.100.pkl"
    if case == "unknown-class":
        write_nvidia_pickle(path, our_net(), nvidia_modules, top={"extra": _Persistent("Sneaky", {}, nvidia_modules.src)})
    elif case == "other-callable":
        class Evil:
            def __reduce__(self):
                import os
                return os.system, (f"touch {nvidia_modules.marker}",)
        write_nvidia_pickle(path, our_net(), nvidia_modules, top={"evil": Evil()})
    elif case == "bad-kwargs":
        write_nvidia_pickle(path, our_net(), nvidia_modules, extra_kwargs={"channel_mult_emb": 8})
    else:
        write_nvidia_pickle(path, our_net(), nvidia_modules)
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    _forget("torch_utils.persistence", "dnnlib.util")
    with pytest.raises(NvidiaImportError) as err:
        import_files([path], tmp_path / "out", log=lambda *_: None)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_reader_refuses_files_that_are_not_networks(tmp_path):
    p = tmp_path / "x.pkl"
    p.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(NvidiaImportError, match="holds no EDM2 network"):
        read_pickle(p)
    torch.save({"a": torch.zeros(2)}, tmp_path / "t.pkl")      # a zip file, not a pickle stream
    with pytest.raises(NvidiaImportError, match="torch.save file"):
        read_pickle(tmp_path / "t.pkl")
    (tmp_path / "e.pkl").write_bytes(b"")
    with pytest.raises(NvidiaImportError, match="not a readable pickle, or truncated"):
        read_pickle(tmp_path / "e.pkl")


def test_damaged_files_end_in_the_reader_error(tmp_path, nvidia_modules):
    """Bytes of a real EDM2-layout file flipped or cut anywhere: a one-line NvidiaImportError or a clean read,
    never another exception, and nothing runs (the fixture checks the marker)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    good = write_nvidia_pickle(tmp_path / "edm2-img16-xs-0000001-0.100.pkl", our_net(), nvidia_modules).read_bytes()
    _forget("torch_utils.persistence", "dnnlib.util")

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), min_size=1, max_size=4),
           st.integers(1, len(good)))
    def check(flips, cut):
        data = bytearray(good[:cut])
        for pos, val in flips:
            if pos < len(data):
                data[pos] = val
        f = tmp_path / "damaged.pkl"
        f.write_bytes(bytes(data))
        try:
            read_pickle(f)
        except NvidiaImportError as err:
            assert "\n" not in str(err)
    check()


NVIDIA_STRUCTURE = {"channel_mult": [1, 2, 3, 4], "num_blocks": 3, "attn_resolutions": [16, 8],
                    "channels_per_head": 64, "attention_heads": "floor"}     # NVIDIA's defaults, written out


def nvidia_net(model_channels=40, res=16, channels=3, label_dim=10, seed=0):
    """A network of NVIDIA's default layout (with 40 channels: no head at 16x16, one floored head of 80
    channels at 8x8, two at the 2x2 bottleneck), random weights."""
    torch.manual_seed(seed)
    cfg = C.resolve({}, {"data.resolution": res, "data.channels": 3 if channels == 3 else 1,
                         "network.model_channels": model_channels,
                         **{f"network.{k}": v for k, v in NVIDIA_STRUCTURE.items()}})
    net = build_network(cfg, res, channels, label_dim)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def write_as_nvidia(path, net, ns, passed, encoder="StandardRGBEncoder", top=None):
    """The pickle train_edm2.py + training_loop.py write: `passed` is all the init arguments it records."""
    data = ns.EasyDict(ema=_nvidia_tree(net, ns.src, passed), encoder=_Persistent(encoder, {"init_kwargs": {}}, ns.src),
                       **(top or {}))
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def _reference_output(src, recorded, model, label_dim, channels=3, res=16):
    """The imported model's D(x; sigma) against NVIDIA's definition evaluated on the pickle's own tensors."""
    from pipeline.nvidia import module_tensors, read_pickle
    tensors = module_tensors(read_pickle(src)["ema"])
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(3, channels, res, res, generator=g) * 2, torch.tensor([0.02, 0.7, 30.0])
    labels = torch.eye(label_dim)[torch.tensor([1, 7, 3])] if label_dim else None
    with torch.no_grad():
        want = nvidia_reference.denoiser(tensors, recorded, x, sigma, labels)
        got = model(x, sigma, labels)
    return got, want


def test_released_model_as_nvidia_writes_it_gets_nvidias_defaults(tmp_path, nvidia_modules):
    net = nvidia_net()
    passed = {"img_resolution": 16, "img_channels": 3, "label_dim": 10, "model_channels": 40, "dropout": 0.0,
              "use_fp16": True}
    src = write_as_nvidia(tmp_path / "edm2-img16-xs-2147483-0.135.pkl", net, nvidia_modules, passed)
    _forget("torch_utils.persistence", "dnnlib.util")
    [dst] = import_files([src], tmp_path / "out", log=lambda *_: None)
    from pipeline.generation import load_model
    model, meta = load_model(dst)
    assert meta["config"]["network"]["channel_mult"] == [1, 2, 3, 4] and meta["config"]["network"]["num_blocks"] == 3
    assert meta["config"]["network"]["channels_per_head"] == 64 and meta["nvidia_init_kwargs"] == passed
    assert "4bf8162" in meta["nvidia_defaults_from"]
    got, want = _reference_output(src, passed, model, 10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_channels_per_head_left_out_is_nvidias_64(tmp_path, nvidia_modules):
    """Shapes do not show the head count: a file that records the layout but not channels_per_head must get
    NVIDIA's 64, not this project's 32 (which imported silently with other heads before)."""
    net = nvidia_net(model_channels=64)
    passed = {"img_resolution": 16, "img_channels": 3, "label_dim": 10, "model_channels": 64,
              "channel_mult": [1, 2, 3, 4], "num_blocks": 3, "attn_resolutions": [16, 8]}
    src = write_as_nvidia(tmp_path / "edm2-img16-s-0000002-0.100.pkl", net, nvidia_modules, passed)
    _forget("torch_utils.persistence", "dnnlib.util")
    [dst] = import_files([src], tmp_path / "out", log=lambda *_: None)
    from pipeline.generation import load_model
    model, _ = load_model(dst)
    got, want = _reference_output(src, passed, model, 10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    from pipeline.nvidia import module_tensors, read_pickle
    heads_32 = nvidia_reference.denoiser(module_tensors(read_pickle(src)["ema"]), {**passed, "channels_per_head": 32},
                                         torch.ones(1, 3, 16, 16), torch.tensor([1.0]), torch.eye(10)[:1])
    with torch.no_grad():
        ours = model(torch.ones(1, 3, 16, 16), torch.tensor([1.0]), torch.eye(10)[:1])
    assert (heads_32 - ours).abs().max() > 1e-5        # other heads show in the output (rounding is ~1e-7)


def test_latent_snapshots_as_nvidia_writes_them_and_names_by_flag(tmp_path, nvidia_modules):
    """Raw snapshots of a latent run (4 channels, unconditional, StabilityVAEEncoder, the loss recording only
    P_mean/P_std) import with NVIDIA's defaults and reconstruct; a file named otherwise takes --kimg/--sigma-rel."""
    folder = tmp_path / "nvidia"
    folder.mkdir()
    passed = {"img_resolution": 16, "img_channels": 4, "label_dim": 0, "model_channels": 40, "dropout": 0.0,
              "use_fp16": True}
    loss = _Persistent("EDM2Loss", {"P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5,
                                    "_init_kwargs": {"P_mean": -0.4, "P_std": 1.0}}, nvidia_modules.src)
    for i, kimg in enumerate((1, 2)):
        for j, std in enumerate((0.050, 0.100)):
            write_as_nvidia(folder / f"network-snapshot-{kimg:07d}-{std:.3f}.pkl", nvidia_net(channels=4, label_dim=0,
                            seed=10 * i + j), nvidia_modules, passed, encoder="StabilityVAEEncoder", top={"loss_fn": loss})
    other = write_as_nvidia(tmp_path / "my-export.pkl", nvidia_net(channels=4, label_dim=0, seed=5), nvidia_modules,
                            passed, encoder="StabilityVAEEncoder")
    _forget("torch_utils.persistence", "dnnlib.util")
    written = import_files([folder], tmp_path / "snaps", log=lambda *_: None)
    assert len(written) == 4
    from pipeline.reconstruction import reconstruct
    from pipeline.snapshots import check_reconstruction
    reconstruct(tmp_path / "snaps", [0.07], out_dir=tmp_path / "ema")
    meta = check_reconstruction(tmp_path / "ema" / "ema-0000002048-0.070.safetensors")
    assert meta["config"]["data"]["encoder"] == "vae" and meta["config"]["network"]["channel_mult"] == [1, 2, 3, 4]
    assert meta["config"]["loss"]["P_mean"] == -0.4
    with pytest.raises(NvidiaImportError, match="give --kimg and --sigma-rel"):
        import_files([other], tmp_path / "m", log=lambda *_: None)
    [dst] = import_files([other], tmp_path / "m", kimg=3, sigma_rel=0.12, log=lambda *_: None)
    assert dst.name == "ema-0000003072-0.120.safetensors"
    from pipeline.generation import load_model
    model, _ = load_model(dst)
    got, want = _reference_output(other, passed, model, 0, channels=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(NvidiaImportError, match="its name says kimg 1, --kimg says 5"):
        import_files([folder / "network-snapshot-0000001-0.050.pkl"], tmp_path / "n", kimg=5, log=lambda *_: None)


@pytest.mark.parametrize("kwargs,needle", [
    ({"channel_mult": []}, "channel_mult=[] is not a non-empty list of positive integers"),
    ({"channel_mult": 3}, "channel_mult=3 is not a non-empty list"),
    ({"sigma_data": "0.5"}, "sigma_data='0.5' is not a positive number"),
    ({"use_fp16": {1, 2}}, "use_fp16={1, 2} is not a boolean"),
    ({"img_resolution": 32.7}, "img_resolution=32.7 is not a positive integer"),
    ({"img_resolution": "32"}, "img_resolution='32' is not a positive integer"),
    ({"clip_act": None}, "clip_act=None (activations are always clipped here"),
    ({"num_blocks": 10 ** 6}, "network.num_blocks=1000000: must be <= 64"),
    ({"model_channels": 100000}, "network.model_channels=100000: must be <= 65536"),
    ({"model_channels": 64000}, "float32 copies need"),
])
def test_recorded_arguments_are_typed_and_bounded(tmp_path, nvidia_modules, kwargs, needle):
    import time
    passed = {"img_resolution": 16, "img_channels": 3, "label_dim": 10, "model_channels": 40, **kwargs}
    src = write_as_nvidia(tmp_path / "edm2-img16-xs-0000001-0.100.pkl", nvidia_net(), nvidia_modules, passed)
    _forget("torch_utils.persistence", "dnnlib.util")
    start = time.monotonic()
    with pytest.raises(NvidiaImportError) as err:
        import_files([src], tmp_path / "out", log=lambda *_: None)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert time.monotonic() - start < 30                  # refused before building anything large


def _module_chain(ns, depth, shared=True):
    """A pickle whose modules nest `depth` levels, each level holding the next twice (a DAG of 2^depth paths)."""
    leaf = _Persistent("MPConv", {"_parameters": {"weight": torch.zeros(1)}, "_modules": {}}, ns.src)
    node = leaf
    for _ in range(depth):
        node = _Persistent("Block", {"_parameters": {}, "_modules": {"a": node, "b": node if shared else leaf}}, ns.src)
    return node


@pytest.mark.parametrize("case,needle", [
    ("shared-64-deep", "appears twice in the module tree"),
    ("deep", "nested deeper than 64 levels"),
    ("modules-a-list", "_modules is a list, not a mapping"),
    ("parameters-a-string", "_parameters is a str, not a mapping"),
    ("complex-tensor", "is complex64: EDM2's networks hold floating-point tensors only"),
    ("int-tensor", "is int32"),
    ("bool-tensor", "is bool"),
])
def test_crafted_module_trees_are_refused_quickly(tmp_path, nvidia_modules, case, needle):
    import time

    from pipeline.nvidia import module_tensors, read_pickle
    ns = nvidia_modules
    state = {"_parameters": {}, "_modules": {}}
    if case == "shared-64-deep":
        state["_modules"] = {"unet": _module_chain(ns, 40)}
    elif case == "deep":
        state["_modules"] = {"unet": _module_chain(ns, 80, shared=False)}
    elif case == "modules-a-list":
        state["_modules"] = {"unet": _Persistent("UNet", {"_modules": [1, 2]}, ns.src)}
    elif case == "parameters-a-string":
        state["_modules"] = {"unet": _Persistent("UNet", {"_parameters": "weights"}, ns.src)}
    else:
        dtype = {"complex-tensor": torch.complex64, "int-tensor": torch.int32, "bool-tensor": torch.bool}[case]
        state["_parameters"] = {"w": torch.zeros(3, dtype=dtype)}
    path = tmp_path / "edm2-img16-xs-0000001-0.100.pkl"
    with open(path, "wb") as f:
        pickle.dump(ns.EasyDict(ema=_Persistent("Precond", state, ns.src)), f)
    _forget("torch_utils.persistence", "dnnlib.util")
    start = time.monotonic()
    with pytest.raises(NvidiaImportError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        module_tensors(read_pickle(path)["ema"])
    assert time.monotonic() - start < 10


def test_a_self_referencing_module_is_refused(tmp_path, nvidia_modules):
    """A torch container (pickled by reference, state set after creation) can hold itself."""
    from pipeline.nvidia import module_tensors, read_pickle
    box = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
    box.__dict__.update({"_parameters": {}, "_buffers": {}, "_modules": {}})
    box.__dict__["_modules"]["again"] = box
    path = tmp_path / "loop.pkl"
    with open(path, "wb") as f:
        pickle.dump(nvidia_modules.EasyDict(ema=_Persistent("Precond", {"_modules": {"unet": box}}, nvidia_modules.src)), f)
    _forget("torch_utils.persistence", "dnnlib.util")
    with pytest.raises(NvidiaImportError, match="unet.again appears twice"):
        module_tensors(read_pickle(path)["ema"])


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_nvidia_seeding_reproduces_generate_images(churn):
    """sampler.seeding=nvidia gives generate_images.py's images and class labels for the same seeds (its
    definition restated in nvidia_reference, on the CPU); the default stays the portable float64 stream."""
    from pipeline.edm import class_labels, sample_images
    net = our_net().eval()
    cfg = C.resolve({}, {"sampler.steps": 4, "sampler.churn": churn, "sampler.S_min": 0.05, "sampler.S_max": 50.0,
                         "sampler.seeding": "nvidia"})
    seeds = [0, 7, 2 ** 32 + 7, 123456]                    # seed mod 2^32, as NVIDIA seeds its generators

    def denoise(x, t, labels):
        return net(x, t.reshape(1).expand(x.shape[0]), labels)
    with torch.no_grad():
        want, want_labels = nvidia_reference.generate(denoise, seeds, (1, 16, 16), 10, steps=4, churn=churn,
                                                      S_min=0.05, S_max=50.0)
        got = sample_images(net, seeds, None, cfg.sampler)
        labels = class_labels(seeds, 10, cfg.sampler, (1, 16, 16))
        again = sample_images(net, seeds, torch.eye(10)[labels], cfg.sampler)   # labels given: the same stream
    assert torch.equal(labels, want_labels) and torch.equal(got, again)
    assert torch.equal(got[1], got[2])                     # 7 and 2^32 + 7 are one generator seed
    if churn == 0:
        assert torch.equal(got, want)
    else:                                                  # t + gamma t vs t (1 + gamma): rounding apart
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    portable = sample_images(net, seeds, torch.eye(10)[labels], cfg.sampler.model_copy(update={"seeding": "portable"}))
    assert (portable - got).abs().max() > 0.1              # another stream: other images
