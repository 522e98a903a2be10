"""Dataset sources, resolution/channel handling, the encoded artifact and its loader (method.md 7)."""
import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from pipeline import config as C
from pipeline.data.encode import encode_dataset
from pipeline.data.encoded import EncodedDataset
from pipeline.data.pixels import DataError
from pipeline.data.readers import FMNIST_FILES, find_fashion_mnist


def test_fashion_mnist_missing_user_folder_says_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("something else")
    with pytest.raises(DataError, match="Fashion-MNIST not found in data.path"):
        find_fashion_mnist(tmp_path)


def test_fashion_mnist_named_folder_is_filled_when_absent(tmp_path):
    """The default params name data/raw/fashion-mnist (the encode stage's DVC dependency): filled from the
    package on first use, then read as it is."""
    d = find_fashion_mnist(tmp_path / "raw" / "fashion-mnist", cache_dir=ROOT / "data" / "raw")
    assert sorted(p.name for p in d.iterdir()) == sorted(f for pair in FMNIST_FILES.values() for f in pair)
    assert find_fashion_mnist(d) == d


def _write_images(folder, spec):
    for rel, size, mode in spec:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(len(rel))
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(p)


def test_image_folder_labels_mixed_sizes_channels_and_unreadable(tmp_path, capsys):
    src = tmp_path / "imgs"
    _write_images(src, [("cats/a.png", (40, 30), "RGB"), ("cats/b.png", (64, 64), "L"),
                        ("dogs/c.jpg", (50, 70), "RGB"), ("dogs/d.png", (16, 16), "RGB")])
    (src / "dogs" / "broken.png").write_bytes(b"not an image")
    cfg = C.resolve({"data": {"source": "folder", "path": str(src), "resolution": 16, "channels": 3,
                              "resize": "center-crop"}})
    m = encode_dataset(cfg, tmp_path / "enc", progress=False)
    assert m["count"] == 4 and m["shape"] == [3, 16, 16] and m["label_count"] == 2
    assert m["class_names"] == ["cats", "dogs"]
    assert any("skipped 1 unreadable" in n and "broken.png" in n for n in m["notes"])
    assert any("converted images with [1, 3] channels to 3" in n for n in m["notes"])
    assert any("different image sizes" in n for n in m["notes"])
    ds = EncodedDataset(tmp_path / "enc", cfg)
    assert np.asarray(ds.labels).tolist() == [0, 0, 1, 1]
    # The same folder zipped gives the same pixels.
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for p in sorted(src.rglob("*.*")):
            z.write(p, p.relative_to(src))
    cz = C.resolve({"data": {"source": "zip", "path": str(tmp_path / "imgs.zip"), "resolution": 16,
                             "channels": 3, "resize": "center-crop"}})
    mz = encode_dataset(cz, tmp_path / "encz", progress=False)
    assert np.array_equal(np.load(tmp_path / "encz/images.npy"), np.load(tmp_path / "enc/images.npy"))
    # Pad mode refuses images larger than the resolution, and says what to use instead.
    cp = C.resolve({"data": {"source": "folder", "path": str(src), "resolution": 32, "channels": 3}})
    with pytest.raises(DataError, match="larger than data.resolution=32: use data.resize"):
        encode_dataset(cp, tmp_path / "encp", progress=False)
    assert not (tmp_path / "encp").exists(), "a failed encode leaves nothing behind"


def test_unlabelled_folder_and_empty_folder(tmp_path):
    _write_images(tmp_path / "flat", [("a.png", (8, 8), "L"), ("b.png", (8, 8), "L")])
    cfg = C.resolve({"data": {"source": "folder", "path": str(tmp_path / "flat"), "resolution": 8}})
    m = encode_dataset(cfg, tmp_path / "enc", progress=False)
    assert m["label_count"] == 0 and EncodedDataset(tmp_path / "enc").get([0, 1])[1] is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no readable images"):
        encode_dataset(C.resolve({"data": {"source": "folder", "path": str(tmp_path / "empty")}}), tmp_path / "x",
                       progress=False)


