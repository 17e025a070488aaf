"""Perceptual image metrics: ST-LPIPS (AlexNet / VGG), SSIM and MS-SSIM.

**Input contract (all functions):** float tensors ``[B, 3, H, W]`` with values in **[0, 1]**
(RGB). Anything else — uint8-range values (0–255), [-1, 1] tensors, wrong shapes — raises
:class:`ValueError` naming the problem instead of returning a silently wrong number (the most
common way LPIPS and SSIM get misused).

* **ST-LPIPS** (shift-tolerant LPIPS, Ghildyal & Liu, ECCV 2022) from the PyPI package
  ``stlpips-pytorch``, which ships its AlexNet and VGG weights. Lower = more similar; 0 for
  identical images. Images are mapped to [-1, 1] internally (what LPIPS expects).
* **SSIM** with ``data_range=1.0`` (because inputs are [0, 1]), an 11-pixel Gaussian window (σ 1.5).
  Higher = more similar; 1 for identical images.
* **MS-SSIM** with ``data_range=1.0`` and the standard five scale weights. Five scales need the
  smaller side to exceed ``(win - 1) * 16``: images under 161 px use a 3-pixel window (σ 1.5),
  so 64×64 stickers are scored at 64, 32, 16, 8 and 4 px.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from typing import Iterator

import torch

from pmgen.data.images import check_images

LPIPS_NETS = ("alex", "vgg")


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = check_images(a, "first images"), check_images(b, "second images")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"image sizes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        if a.shape[0] == 1:
            a = a.expand_as(b)
        elif b.shape[0] == 1:
            b = b.expand_as(a)
        else:
            raise ValueError(f"batch sizes differ: {a.shape[0]} vs {b.shape[0]} (one of them may be 1)")
    return a, b


@contextlib.contextmanager
def _absent_modules_stubbed(names: tuple[str, ...]) -> Iterator[None]:
    """Make ``import name`` succeed for modules that are not installed, only while the block runs.

    ``stlpips_pytorch`` imports torchvision, torchsummary and IPython at module load time but its
    shift-tolerant networks never use them; torchvision cannot even be installed beside this CPU
    torch. Empty placeholder modules are registered for the import and removed afterwards; an
    installed module is never replaced.
    """
    added = []
    for name in names:
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        stub = types.ModuleType(name)
        stub.__dict__["__pmgen_stub__"] = True
        if name == "torchvision":
            stub.models = types.ModuleType("torchvision.models")  # type: ignore[attr-defined]
            sys.modules["torchvision.models"] = stub.models  # type: ignore[attr-defined]
            added.append("torchvision.models")
        if name == "torchsummary":
            stub.summary = lambda *a, **k: None  # type: ignore[attr-defined]
        if name == "IPython":
            stub.embed = lambda *a, **k: None  # type: ignore[attr-defined]
        sys.modules[name] = stub
        added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


class STLPIPS(torch.nn.Module):
    """Shift-tolerant LPIPS distance. ``net`` is ``"alex"`` or ``"vgg"`` (weights ship in the package).

    ``forward(a, b)`` → ``[B]`` distances for images in [0, 1] (see the module docstring).
    """

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"net must be one of {LPIPS_NETS}, got {net!r}")
        with _absent_modules_stubbed(("torchvision", "torchsummary", "IPython")):
            mod = importlib.import_module("stlpips_pytorch.stlpips")
        with contextlib.redirect_stdout(None):
            self.inner = mod.LPIPS(net=net, variant="shift_tolerant", verbose=False)
        self.inner.eval().requires_grad_(False)
        self.net = net

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        a, b = _pair(a, b)
        return self.inner(a * 2 - 1, b * 2 - 1).flatten()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM per image ``[B]`` (data range 1.0, 11-px Gaussian window, σ 1.5)."""
    from pytorch_msssim import ssim as _ssim

    a, b = _pair(a, b)
    return _ssim(a, b, data_range=1.0, size_average=False)


def ms_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MS-SSIM per image ``[B]`` (data range 1.0, five scales; 3-px window below 161 px)."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    a, b = _pair(a, b)
    win = 11 if min(a.shape[-2:]) > 160 else 3
    if min(a.shape[-2:]) <= (win - 1) * 16:
        raise ValueError(f"MS-SSIM needs images larger than {(win - 1) * 16} px, got {tuple(a.shape[-2:])}")
    return _ms_ssim(a, b, data_range=1.0, size_average=False, win_size=win)
