"""Models and generation (method.md 5): a reconstructed model loaded checked, images generated
seeded per image (the result does not depend on the batch size) and streamed batch by batch, the
unconditional guide's check, and samples exported as NVIDIA's npz/PNG layouts.
"""
from __future__ import annotations
from pathlib import Path
import numpy as np
import torch
from .fid import FIDError


def load_model(path: str | Path, device="cpu"):
    """A Precond network from a reconstructed EMA file (safetensors; its config and build arguments in
    the header). Nothing in the file can run code; a header that describes no network of this project,
    tensors of other names, shapes or types than that network's, and non-finite values are refused in
    one line naming the file and the field or tensor."""
    from .networks import build_network
    from .snapshots import load_checked_reconstruction, network_of_header
    # format, header values, tensors against the network, finite values; the header's network checked once
    data, network = load_checked_reconstruction(path, FIDError)
    cfg, args = network if network is not None else network_of_header(data, path, FIDError)[:2]
    net = build_network(cfg, **args)
    net.load_state_dict(data["state"])
    return net.eval().to(device), data


def check_unconditional_guide(meta: dict, path: str | Path) -> None:
    """guide=unconditional is the model with the zero label: only meaningful when the run trained that
    label (train.label_dropout > 0 in its record) on a class-conditional network."""
    if not (meta.get("net_args") or {}).get("label_dim"):
        raise FIDError(f"guide=unconditional needs a class-conditional model; {Path(path).name} has no labels")
    dropout = ((meta.get("config") or {}).get("train") or {}).get("label_dropout", 0)
    if not (isinstance(dropout, (int, float)) and dropout > 0):
        raise FIDError(f"guide=unconditional needs a run trained with train.label_dropout > 0; {Path(path).name} "
                       f"was trained with label_dropout={dropout}, so its zero label was never learned")


def generate(net, num_images: int, seed: int, sampler_cfg, batch_size: int, device="cpu", progress: bool = False,
             desc: str | None = None, guide=None, decoder=None) -> np.ndarray:
    """num_images samples as one N x H x W x C uint8 array (small exports and tests; evaluations stream
    through generate_batches instead)."""
    return np.concatenate([b for _, b in generate_batches(net, num_images, seed, sampler_cfg, batch_size, device,
                                                          progress, desc, guide, decoder)])