def test_vae_latent_encoder_with_a_local_random_autoencoder(tmp_path):
    _tiny_vae(tmp_path)
    _write_images(tmp_path / "imgs", [(f"c{i % 2}/{i}.png", (16, 16), "RGB") for i in range(6)])
    # This tiny VAE downsamples 2x (two blocks), the config's resolution is the latent one: 16 / 2 = 8.
    cfg = C.resolve({"data": {"source": "folder", "path": str(tmp_path / "imgs"), "resolution": 8, "channels": 4,
                              "resize": "resize", "encoder": "vae", "vae_path": str(tmp_path / "vae")}})
    m = encode_dataset(cfg, tmp_path / "enc", progress=False)
    assert m["encoder"] == "vae" and m["dtype"] == "float32" and m["shape"] == [8, 8, 8] and m["channels"] == 4
    assert m["latent_convention"] == "edm2"
    ds = EncodedDataset(tmp_path / "enc", cfg)
    x1, _ = ds.get(list(range(6)), generator=torch.Generator().manual_seed(1))
    x2, _ = ds.get(list(range(6)), generator=torch.Generator().manual_seed(2))
    assert x1.shape == (6, 4, 8, 8) and not torch.equal(x1, x2)          # z drawn afresh each time
    with pytest.raises(DataError, match="no such folder"):
        encode_dataset(C.resolve({"data": {**cfg.data.model_dump(), "vae_path": str(tmp_path / "none")}}),
                       tmp_path / "enc2", progress=False)


def _edm2_folder(root, labels, n=5, size=(20, 12)):
    """A folder in EDM2's layout: shard 00000 (a folder name that is not a class) + dataset.json."""
    _write_images(root, [(f"00000/img{i:08d}.png", size, "RGB") for i in range(n)])
    if labels != "absent":
        (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def test_dataset_json_labels_take_precedence_over_folder_names(tmp_path):
    src = _edm2_folder(tmp_path / "edm2", [[f"00000/img{i:08d}.png", [6, 2, 0, 6, 9][i]] for i in range(5)])
    cfg = C.resolve({"data": {"source": "folder", "path": str(src), "resolution": 16, "channels": 3,
                              "resize": "center-crop"}})
    m = encode_dataset(cfg, tmp_path / "enc", progress=False)
    assert m["labels_from"] == "dataset.json" and m["label_count"] == 10
    assert np.load(tmp_path / "enc/labels.npy").tolist() == [6, 2, 0, 6, 9]
    # the same as a zip; {"labels": null} is unlabelled; without dataset.json the shard is one class
    with zipfile.ZipFile(tmp_path / "edm2.zip", "w") as z:
        for p in sorted(src.rglob("*.*")):
            z.write(p, p.relative_to(src).as_posix())
    mz = encode_dataset(C.resolve({"data": {"source": "zip", "path": str(tmp_path / "edm2.zip"), "resolution": 16,
                                            "channels": 3, "resize": "center-crop"}}), tmp_path / "encz", progress=False)
    assert np.load(tmp_path / "encz/labels.npy").tolist() == [6, 2, 0, 6, 9] and mz["labels_from"] == "dataset.json"
    nolab = _edm2_folder(tmp_path / "nolab", None)
    mn = encode_dataset(C.resolve({"data": {"source": "folder", "path": str(nolab), "resolution": 16, "channels": 3,
                                            "resize": "center-crop"}}), tmp_path / "encn", progress=False)
    assert mn["label_count"] == 0 and mn["labels_from"] == "none"


@pytest.mark.parametrize("labels,needle", [
    ([["00000/img00000000.png", 1], ["00000/img00000099.png", 2]], "names 1 image(s) that are not there (e.g. 00000/img00000099.png)"),
    ([["00000/img00000000.png", 1.5]], "is 1.5, not a class number"),
    ([["00000/img00000000.png", "cat"]], "is 'cat', not a class number"),
    ([["00000/img00000000.png", 1]], "has no label for 4 image(s) (e.g. 00000/img00000001.png)"),
    ([[f"00000/img{i:08d}.png", None if i else 3] for i in range(5)], "4 of 5 images have the label null"),
    ({"a": 1}, "is a dict, not a list"),
])
def test_dataset_json_that_disagrees_with_the_images_is_one_line(tmp_path, labels, needle):
    src = _edm2_folder(tmp_path / "edm2", labels)
    cfg = C.resolve({"data": {"source": "folder", "path": str(src), "resolution": 16, "channels": 3,
                              "resize": "center-crop"}})
    with pytest.raises(DataError) as err:
        encode_dataset(cfg, tmp_path / "enc", progress=False)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "enc").exists()


