import pytest
import torch

from pmgen.eval.metrics import STLPIPS, check_images, ms_ssim, ssim


def sticker(seed: int) -> torch.Tensor:
    """A white 64×64 canvas with a colored disc (a sticker-like test image) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    cx, cy, r = 20 + int(torch.randint(0, 24, (1,), generator=g)), 32, 14 + seed % 5
    mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r).float()
    color = torch.rand(3, generator=g).view(3, 1, 1)
    return (1 - mask + mask * color).unsqueeze(0)


@pytest.fixture(scope="module", params=["alex", "vgg"])
def lpips(request):
    return STLPIPS(request.param)


def test_stlpips_identity_zero_and_ordering(lpips):
    a, b = sticker(0), sticker(1)
    shifted = torch.roll(a, shifts=1, dims=3)
    assert lpips(a, a).item() == pytest.approx(0.0, abs=1e-6)
    d_diff = lpips(a, b).item()
    d_shift = lpips(a, shifted).item()
    assert d_diff > 0.01
    assert d_shift < d_diff  # shift-tolerant: a 1-px shift is closer than a different image
    assert lpips(a, b).shape == (1,)


def test_stlpips_broadcast_and_batch(lpips):
    a = torch.cat([sticker(0), sticker(1), sticker(2)])
    d = lpips(sticker(0), a)
    assert d.shape == (3,) and d[0].item() == pytest.approx(0.0, abs=1e-6) and (d[1:] > 0).all()


def test_ssim_and_msssim_values():
    a, b = sticker(0), sticker(3)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
    assert ms_ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
    assert 0 < ssim(a, b).item() < 0.99
    assert 0 < ms_ssim(a, b).item() < 0.99
    noisy = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert ssim(a, noisy).item() > ssim(a, torch.zeros_like(a)).item()


@pytest.mark.parametrize("bad, message", [
    (torch.full((1, 3, 64, 64), 200.0), "divide by 255"),
    (torch.full((1, 3, 64, 64), -0.5), "use (x + 1) / 2"),
    (torch.zeros(3, 64, 64), "expected shape [B, 3, H, W]"),
    (torch.zeros(1, 1, 64, 64), "expected shape [B, 3, H, W]"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "convert uint8"),
])
def test_wrong_input_is_rejected_clearly(bad, message):
    with pytest.raises(ValueError) as e:
        check_images(bad)
    assert message in str(e.value)
    with pytest.raises(ValueError):
        ssim(bad, torch.zeros(1, 3, 64, 64)) if bad.dim() == 4 and bad.shape[1] == 3 else check_images(bad)


def test_mismatched_sizes_rejected():
    with pytest.raises(ValueError, match="image sizes differ"):
        ssim(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="batch sizes differ"):
        ssim(torch.zeros(2, 3, 64, 64), torch.zeros(3, 3, 64, 64))


def test_stlpips_import_leaves_no_stub_behind():
    import sys

    STLPIPS("alex")
    assert "torchvision" not in sys.modules or not getattr(sys.modules["torchvision"], "__pmgen_stub__", False)
