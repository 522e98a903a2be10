"""Dataset sources, resolution/channel handling, the encoded artifact and its loader (method.md 7)."""
import numpy as np
from conftest import ROOT
import pytest
import torch

from pipeline import config as C
from pipeline.data.encode import encode_dataset
from pipeline.data.encoded import EncodedDataset
from pipeline.data.pixels import DataError, decode_pixels, encode_pixels
from pipeline.data.readers import FMNIST_FILES, find_fashion_mnist, read_idx


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


def test_two_processes_fetching_fashion_mnist_at_once_both_get_it(tmp_path):
    """Two stages (or test workers) fetching at once: one publishes, the other takes its complete copy."""
    import subprocess
    import sys
    code = ("import sys; from pipeline.data.readers import fetch_fashion_mnist; "
            f"print(fetch_fashion_mnist(sys.argv[1], {str(ROOT / 'data' / 'raw')!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "fm")], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(f.name for f in (tmp_path / "fm").iterdir()) == sorted(
        f for pair in FMNIST_FILES.values() for f in pair)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]       # no temp folder left behind