def test_write_edm2_dataset_round_trip(tmp_path):
    """Any source -> EDM2's layout (folder and zip) -> encoded: the same pixels and labels as encoding the
    source directly, and the layout EDM2's tool writes."""
    from pipeline.data.encode import write_edm2_dataset
    src = tmp_path / "imgs"
    _write_images(src, [("cats/a.png", (40, 30), "RGB"), ("cats/b.png", (64, 64), "L"), ("dogs/c.jpg", (50, 70), "RGB")])
    cfg = C.resolve({"data": {"source": "folder", "path": str(src), "resolution": 16, "channels": 3,
                              "resize": "adm-center-crop"}})
    r = write_edm2_dataset(cfg, tmp_path / "out", progress=False)
    assert r["count"] == 3 and sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.*")) \
        == ["00000/img00000000.png", "00000/img00000001.png", "00000/img00000002.png", "dataset.json"]
    assert json.loads((tmp_path / "out/dataset.json").read_text())["labels"][2] == ["00000/img00000002.png", 1]
    write_edm2_dataset(cfg, tmp_path / "out.zip", progress=False)
    direct = encode_dataset(cfg, tmp_path / "direct", progress=False)
    for kind, path in (("folder", tmp_path / "out"), ("zip", tmp_path / "out.zip")):
        c2 = C.resolve({"data": {"source": kind, "path": str(path), "resolution": 16, "channels": 3, "resize": "pad"}})
        m = encode_dataset(c2, tmp_path / f"enc-{kind}", progress=False)
        assert np.array_equal(np.load(tmp_path / f"enc-{kind}/images.npy"), np.load(tmp_path / "direct/images.npy"))
        assert np.load(tmp_path / f"enc-{kind}/labels.npy").tolist() == [0, 0, 1] and m["labels_from"] == "dataset.json"
    assert direct["labels_from"] == "folder names"
    with pytest.raises(DataError, match="exists"):
        write_edm2_dataset(cfg, tmp_path / "out", progress=False)


def test_adm_center_crop_halves_with_a_box_filter_then_bicubic():
    """A 200x100 image to 16: box-halved while the short side >= 32 (200x100 -> 100x50 -> 50x25), bicubic to
    a short side of 16 (32x16), then the central 16x16 square."""
    from PIL import Image as I

    from pipeline.data.pixels import to_resolution
    img = np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)
    pil = I.fromarray(img).resize((100, 50), I.BOX).resize((50, 25), I.BOX).resize((32, 16), I.BICUBIC)
    want = np.asarray(pil)[:, 8:24]
    assert np.array_equal(to_resolution(img, 16, "adm-center-crop"), want)


def test_reference_split_is_held_out_of_training_deterministically(tmp_path):
    from pipeline.data.encode import dataset_splits
    src = tmp_path / "imgs"
    _write_images(src, [(f"c{i % 2}/{'x' * (i + 1)}.png", (16, 16), "RGB") for i in range(10)])   # distinct pixels
    base = {"source": "folder", "path": str(src), "resolution": 16, "channels": 3}
    cfg = C.resolve({"data": {**base, "reference_split": 0.3, "split_seed": 5}})
    assert dataset_splits(cfg) == ["train", "reference"]
    tr = encode_dataset(cfg, tmp_path / "e/train", "train", progress=False)
    rf = encode_dataset(cfg, tmp_path / "e/reference", "reference", progress=False)
    assert (tr["count"], rf["count"]) == (7, 3) and "held-out 3 of 10 (seed 5)" in rf["source"]
    encode_dataset(C.resolve({"data": base}), tmp_path / "all", progress=False)
    whole = np.load(tmp_path / "all/images.npy")
    a, b = np.load(tmp_path / "e/train/images.npy"), np.load(tmp_path / "e/reference/images.npy")
    rows = lambda x: {r.tobytes() for r in x}
    assert len(rows(whole)) == 10 and rows(a) | rows(b) == rows(whole) and not rows(a) & rows(b)   # a partition
    again = encode_dataset(cfg, tmp_path / "e2", "reference", progress=False)
    assert again["sha256"] == rf["sha256"]                                       # the same seed, the same images
    other = encode_dataset(C.resolve({"data": {**base, "reference_split": 3, "split_seed": 6}}), tmp_path / "e3",
                           "reference", progress=False)
    assert other["count"] == 3 and other["sha256"] != rf["sha256"]
    with pytest.raises(C.ConfigError, match="a fraction below 1 or a whole number"):
        C.resolve({"data": {**base, "reference_split": 2.5}})
    with pytest.raises(DataError, match="holds out 10 of 10"):
        encode_dataset(C.resolve({"data": {**base, "reference_split": 10}}), tmp_path / "e4", "reference", progress=False)


