"""Safe image input: size limits checked before decoding, one loader for every stage.

    >>> w, h = check_image("items/img/a.png")        # ImageError if unreadable or over the limits
    >>> x = load_image("items/img/a.png", 64)        # float [1, 3, 64, 64] in [0, 1]

Pixels are counted from the file header (Pillow reads only the header in ``Image.open``), so a
decompression bomb is refused before its pixels are decoded.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from pmgen.limits import LIMITS, Limits, check_file_size


class ImageError(ValueError):
    """An image that cannot be used: unreadable, too many pixels or bytes. The message names it."""


ImageSource = str | os.PathLike[str] | bytes


def _open(source: ImageSource, limits: Limits, name: str) -> Any:
    """Open (header only) with the byte and pixel limits checked; the caller closes it."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, bytes):
        size = len(source)
        fp: Any = io.BytesIO(source)
    else:
        try:
            size = os.stat(source).st_size
        except OSError as e:
            raise ImageError(f"cannot read image {name}: {e.strerror or e}") from None
        fp = source
    msg = check_file_size(name, size, limits.max_image_bytes, "image")
    if msg:
        raise ImageError(msg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image {name} has too many pixels ({e}); the limit is "
                         f"{limits.max_image_pixels:,} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"not a readable image: {name} ({e.__class__.__name__})") from None
    w, h = im.size
    if w * h > limits.max_image_pixels or w <= 0 or h <= 0:
        im.close()
        raise ImageError(f"image {name} is {w}x{h} = {w * h:,} pixels; the limit is {limits.max_image_pixels:,} "
                         "(e.g. 4096x4096)")
    return im


def check_image(source: ImageSource, limits: Limits = LIMITS, name: str | None = None) -> tuple[int, int]:
    """Verify that ``source`` (path or bytes) is a readable image within the limits; return ``(w, h)``.

    Raises:
        ImageError: naming the image and what is wrong.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "upload")
    im = _open(source, limits, name)
    try:
        size = im.size
        im.verify()
    except Exception as e:  # Pillow raises many types on corrupt data
        raise ImageError(f"not a readable image: {name} ({e.__class__.__name__})") from None
    finally:
        im.close()
    return size


def open_rgb(source: Any, limits: Limits = LIMITS, name: str | None = None) -> Any:
    """A path, bytes or PIL image → a decoded RGB PIL image (white behind transparency), within the limits."""
    from PIL import Image

    if isinstance(source, Image.Image):
        im = source
        if im.width * im.height > limits.max_image_pixels:
            raise ImageError(f"image is {im.width}x{im.height}; the limit is {limits.max_image_pixels:,} pixels")
    else:
        name = name or (str(source) if not isinstance(source, bytes) else "upload")
        im = _open(source, limits, name)
        try:
            im.load()
        except Exception as e:  # truncated / corrupt data
            im.close()
            raise ImageError(f"not a readable image: {name} ({e.__class__.__name__})") from None
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def load_image(image: Any, size: int, limits: Limits = LIMITS) -> torch.Tensor | None:
    """Path / bytes / PIL image / tensor → float ``[1, 3, size, size]`` in [0, 1]; ``None`` stays ``None``."""
    if image is None:
        return None
    if torch.is_tensor(image):
        x = image if image.dim() == 4 else image.unsqueeze(0)
        return torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear",
                                               antialias=True, align_corners=False) if x.shape[-1] != size else x.float()
    import numpy as np
    from PIL import Image

    im = open_rgb(image, limits).resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).unsqueeze(0).float() / 255


def save_thumbnail(source: Any, out: str | os.PathLike[str], max_side: int = 256, limits: Limits = LIMITS) -> Path:
    """Write ``source`` as a PNG no larger than ``max_side`` on either side (reports never copy inputs whole)."""
    im = open_rgb(source, limits)
    im.thumbnail((max_side, max_side))
    out = Path(out)
    im.save(out, format="PNG")
    return out


def image_path_error(path: Path) -> str | None:
    """``None`` when ``path`` is a readable image within the limits, else the reason (for validators)."""
    try:
        check_image(path)
    except ImageError as e:
        return str(e)
    return None


def check_images(x: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Validate the [0, 1] float ``[B, 3, H, W]`` contract and return ``x`` as float32."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name}: expected a torch tensor [B, 3, H, W] in [0, 1], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected shape [B, 3, H, W], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [0, 1], got {x.dtype} "
                         "(convert uint8 images with x.float() / 255)")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = " — looks like 0–255 values; divide by 255" if hi > 2 else (
            " — looks like [-1, 1] values; use (x + 1) / 2" if lo < -0.01 else "")
        raise ValueError(f"{name}: values must lie in [0, 1], got min {lo:.3g}, max {hi:.3g}{hint}")
    return x.float()
