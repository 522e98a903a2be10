"""FID costs: Inception feature extraction (images/s, clean-fid resize included) and the Frechet
distance on 2048-d statistics: eigen route against scipy's sqrtm (clean-fid's)."""
from __future__ import annotations

import time

import numpy as np

from benchmarks.common import parser, write
from pipeline.fid import array_features, frechet_distance, load_feature_net


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--skip-scipy", action="store_true", help="do not time scipy sqrtm (17 s on 2 cores)")
    args = p.parse_args(argv)
    feat = load_feature_net("auto", args.device)
    n = 4 if args.smoke else args.images
    imgs = np.random.default_rng(0).integers(0, 255, (n, 32, 32, 1), dtype=np.uint8)
    array_features(imgs[:2], feat)                    # warm-up
    t = time.perf_counter()
    array_features(imgs, feat, batch_size=32)
    ips = n / (time.perf_counter() - t)
    dim = 64 if args.smoke else 2048
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(dim + 500, dim)), rng.normal(size=(dim + 500, dim)) * 1.1
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu1, mu2 = a.mean(0), b.mean(0)
    t = time.perf_counter()
    ours = frechet_distance(mu1, s1, mu2, s2)
    eig = time.perf_counter() - t
    figures = {"feature_net": feat.name, "feature_images_per_s": round(ips, 2), "dim": dim,
               "frechet_eigen_s": round(eig, 3)}
    if not args.skip_scipy:
        from cleanfid.fid import frechet_distance as scipy_fd
        t = time.perf_counter()
        theirs = scipy_fd(mu1, s1, mu2, s2)
        figures.update(frechet_scipy_sqrtm_s=round(time.perf_counter() - t, 3), abs_difference=abs(ours - theirs))
    write("fid", args, figures)


if __name__ == "__main__":
    main()