def test_fid_reference_choices(tmp_path, capsys):
    from pipeline.fid import FIDError, reference_dataset_dir
    src = tmp_path / "imgs"
    _write_images(src, [(f"{i}.png", (16, 16), "RGB") for i in range(4)])
    base = {"source": "folder", "path": str(src), "resolution": 16, "channels": 3, "dataset_dir": str(tmp_path / "enc")}
    with pytest.raises(FIDError, match="data.source=folder: set data.reference_split"):
        reference_dataset_dir(C.resolve({"data": base}))
    with pytest.raises(FIDError, match="needs data.reference_split"):
        reference_dataset_dir(C.resolve({"data": base, "metrics": {"reference": "held-out"}}))
    assert reference_dataset_dir(C.resolve({"data": {**base, "reference_split": 1}, "metrics": {"reference": "held-out"}})) \
        == f"{tmp_path / 'enc'}/reference"
    refdir = tmp_path / "refimgs"
    _write_images(refdir, [(f"{'r' * (i + 1)}.png", (20, 20), "RGB") for i in range(3)])
    cfg = C.resolve({"data": {**base, "resize": "center-crop"}, "metrics": {"reference": str(refdir)}})
    out = reference_dataset_dir(cfg, tmp_path / "cache")
    assert EncodedDataset(out).manifest["count"] == 3 and "encoding" in capsys.readouterr().out
    assert reference_dataset_dir(cfg, tmp_path / "cache") == out and "encoding" not in capsys.readouterr().out
    _write_images(refdir, [("extra.png", (20, 20), "RGB")])                  # other contents: another cache entry
    assert reference_dataset_dir(cfg, tmp_path / "cache") != out


def _tiny_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the optional [vae] extra")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    return vae.eval()


def test_edm2_latent_convention_follows_the_formulas_exactly(tmp_path):
    """encode -> draw -> decode against EDM2's convention written out here: pixels / 255 into the encoder,
    mean and std stored in float32, z = mean + std * eps, z * scale + bias with scale = 0.5 / raw_std and
    bias = -raw_mean * scale, decode (x - bias) / scale then clamp(0, 1) * 255 to uint8."""
    from pipeline.data.latents import Decoder
    vae = _tiny_vae(tmp_path)
    _write_images(tmp_path / "imgs", [(f"c{i % 2}/{'x' * (i + 1)}.png", (16, 16), "RGB") for i in range(4)])
    cfg = C.resolve({"data": {"source": "folder", "path": str(tmp_path / "imgs"), "resolution": 8, "channels": 4,
                              "resize": "resize", "encoder": "vae", "vae_path": str(tmp_path / "vae")}})
    encode_dataset(cfg, tmp_path / "enc", progress=False)
    pixels = torch.from_numpy(np.load(encode_dataset(C.resolve({"data": {**cfg.data.model_dump(), "encoder": "pixel",
                                                                        "channels": 3, "resolution": 16}}),
                                                     tmp_path / "pix", progress=False) and tmp_path / "pix/images.npy"))
    with torch.no_grad():
        dist = vae.encode(pixels.float() / 255).latent_dist
    stored = torch.from_numpy(np.load(tmp_path / "enc/images.npy"))
    assert torch.equal(stored, torch.cat([dist.mean, dist.std], 1))
    raw_mean = torch.tensor([5.81, 3.25, 0.12, -2.15]).view(-1, 1, 1)
    raw_std = torch.tensor([4.17, 4.62, 3.71, 3.28]).view(-1, 1, 1)
    scale = 0.5 / raw_std
    bias = 0 - raw_mean * scale
    x, _ = EncodedDataset(tmp_path / "enc", cfg).get([0, 1, 2, 3], generator=torch.Generator().manual_seed(7))
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(x, (dist.mean + dist.std * eps) * scale + bias)
    decoded = Decoder(cfg.data.model_dump(), cfg.data.vae_path)(x)
    with torch.no_grad():
        want = vae.decode((x - bias) / scale).sample.clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, want)
    # data-stats: the earlier convention, kept: [-1, 1] input, float16, the dataset's own statistics
    ds_cfg = C.resolve({"data": {**cfg.data.model_dump(), "latent_convention": "data-stats"}})
    m = encode_dataset(ds_cfg, tmp_path / "enc-ds", progress=False)
    assert m["dtype"] == "float16" and m["latent_convention"] == "data-stats" and len(m["latent_stats"]["std"]) == 4


