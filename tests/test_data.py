"""Dataset sources, resolution/channel handling, the encoded artifact and its loader (method.md 7)."""
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import config as C
from pipeline.data import (DataError, EncodedDataset, decode_pixels, encode_dataset, encode_pixels, find_fashion_mnist,
                           read_idx, FMNIST_FILES)


def test_fashion_mnist_counts_labels_and_stable_hash(fmnist, root, tmp_path):
    train_dir, m = fmnist["train"]
    test_dir, mt = fmnist["test"]
    assert (m["count"], mt["count"]) == (60000, 10000)
    assert m["shape"] == [1, 32, 32] and m["dtype"] == "uint8" and m["label_count"] == 10
    ds = EncodedDataset(train_dir)
    assert np.bincount(np.asarray(ds.labels), minlength=10).tolist() == [6000] * 10
    assert np.bincount(np.asarray(EncodedDataset(test_dir).labels), minlength=10).tolist() == [1000] * 10
    # Padding 28 -> 32 keeps the original pixels in the centre and zeros around them.
    raw, labels = read_idx(*(find_fashion_mnist(None, root / "data/raw") / f for f in FMNIST_FILES["train"]))
    assert np.array_equal(ds.images[:50, 0, 2:30, 2:30], raw[:50])
    assert ds.images[:, :, :2].max() == 0 and ds.images[:, :, 30:].max() == 0
    assert np.array_equal(np.asarray(ds.labels[:100]), labels[:100])
    # Stable: encoding again gives the same sha256.
    cfg = C.load_config(root / "params.yaml", ["data.max_images=null"])
    again = encode_dataset(cfg, tmp_path / "again", "test", cache_dir=root / "data/raw", progress=False)
    assert again["sha256"] == mt["sha256"]


def test_loader_batches_pixels_and_one_hot_labels(fmnist):
    ds = EncodedDataset(fmnist["train"][0])
    x, lab = ds.get([5, 1, 3])
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(decode_pixels(x)[1], torch.from_numpy(np.array(ds.images[1])))
    assert lab.argmax(1).tolist() == [int(ds.labels[i]) for i in (5, 1, 3)]
    assert abs(encode_pixels(np.asarray(ds.images[:2000])).std().item() - 0.5) < 0.25   # near sigma_data


def test_loader_refuses_mismatch_and_corruption(fmnist, root, tmp_path):
    test_dir = fmnist["test"][0]
    cfg = C.load_config(root / "params.yaml", ["data.resolution=64", "network.attn_resolutions=[16]"])
    with pytest.raises(DataError, match="data.resolution: config 64, dataset 32"):
        EncodedDataset(test_dir, cfg)
    # A modified copy fails the sha256 check.
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("images.npy", "labels.npy", "manifest.json"):
        (bad / f).write_bytes((test_dir / f).read_bytes())
    arr = np.load(bad / "images.npy", mmap_mode="r+")
    arr[0, 0, 5, 5] ^= 1
    arr.flush()
    del arr
    with pytest.raises(DataError, match="do not match the manifest's sha256"):
        EncodedDataset(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        EncodedDataset(bad)
    with pytest.raises(DataError, match="run the encode stage"):
        EncodedDataset(tmp_path / "nothing")


def test_fashion_mnist_missing_user_folder_says_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="Fashion-MNIST not found in data.path"):
        find_fashion_mnist(tmp_path)


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
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the optional [vae] extra")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    _write_images(tmp_path / "imgs", [(f"c{i % 2}/{i}.png", (16, 16), "RGB") for i in range(6)])
    # This tiny VAE downsamples 2x (two blocks), the config's resolution is the latent one: 16 / 2 = 8.
    cfg = C.resolve({"data": {"source": "folder", "path": str(tmp_path / "imgs"), "resolution": 8, "channels": 4,
                              "resize": "resize", "encoder": "vae", "vae_path": str(tmp_path / "vae")}})
    m = encode_dataset(cfg, tmp_path / "enc", progress=False)
    assert m["encoder"] == "vae" and m["dtype"] == "float16" and m["shape"] == [8, 8, 8] and m["channels"] == 4
    ds = EncodedDataset(tmp_path / "enc", cfg)
    x1, _ = ds.get(list(range(6)), generator=torch.Generator().manual_seed(1))
    x2, _ = ds.get(list(range(6)), generator=torch.Generator().manual_seed(2))
    assert x1.shape == (6, 4, 8, 8) and not torch.equal(x1, x2)          # z drawn afresh each time
    with pytest.raises(DataError, match="no such folder"):
        encode_dataset(C.resolve({"data": {**cfg.data.model_dump(), "vae_path": str(tmp_path / "none")}}),
                       tmp_path / "enc2", progress=False)