def generate_batches(net, num_images: int, seed: int, sampler_cfg, batch_size: int, device="cpu",
                     progress: bool = False, desc: str | None = None, guide=None, decoder=None,
                     work: int | None = None):
    """Yields (seeds, B x H x W x C uint8) batch by batch: image i uses seed `seed + i` and, for a
    conditional model, class (seed + i) % label_dim (nvidia seeding: the class EDM2 draws, edm.class_labels).
    Nothing but the current batch is held. `guide`: a guiding network, or "unconditional" (the same
    network with the zero label), used with weight sampler_cfg.guidance. Batches are sampler.batch_size
    images, halved whenever the GPU runs out of memory (the images do not change). `decoder`: samples ->
    uint8 pixels (latents.Decoder: a latent model's VAE); default the pixel one. `work`: the images of the
    whole job this call is part of (the compile decision), default num_images."""
    from .edm import class_labels, sample_images
    from .data.latents import Decoder
    from .devices import compile_wanted
    decoder = decoder or Decoder({"encoder": "pixel"}, None)
    # compile: auto -> compiled when the job's images x NFE pass the break-even (a compiled network is
    # kept on `net`, so the same network's next call does not compile again)
    sampler_cfg = sampler_cfg.model_copy(update={
        "compile": compile_wanted(sampler_cfg.compile, "sample", device, (work or num_images) * sampler_cfg.nfe)})
    net = net.eval().to(device)
    unconditional = isinstance(guide, str) and guide == "unconditional"
    if unconditional and not net.label_dim:
        raise FIDError("guide=unconditional needs a class-conditional model (this one has no labels)")
    guide_net = net if unconditional else (guide.eval().to(device) if guide is not None else None)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_images, desc=desc or f"sample NFE {sampler_cfg.nfe}", unit="img", mininterval=2.0)
    i = 0
    try:
        while i < num_images:
            batch = list(range(seed + i, seed + min(i + batch_size, num_images)))
            labels = None
            if net.label_dim:
                shape = (net.img_channels, net.img_resolution, net.img_resolution)
                labels = torch.nn.functional.one_hot(class_labels(batch, net.label_dim, sampler_cfg, shape, device),
                                                     net.label_dim).float().to(device)
            try:
                x = sample_images(net, batch, labels, sampler_cfg, device=device, guide=guide_net,
                                  guide_labels=torch.zeros_like(labels) if unconditional else None)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)     # per-image seeds: the same images at any batch size
                torch.cuda.empty_cache()
                print(f"generate: out of GPU memory, sampling {batch_size} images per batch from here on")
                continue
            if not bool(torch.isfinite(x).all()):         # never quantise NaN into black images
                bad = int((~torch.isfinite(x.flatten(1))).any(dim=1).sum())
                raise FIDError(f"{desc or 'sampling'}: {bad} of {len(batch)} samples of seeds {batch[0]}-{batch[-1]} "
                               f"came out non-finite (NaN/inf) at guidance {sampler_cfg.guidance}: the model or its "
                               f"guide diverged; nothing was written")
            yield batch, decoder(x)
            i += len(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


def decoder_for(model_meta: dict, cfg, device, cache: dict | None = None):
    """How a model's samples become pixels: its header's data settings (a VAE latent model decodes with
    the VAE of data.vae_path and its convention). `cache`: decoders by those settings, so the models of
    one evaluation load the VAE once."""
    from .data.latents import Decoder
    data = (model_meta.get("config") or {}).get("data") or {}
    key = (data.get("encoder"), data.get("latent_convention"))
    cache = {} if cache is None else cache
    if key not in cache:
        cache[key] = Decoder(data, cfg.data.vae_path, device, cfg.data.dataset_dir)
    return cache[key]


def check_sample_size(header: dict, num_images: int, seed: int, out: Path) -> None:
    """Refuse, before any sampling, what cannot finish: seeds past 2^63, or images that would not fit the
    free disk under `out` (uncompressed size; they are streamed there batch by batch, never all in memory)."""
    import shutil

    from .config import SEED_LIMIT
    if seed + num_images > SEED_LIMIT:
        raise FIDError(f"--seed {seed} + --num {num_images}: the seeds must stay below 2^63")
    res, _, ch = decoded_shape(header)
    need = num_images * res * res * ch
    folder = out if out.is_dir() else out.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise FIDError(f"--num {num_images} --out {out}: {num_images} images of {res}x{res}x{ch} need "
                       f"{need / 2**20:,.1f} MiB, more than the {free / 2**20:,.1f} MiB of free disk; "
                       f"ask for fewer, or free space")


def export_samples(model_file: str | Path, num_images: int, out: str | Path, sampler_cfg, seed: int = 0,
                   batch_size: int = 64, device="cpu", guide: str | Path | None = None, progress: bool = True,
                   cfg=None) -> Path:
    """num_images samples of a reconstructed model (image i: seed `seed + i`, class (seed + i) %
    label_dim) written as PNG files `<seed>.png` into a folder, or as one .npz (images N x H x W x C
    uint8, seeds, labels). `guide`: a model file or "unconditional", with weight sampler_cfg.guidance.
    `cfg`: the params whose data.vae_path decodes a latent model's samples."""
    from PIL import Image

    from .io import check_writable
    from .snapshots import check_reconstruction
    out = Path(out)
    check_writable(out, "--out", folder=out.suffix != ".npz")
    header = check_reconstruction(model_file)
    check_sample_size(header, num_images, seed, out)
    if guide == "unconditional":
        check_unconditional_guide(header, model_file)
    net, meta = load_model(model_file, device)
    guide_net = guide if guide in (None, "unconditional") else load_model(guide, device)[0]
    batches = generate_batches(net, num_images, seed, sampler_cfg, batch_size, device, progress,
                               desc=f"sample {Path(model_file).name} NFE {sampler_cfg.nfe}", guide=guide_net,
                               decoder=decoder_for(meta, cfg, device) if cfg is not None else None)
    seeds = np.arange(seed, seed + num_images)
    labels = np.full(num_images, -1)
    if net.label_dim:
        from .edm import class_labels
        shape = (net.img_channels, net.img_resolution, net.img_resolution)
        labels = class_labels(seeds.tolist(), net.label_dim, sampler_cfg, shape, device).numpy()
    if out.suffix == ".npz":                       # streamed into the archive batch by batch
        from .io import atomic_write
        shape = (num_images, *decoded_shape(meta))
        return atomic_write(out, lambda f: _write_npz_stream(f, batches, shape, seeds, labels))
    out.mkdir(parents=True, exist_ok=True)
    for batch_seeds, images in batches:
        for im, s in zip(images, batch_seeds):
            Image.fromarray(im[..., 0] if im.shape[2] == 1 else im).save(out / f"{s:06d}.png")
    return out


def decoded_shape(meta: dict) -> tuple[int, int, int]:
    """H x W x C of a model's decoded samples (a VAE model's: 8x its latent size, RGB)."""
    args, data = meta.get("net_args") or {}, (meta.get("config") or {}).get("data") or {}
    res, ch = int(args.get("img_resolution", 0) or 0), int(args.get("img_channels", 0) or 0)
    return (res * 8, res * 8, 3) if data.get("encoder") == "vae" else (res, res, ch)


def _write_npz_stream(f, batches, shape, seeds, labels) -> None:
    """An .npz (zip of .npy) whose `images` array is written batch by batch: np.load reads it as savez's."""
    import zipfile
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("images.npy", "w", force_zip64=True) as npy:
            np.lib.format.write_array_header_1_0(npy, {"descr": "|u1", "fortran_order": False, "shape": shape})
            written = 0
            for _, images in batches:
                if tuple(images.shape[1:]) != tuple(shape[1:]):
                    raise FIDError(f"decoded images are {images.shape[1:]}, expected {shape[1:]}")
                npy.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
                written += len(images)
            if written != shape[0]:
                raise FIDError(f"{written} images written, {shape[0]} expected")
        for name, arr in (("seeds", seeds), ("labels", labels)):
            with zf.open(f"{name}.npy", "w") as g:
                np.lib.format.write_array(g, np.asarray(arr), allow_pickle=False)