def test_nvidia_latent_dataset_is_a_source_without_re_encoding(tmp_path):
    """A latent dataset as NVIDIA's dataset tool writes it (img-mean-std-*.npy per image + dataset.json):
    read as stored, labels from dataset.json; a VAE dataset's reference split is pixels."""
    _tiny_vae(tmp_path)
    root = tmp_path / "nv"
    rng = np.random.default_rng(0)
    posts = [np.concatenate([rng.normal(size=(4, 8, 8)), rng.uniform(0.1, 1, (4, 8, 8))]).astype(np.float32)
             for _ in range(3)]
    (root / "00000").mkdir(parents=True)
    for i, a in enumerate(posts):
        np.save(root / f"00000/img-mean-std-{i:08d}.npy", a)
    (root / "dataset.json").write_text(json.dumps({"labels": [[f"00000/img-mean-std-{i:08d}.npy", i + 4]
                                                              for i in range(3)]}))
    cfg = C.resolve({"data": {"source": "folder", "path": str(root), "resolution": 8, "channels": 4,
                              "encoder": "vae", "vae_path": str(tmp_path / "vae")}})
    m = encode_dataset(cfg, tmp_path / "enc", progress=False)
    assert np.array_equal(np.load(tmp_path / "enc/images.npy"), np.stack(posts)) and m["label_count"] == 7
    assert np.load(tmp_path / "enc/labels.npy").tolist() == [4, 5, 6] and any("not re-encoded" in n for n in m["notes"])
    with pytest.raises(DataError, match="latents are 8x8, data.resolution is 16"):
        encode_dataset(C.resolve({"data": {**cfg.data.model_dump(), "resolution": 16}}), tmp_path / "e2", progress=False)
    # the reference of a VAE dataset: pixels at the VAE's input size (16 = 8 x 2 here)
    _write_images(tmp_path / "imgs", [(f"{'y' * (i + 1)}.png", (20, 20), "RGB") for i in range(4)])
    cfg2 = C.resolve({"data": {"source": "folder", "path": str(tmp_path / "imgs"), "resolution": 8, "channels": 4,
                               "resize": "resize", "encoder": "vae", "vae_path": str(tmp_path / "vae"),
                               "reference_split": 2}})
    r = encode_dataset(cfg2, tmp_path / "ref", "reference", progress=False)
    assert r["encoder"] == "pixel" and r["shape"] == [3, 16, 16] and r["count"] == 2


def test_published_folder_keeps_a_whole_copy_another_process_published_first(tmp_path):
    """Two writers of one folder (fetch, encode): the second keeps the first's copy when it is whole,
    and fails (its temp folder removed) when it is not or nobody said how to tell."""
    import shutil

    import pytest

    from pipeline.io import published_folder
    out = tmp_path / "out"
    whole = lambda d: (d / "whole").is_file()             # noqa: E731

    def theirs_first(marker: str):                       # another process renames its copy in meanwhile
        out.mkdir()
        (out / marker).write_text("theirs")

    with published_folder(out, theirs_complete=whole) as tmp:
        (tmp / "whole").write_text("ours")
        theirs_first("whole")
    assert (out / "whole").read_text() == "theirs"
    for check, theirs in ((whole, "half"), (None, "whole")):
        shutil.rmtree(out)
        with pytest.raises(OSError):
            with published_folder(out, theirs_complete=check) as tmp:
                (tmp / "whole").write_text("ours")
                theirs_first(theirs)
        assert (out / theirs).read_text() == "theirs"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]    # our temp folder removed
    with published_folder(out, replace=True) as tmp:     # replace: ours wins over an older copy
        (tmp / "whole").write_text("ours")
    assert (out / "whole").read_text() == "ours" and not (out / "half").exists()
    shutil.rmtree(out)
    out.mkdir()                                          # an empty folder is replaced by the rename itself
    with published_folder(out) as tmp:
        (tmp / "a").write_text("ours")
    assert (out / "a").read_text() == "ours"
