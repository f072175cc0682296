"""Running the installed `cnnx` script, and image folders of real files to feed it."""
import os
import subprocess
import sys

import numpy as np
from skimage import data as samples
from skimage import io, transform, util

CNNX = os.path.join(os.path.dirname(sys.executable), "cnnx")


def cnnx_env():
    return dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")


def cnnx(*args, cwd=None, timeout=240):
    """Run the installed `cnnx` script; returns the CompletedProcess (never raises on failure)."""
    return subprocess.run([CNNX, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=cnnx_env())


def write_image_folder(root, n_per_class=24, size=16, seed=0):
    """Two classes told apart by brightness of the left half, with noise: easy but not trivial."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(["dark_left", "bright_left"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(n_per_class):
            image = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
            if label:
                image[:, : size // 2] += 150
            io.imsave(folder / f"{i:03d}.png", image, check_contrast=False)
    return root


def write_photo_folder(root, classes, n_per_class, seed=0):
    """Photos as a user has them: JPEG and PNG crops of scikit-image's sample pictures,
    of several sizes, one sub-folder per class (`classes`: name -> sample picture name)."""
    rng = np.random.default_rng(seed)
    for name, picture in classes.items():
        pixels = getattr(samples, picture)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        folder = root / name
        folder.mkdir(parents=True)
        height, width = pixels.shape[:2]
        for i in range(n_per_class):
            crop_h, crop_w = rng.integers(height // 2, height), rng.integers(width // 2, width)
            top, left = rng.integers(0, height - crop_h), rng.integers(0, width - crop_w)
            crop = pixels[top : top + crop_h, left : left + crop_w]
            photo = util.img_as_ubyte(transform.resize(crop, (crop_h // 4, crop_w // 4)))
            suffix = "jpg" if i % 2 else "png"
            io.imsave(folder / f"{name}-{i:02d}.{suffix}", photo, check_contrast=False)
    return root
