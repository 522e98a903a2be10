"""Image grids: the one helper training, evaluation and the reports share (kept apart from the report
module so the train stage does not depend on figure code)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def save_image_grid(images: np.ndarray, path: str | Path, cols: int | None = None, min_size: int = 96) -> Path:
    """N x H x W x C uint8 images -> one PNG grid; small images are enlarged (nearest neighbour, by a
    whole factor) to at least min_size pixels so the full-size grid is worth opening."""
    from PIL import Image
    scale = max(1, min_size // images.shape[1])
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * h, cols * w, c), 255, dtype=np.uint8)    # unfilled cells white, not black
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = im
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path
