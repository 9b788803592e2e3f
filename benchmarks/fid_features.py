"""FID arithmetic and feature extraction speed, measured in one run.

    python benchmarks/fid_features.py [--n 965] [--dim 2048] [--images 16] [--threads 2]

1. FID between two random feature sets of ``n`` (≈ the paper's images per modality) x ``dim``:
   the covariance square-root route (``scipy.linalg.sqrtm`` of a dim x dim product) against the
   sample-space route ``fid_from_features`` takes when n < dim; both values are printed, and
   must agree.
2. Inception-v3 (FID) features per second on ``images`` random 512x512 images (random weights:
   the speed does not depend on them).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=965)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from unimedvl.evaluation.features import InceptionFeatures
    from unimedvl.evaluation.fid import feature_statistics, fid_from_features, frechet_distance
    from unimedvl.evaluation.inception import InceptionV3FID

    rng = np.random.default_rng(0)
    a = rng.normal(size=(args.n, args.dim))
    b = rng.normal(0.1, 1.1, size=(args.n, args.dim))
    t = time.perf_counter()
    direct = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    t_direct = time.perf_counter() - t
    t = time.perf_counter()
    sample = fid_from_features(a, b)
    t_sample = time.perf_counter() - t

    extractor = InceptionFeatures(InceptionV3FID().eval())
    images = [Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)) for _ in range(args.images)]
    extractor(images[:2])  # warm-up
    t = time.perf_counter()
    extractor(images)
    t_feat = time.perf_counter() - t
    print(json.dumps({
        "n": args.n, "dim": args.dim,
        "fid_sqrtm": direct, "fid_sample_space": sample, "relative_difference": abs(direct - sample) / abs(direct),
        "seconds_sqrtm": round(t_direct, 3), "seconds_sample_space": round(t_sample, 3), "speedup": round(t_direct / t_sample, 1),
        "inception_images_per_s": round(args.images / t_feat, 2), "threads": args.threads,
    }, indent=1))


if __name__ == "__main__":
    main()
