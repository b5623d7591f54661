"""Tests for model.image: CLIP preprocessing without torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.image import (
    CLIP_MEAN,
    CLIP_STD,
    expand_to_square,
    mean_background,
    preprocess_image,
    preprocess_images,
)

try:  # transformers >= 5 without torchvision: the PIL backend is what CLIPImageProcessor falls back to
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as HFClipProcessor
except ImportError:  # transformers 4.x: the slow processor
    from transformers import CLIPImageProcessor as HFClipProcessor


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image of the given PIL size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def hf_reference(img: Image.Image, size: int) -> torch.Tensor:
    """Preprocess with transformers' CLIP image processor (shortest edge, centre crop, BICUBIC)."""
    processor = HFClipProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        resample=3,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return processor(images=img, return_tensors="pt")["pixel_values"][0]


def normalised(pixels: np.ndarray) -> np.ndarray:
    """uint8 HWC pixels -> normalised float CHW, the independent way."""
    scaled = pixels.astype(np.float64) / 255.0
    return ((scaled - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)


# (50, 80) at 32: resized to 32x51; the crop offset (51 - 32) / 2 = 9.5 is floored to 9 by HF (round: 10).
@pytest.mark.parametrize(
    ("width", "height", "size"), [(50, 80, 32), (80, 50, 32), (336, 400, 336), (17, 33, 24)]
)
def test_resize_crop_matches_hf_clip_processor(width: int, height: int, size: int) -> None:
    img = random_image(width, height, seed=width * height)
    ours = preprocess_image(img, size, mode="resize_crop")
    assert ours.shape == (3, size, size)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, hf_reference(img, size), atol=1e-5, rtol=0)


def test_pad_mode_equals_hf_on_expanded_square() -> None:
    img = random_image(30, 70, seed=3)
    expected = hf_reference(expand_to_square(img, mean_background(CLIP_MEAN)), 32)
    torch.testing.assert_close(preprocess_image(img, 32, mode="pad"), expected, atol=1e-5, rtol=0)


def test_mean_background_is_llava_colour() -> None:
    assert mean_background(CLIP_MEAN) == (122, 116, 104)


@pytest.mark.parametrize(("width", "height"), [(20, 40), (40, 20)])
def test_expand_to_square_centres_original_between_mean_bands(width: int, height: int) -> None:
    img = random_image(width, height, seed=1)
    square = expand_to_square(img, mean_background())
    assert square.size == (40, 40)
    arr = np.asarray(square)
    original = np.asarray(img)
    if width < height:
        left, middle, right = arr[:, :10], arr[:, 10:30], arr[:, 30:]
    else:
        left, middle, right = arr[:10], arr[10:30], arr[30:]
    np.testing.assert_array_equal(middle, original)
    for band in (left, right):
        assert (band == np.array(mean_background(), dtype=np.uint8)).all()


def test_expand_to_square_keeps_square_and_floors_odd_padding() -> None:
    square = random_image(16, 16)
    assert expand_to_square(square, (0, 0, 0)) is square
    padded = np.asarray(expand_to_square(random_image(21, 40), (0, 0, 0)))
    assert padded.shape == (40, 40, 3)
    np.testing.assert_array_equal(padded[:, 9:30], np.asarray(random_image(21, 40)))  # left pad = 19 // 2


def test_pad_mode_output_has_mean_bands_and_original_centre() -> None:
    img = random_image(20, 40, seed=2)
    out = preprocess_image(img, 40, mode="pad").numpy()  # already 40 on the short side: no resampling
    assert out.shape == (3, 40, 40)
    background = np.broadcast_to(np.array(mean_background(), dtype=np.uint8), (40, 10, 3))
    np.testing.assert_allclose(out[:, :, :10], normalised(background), atol=1e-5)
    np.testing.assert_allclose(out[:, :, 30:], normalised(background), atol=1e-5)
    np.testing.assert_allclose(out[:, :, 10:30], normalised(np.asarray(img)), atol=1e-5)
    # the mean-colour bands normalise to within one grey level (int() truncation) of zero
    assert np.abs(out[:, :, :10]).max() < 1 / 255 / min(CLIP_STD)


@pytest.mark.parametrize("image_mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_non_rgb_modes_are_converted(image_mode: str) -> None:
    img = random_image(24, 40).convert(image_mode)
    for mode in ("pad", "resize_crop"):
        out = preprocess_image(img, 16, mode=mode)
        assert out.shape == (3, 16, 16)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_grayscale_channels_share_pixel_values() -> None:
    out = preprocess_image(random_image(24, 24).convert("L"), 24, mode="resize_crop")
    pixels = out * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
    torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[0], pixels[2], atol=1e-5, rtol=0)


def test_transparency_is_composited_on_white() -> None:
    rgb = random_image(20, 20)
    opaque, clear = rgb.copy(), rgb.copy()
    opaque.putalpha(255)
    clear.putalpha(0)
    torch.testing.assert_close(preprocess_image(opaque, 20), preprocess_image(rgb, 20))
    white = Image.new("RGB", (20, 20), (255, 255, 255))
    torch.testing.assert_close(preprocess_image(clear, 20), preprocess_image(white, 20))


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    from model.image import to_rgb

    grey16 = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    assert np.asarray(to_rgb(grey16)).mean() == 40000 >> 8


def test_preprocess_images_batches() -> None:
    images = [random_image(50, 80), random_image(80, 50).convert("L"), random_image(33, 33)]
    batch = preprocess_images(images, 32, mode="pad")
    assert batch.shape == (3, 3, 32, 32)
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch[1], preprocess_image(images[1], 32, mode="pad"))
    assert preprocess_images([], 32).shape == (0, 3, 32, 32)


def test_custom_mean_and_std_are_used() -> None:
    img = random_image(8, 8)
    out = preprocess_image(img, 8, mode="resize_crop", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    expected = torch.from_numpy(np.asarray(img).astype(np.float32).transpose(2, 0, 1)) / 127.5 - 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_errors_are_clear() -> None:
    img = random_image(8, 8)
    with pytest.raises(ValueError, match="unknown image preprocessing mode"):
        preprocess_image(img, 8, mode="stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be positive"):
        preprocess_image(img, 0)
    with pytest.raises(TypeError, match="PIL"):
        preprocess_image(np.zeros((8, 8, 3), dtype=np.uint8), 8)  # type: ignore[arg-type]
