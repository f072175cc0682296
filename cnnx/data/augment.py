"""Random augmentation of a float32 batch (N, H, W, C), vectorised over the batch.

Every call draws the same fixed sequence of per-image values from the generator it is
given, whichever operations are switched on, so a batch's augmentation depends only on the
generator's key (seed, epoch, step, shard) and reproduces anywhere.
"""
import numpy as np

BLOCK_PIXELS = 32768           # pixels augmented per block (see Augment.__call__)


def _range(value, name, centre=0.0):
    """A symmetric half-width `v` -> (centre - v, centre + v); a pair is taken as is."""
    if np.ndim(value) == 0:
        if value < 0:
            raise ValueError(f"Augment: {name} must be >= 0 or a (low, high) pair, got {value}")
        return centre - float(value), centre + float(value)
    low, high = (float(v) for v in value)
    if low > high:
        raise ValueError(f"Augment: {name} range must have low <= high, got {value}")
    return low, high


def _probability(value, name):
    if not 0 <= value <= 1:
        raise ValueError(f"Augment: {name} is a probability in [0, 1], got {value}")
    return float(value)


class Augment:
    """Augment(horizontal_flip=0.5, rotation=15, zoom=0.1, ...)(images, rng).

    horizontal_flip, vertical_flip, invert: probability per image.
    rotation: degrees, uniform in [-r, r] (or a (low, high) pair); positive turns the picture
        counter-clockwise as displayed.
    zoom: scale factor uniform in [1 - z, 1 + z] (or a pair); > 1 zooms in, < 1 zooms out.
    translation: fraction of height and width, uniform in [-t, t] each.
    contrast: factor uniform in [1 - c, 1 + c]: pixels move away from (or towards) their
        image's per-channel mean.
    invert: x -> low + high - x with value_range=(low, high) (e.g. (0, 1) after "scale");
        without value_range each image is reflected about its own min and max.
    fill_mode: what rotation, zoom out and translation show beyond the border: "nearest"
        (edge pixels) or "constant" (fill_value; 0 is the mean after "standardize").
    interpolation: "bilinear" (smooth) or "nearest" (about 3x cheaper, blockier).
    Rotation, zoom and translation form one affine map per image, sampled once.
    """

    def __init__(self, horizontal_flip=0.0, vertical_flip=0.0, rotation=0.0, zoom=0.0,
                 translation=0.0, contrast=0.0, invert=0.0, value_range=None,
                 fill_mode="nearest", fill_value=0.0, interpolation="bilinear"):
        self.horizontal_flip = _probability(horizontal_flip, "horizontal_flip")
        self.vertical_flip = _probability(vertical_flip, "vertical_flip")
        self.invert = _probability(invert, "invert")
        self.rotation = _range(rotation, "rotation")
        self.zoom = _range(zoom, "zoom", centre=1.0)
        self.translation = _range(translation, "translation")
        self.contrast = _range(contrast, "contrast", centre=1.0)
        if self.zoom[0] <= 0 or self.contrast[0] < 0:
            raise ValueError(f"Augment: zoom must stay > 0 and contrast >= 0, got zoom "
                             f"{self.zoom} and contrast {self.contrast}")
        if fill_mode not in ("nearest", "constant"):
            raise ValueError(f"Augment: fill_mode must be 'nearest' or 'constant', "
                             f"got {fill_mode!r}")
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"Augment: interpolation must be 'bilinear' or 'nearest', "
                             f"got {interpolation!r}")
        self.interpolation = interpolation
        self.value_range = value_range
        self.fill_mode = fill_mode
        self.fill_value = np.float32(fill_value)
        self._affine = (self.rotation != (0.0, 0.0) or self.zoom != (1.0, 1.0)
                        or self.translation != (0.0, 0.0))

    # what `cnnx train --augment hflip rotate ...` switches on, at the usual strengths
    NAMED = {"hflip": {"horizontal_flip": 0.5}, "vflip": {"vertical_flip": 0.5},
             "rotate": {"rotation": 15.0}, "zoom": {"zoom": 0.1},
             "translate": {"translation": 0.1}, "contrast": {"contrast": 0.2},
             "invert": {"invert": 0.2}}

    @classmethod
    def from_names(cls, names, **overrides):
        """Augment.from_names(["hflip", "rotate"]): the named operations at NAMED strengths."""
        settings = {}
        for name in names:
            if name not in cls.NAMED:
                raise ValueError(f"Augment.from_names: unknown augmentation {name!r}; "
                                 f"expected some of {', '.join(cls.NAMED)}")
            settings.update(cls.NAMED[name])
        settings.update(overrides)
        return cls(**settings)

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"Augment({fields})"

    def __call__(self, images, rng):
        """Augmented copy of float32 images (N, H, W, C); `rng` a Generator or a seed key."""
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.float32:
            raise ValueError(f"Augment expected float32 images (N, H, W, C), got "
                             f"{images.dtype} {images.shape}")
        n, height, width, _ = images.shape
        # one fixed sequence of draws: switching an operation on or off changes no other
        draws = {name: rng.random(n) for name in
                 ("hflip", "vflip", "angle", "zoom", "shift_y", "shift_x", "contrast", "invert")}
        out = np.empty_like(images)
        # a few images at a time: every temporary then stays in cache (2-3x faster than
        # whole-batch passes over 64 80x80x3 images)
        step = max(1, BLOCK_PIXELS // (height * width))
        for start in range(0, n, step):
            part = slice(start, start + step)
            out[part] = self._augment_block(images[part],
                                            {name: d[part] for name, d in draws.items()})
        return out

    def _augment_block(self, images, draws):
        out = images.copy()
        n, height, width, channels = out.shape
        flip = draws["hflip"] < self.horizontal_flip
        out[flip] = out[flip, :, ::-1]
        flip = draws["vflip"] < self.vertical_flip
        out[flip] = out[flip, ::-1]
        if self._affine:
            out = self._transform(out, draws)
        if self.contrast != (1.0, 1.0):
            factor = _uniform(draws["contrast"], self.contrast).astype(np.float32)
            column_sums = out.reshape(n, height, width * channels).sum(axis=1)    # (n, W*C)
            mean = column_sums.reshape(n, width, channels).sum(axis=1) / np.float32(
                height * width)                                                   # (n, C)
            # per image, rows of W*C values with the channel means tiled along them
            # (broadcasting over a last axis of 3 is several times slower)
            rows = out.reshape(n, height, width * channels)
            tiled = np.tile(mean, width)[:, None, :]                              # (n, 1, W*C)
            rows -= tiled
            rows *= factor[:, None, None]
            rows += tiled
        chosen = np.flatnonzero(draws["invert"] < self.invert)
        if chosen.size:
            picked = out[chosen]
            if self.value_range is not None:
                total = np.float32(sum(self.value_range))
            else:
                flat = picked.reshape(chosen.size, -1)
                total = (flat.min(axis=1) + flat.max(axis=1))[:, None, None, None]
            out[chosen] = total - picked
        return out

    def _transform(self, images, draws):
        """Rotation, zoom and translation as one inverse affine map per image."""
        n, height, width, channels = images.shape
        angle = np.deg2rad(_uniform(draws["angle"], self.rotation))          # float64, (n,)
        scale = _uniform(draws["zoom"], self.zoom)
        # output pixel (r, c) shows source pixel R(-angle) ((r, c) - shift) / scale; with
        # rows pointing down, this turns the picture counter-clockwise as displayed
        cos = (np.cos(angle) / scale).astype(np.float32)[:, None, None]          # (n, 1, 1)
        sin = (np.sin(angle) / scale).astype(np.float32)[:, None, None]
        shift_y = (_uniform(draws["shift_y"], self.translation) * height).astype(np.float32)
        shift_x = (_uniform(draws["shift_x"], self.translation) * width).astype(np.float32)
        centre_y, centre_x = np.float32((height - 1) / 2), np.float32((width - 1) / 2)
        r = (np.arange(height, dtype=np.float32) - centre_y)[None, :, None] \
            - shift_y[:, None, None]                                             # (n, H, 1)
        c = (np.arange(width, dtype=np.float32) - centre_x)[None, None, :] \
            - shift_x[:, None, None]                                             # (n, 1, W)
        # the map is separable into a row part plus a column part: one full pass each
        source_y = (cos * r + centre_y) + sin * c                                # (n, H, W)
        source_x = (centre_x - sin * r) + cos * c
        sample = _bilinear if self.interpolation == "bilinear" else _nearest
        return sample(images, source_y, source_x, self.fill_mode, self.fill_value)


def _uniform(u, bounds):
    low, high = bounds
    return low + (high - low) * u


def _bilinear(images, source_y, source_x, fill_mode, fill_value):
    """Sample images (N, H, W, C) at fractional coordinates (N, H, W) -> (N, H, W, C)."""
    n, height, width, channels = images.shape
    if fill_mode == "constant":
        outside = ((source_y < -0.5) | (source_y > height - 0.5) |
                   (source_x < -0.5) | (source_x > width - 0.5))
    source_y = np.clip(source_y, 0, height - 1)
    source_x = np.clip(source_x, 0, width - 1)
    # the top-left neighbour, kept one step inside so its bottom-right neighbour exists
    y0 = np.minimum(source_y.astype(np.intp), max(height - 2, 0))
    x0 = np.minimum(source_x.astype(np.intp), max(width - 2, 0))
    wy = source_y - y0.astype(np.float32)                                        # (N, H, W)
    wx = source_x - x0.astype(np.float32)
    step_y = width if height > 1 else 0
    step_x = 1 if width > 1 else 0
    top_left = (np.arange(n) * (height * width))[:, None, None] + y0 * width + x0  # (N, H, W)
    corners = (top_left, top_left + step_x, top_left + step_y, top_left + (step_y + step_x))
    # the four bilinear weights, shared by every channel                          (N, H, W)
    weights = ((1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx)
    out = np.empty_like(images)
    # one channel plane at a time: 1-D np.take and unbroadcast arithmetic on (N, H, W) are
    # several times faster than gathering (..., C) rows and broadcasting weights over C
    for channel in range(channels):
        plane = np.ascontiguousarray(images[..., channel]).reshape(-1)           # (N*H*W,)
        value = plane.take(corners[0])
        value *= weights[0]
        for corner, weight in zip(corners[1:], weights[1:]):
            value += plane.take(corner) * weight
        out[..., channel] = value
    if fill_mode == "constant":
        out[outside] = fill_value
    return out


def _nearest(images, source_y, source_x, fill_mode, fill_value):
    """Nearest-pixel sampling of images (N, H, W, C) at coordinates (N, H, W)."""
    n, height, width, channels = images.shape
    if fill_mode == "constant":
        outside = ((source_y < -0.5) | (source_y > height - 0.5) |
                   (source_x < -0.5) | (source_x > width - 0.5))
    y = np.clip(np.rint(source_y), 0, height - 1).astype(np.intp)
    x = np.clip(np.rint(source_x), 0, width - 1).astype(np.intp)
    index = (np.arange(n) * (height * width))[:, None, None] + y * width + x      # (N, H, W)
    out = np.empty_like(images)
    for channel in range(channels):
        out[..., channel] = np.ascontiguousarray(images[..., channel]).reshape(-1).take(index)
    if fill_mode == "constant":
        out[outside] = fill_value
    return out
