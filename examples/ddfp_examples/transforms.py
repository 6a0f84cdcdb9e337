"""UniMatch's data views: the weak (geometric) view, the strong (photometric) view and CutMix boxes.

Geometric steps act on an image and its mask together, as PIL images, and draw from torch's
global RNG (or an explicit ``torch.Generator``), which ``DataLoader`` seeds per worker. The
strong view reuses torchvision's colour transforms and PIL's Gaussian blur, all drawing from
torch's global RNG.

Padding convention (UniMatch): the weak view pads the image with black (raw value 0, which is
``-mean / std`` after :func:`normalize`) and the mask with ``255``; the loop ignores those
pixels. UniMatch marks unlabelled padding with 254 internally; here an unlabelled image is given
an all-zero mask, so after the weak view that mask *is* the ignore mask (255 on padding, else 0).
"""

from __future__ import annotations

__all__ = [
    "cutmix",
    "cutmix_targets",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IGNORE_INDEX",
    "random_resize",
    "pad_and_random_crop",
    "random_hflip",
    "weak_view",
    "StrongView",
    "cutmix_box",
    "normalize",
    "denormalize",
    "mask_to_tensor",
    "voc_palette",
]

import math

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from ddfp_lib import IGNORE_INDEX

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size}")
    return height, width


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[low, high]`` (both ends included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _check_pair(image: Image.Image, mask: Image.Image) -> None:
    if image.size != mask.size:
        raise ValueError(
            f"image and mask sizes differ: image (W, H) = {image.size}, mask (W, H) = {mask.size}"
        )


def random_resize(
    image: Image.Image,
    mask: Image.Image,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    base_size: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Image.Image, Image.Image]:
    """Resize image and mask so the long side is ``ratio * base_size``, ratio ~ U(ratio_range).

    The aspect ratio is kept; the image is resampled bilinearly, the mask by nearest neighbour so
    it keeps only the labels it had.

    Args:
        image: RGB image.
        mask: index mask (``"L"`` or ``"P"`` mode), same size as ``image``.
        ratio_range: ``(low, high)`` of the uniform resize ratio.
        base_size: reference long side; ``None`` uses the image's own long side.
        generator: RNG; ``None`` uses torch's global RNG.

    Returns:
        The resized ``(image, mask)``.
    """
    _check_pair(image, mask)
    low, high = ratio_range
    if not 0 < low <= high:
        raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {ratio_range}")
    width, height = image.size
    reference = max(width, height) if base_size is None else base_size
    long_side = max(1, round(_uniform(low, high, generator) * reference))
    if height > width:
        new_h, new_w = long_side, max(1, round(width * long_side / height))
    else:
        new_w, new_h = long_side, max(1, round(height * long_side / width))
    return (
        image.resize((new_w, new_h), Image.Resampling.BILINEAR),
        mask.resize((new_w, new_h), Image.Resampling.NEAREST),
    )


def pad_and_random_crop(
    image: Image.Image,
    mask: Image.Image,
    crop_size: int | tuple[int, int],
    mask_fill: int = IGNORE_INDEX,
    generator: torch.Generator | None = None,
) -> tuple[Image.Image, Image.Image]:
    """Pad on the right/bottom up to ``crop_size``, then take a uniformly placed crop.

    Args:
        image: RGB image, padded with black.
        mask: index mask, padded with ``mask_fill``.
        crop_size: ``S`` or ``(H, W)`` of the output.
        mask_fill: label written into the padded mask pixels.
        generator: RNG; ``None`` uses torch's global RNG.

    Returns:
        ``(image, mask)`` of exactly ``crop_size``.
    """
    _check_pair(image, mask)
    crop_h, crop_w = _pair(crop_size)
    width, height = image.size
    pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
    if pad_w or pad_h:
        border = (0, 0, pad_w, pad_h)
        image = ImageOps.expand(image, border=border, fill=(0, 0, 0))
        mask = ImageOps.expand(mask, border=border, fill=mask_fill)
        width, height = image.size
    left = _randint(0, width - crop_w, generator)
    top = _randint(0, height - crop_h, generator)
    box = (left, top, left + crop_w, top + crop_h)
    return image.crop(box), mask.crop(box)


def random_hflip(
    image: Image.Image,
    mask: Image.Image,
    p: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Image.Image, Image.Image]:
    """Mirror image and mask left-right together with probability ``p``.

    Args:
        image: RGB image.
        mask: index mask of the same size.
        p: flip probability.
        generator: RNG; ``None`` uses torch's global RNG.

    Returns:
        ``(image, mask)``, both flipped or both unchanged.
    """
    _check_pair(image, mask)
    if float(torch.rand((), generator=generator)) < p:
        return (
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        )
    return image, mask


def weak_view(
    image: Image.Image,
    mask: Image.Image,
    crop_size: int | tuple[int, int],
    ratio_range: tuple[float, float] = (0.5, 2.0),
    base_size: int | None = None,
    hflip: bool = True,
    mask_fill: int = IGNORE_INDEX,
    generator: torch.Generator | None = None,
) -> tuple[Image.Image, Image.Image]:
    """UniMatch's weak view: random resize, pad-and-crop to ``crop_size``, horizontal flip.

    Args:
        image: RGB image.
        mask: index mask of the same size (all zeros for an unlabelled image).
        crop_size: ``S`` or ``(H, W)`` of the output.
        ratio_range: resize ratio range, see :func:`random_resize`.
        base_size: reference long side of the resize; ``None`` uses the image's own.
        hflip: flip with probability 0.5; ``False`` for data where left-right matters (digits).
        mask_fill: label of padded mask pixels.
        generator: RNG; ``None`` uses torch's global RNG.

    Returns:
        ``(image, mask)`` of exactly ``crop_size``.
    """
    image, mask = random_resize(image, mask, ratio_range, base_size, generator)
    image, mask = pad_and_random_crop(image, mask, crop_size, mask_fill, generator)
    if hflip:
        image, mask = random_hflip(image, mask, 0.5, generator)
    return image, mask


class StrongView:
    """UniMatch's photometric strong view of a (weak-view) PIL image.

    ColorJitter(0.5, 0.5, 0.5, 0.25) with probability 0.8, RandomGrayscale(0.2), Gaussian blur
    with sigma ~ U(0.1, 2.0) with probability 0.5 (PIL's blur, whose radius is the sigma).
    Geometry is unchanged, so the weak view's mask and ignore mask still apply. Draws from
    torch's global RNG.

    Args:
        jitter_p: probability of the colour jitter.
        grayscale_p: probability of converting to grey (three equal channels).
        blur_p: probability of the blur.
        blur_sigma: ``(low, high)`` of the uniform blur sigma.

    Example:
        >>> from PIL import Image
        >>> StrongView()(Image.new("RGB", (8, 6))).size
        (8, 6)
    """

    def __init__(
        self,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        self.photometric = T.Compose(
            [
                T.RandomApply([T.ColorJitter(0.5, 0.5, 0.5, 0.25)], p=jitter_p),
                T.RandomGrayscale(p=grayscale_p),
            ]
        )
        self.blur_p = blur_p
        self.blur_sigma = blur_sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        """Apply the strong view.

        Args:
            image: RGB image.

        Returns:
            The photometrically augmented RGB image, same size.
        """
        image = self.photometric(image)
        if float(torch.rand(())) < self.blur_p:
            # PIL's blur takes any image size; torchvision's reflect padding needs side > kernel/2.
            sigma = _uniform(*self.blur_sigma, None)
            image = image.filter(ImageFilter.GaussianBlur(radius=sigma))
        return image


def cutmix_box(
    size: int | tuple[int, int],
    p: float = 0.5,
    area_range: tuple[float, float] = (0.02, 0.4),
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw a CutMix box: with probability ``p`` one axis-aligned rectangle of ones, else zeros.

    The box covers a fraction ``a ~ U(area_range)`` of the image, has aspect ratio
    ``h / w ~ U(aspect_range)`` (redrawn until the box fits) and a uniformly random position.

    Args:
        size: ``S`` or ``(H, W)`` of the mask.
        p: probability that the mask holds a box at all.
        area_range: ``(low, high)`` of the box area as a fraction of ``H * W``.
        aspect_range: ``(low, high)`` of the box's height / width.
        generator: RNG; ``None`` uses torch's global RNG.

    Shape:
        - Output: ``(H, W)`` long, ``1`` inside the box.

    Returns:
        The box mask.
    """
    height, width = _pair(size)
    if not 0.0 < area_range[0] <= area_range[1] <= 1.0:
        raise ValueError(f"area_range must satisfy 0 < low <= high <= 1, got {area_range}")
    if not 0.0 < aspect_range[0] <= aspect_range[1]:
        raise ValueError(f"aspect_range must satisfy 0 < low <= high, got {aspect_range}")
    box = torch.zeros(height, width, dtype=torch.long)
    if float(torch.rand((), generator=generator)) >= p:
        return box
    area = _uniform(*area_range, generator) * height * width
    for _ in range(100):
        aspect = _uniform(*aspect_range, generator)
        box_h = max(1, round(math.sqrt(area * aspect)))
        box_w = max(1, round(math.sqrt(area / aspect)))
        if box_h <= height and box_w <= width:
            break
    else:
        # Only very elongated images get here; clipping keeps the box inside them.
        box_h, box_w = min(box_h, height), min(box_w, width)
    top = _randint(0, height - box_h, generator)
    left = _randint(0, width - box_w, generator)
    box[top : top + box_h, left : left + box_w] = 1
    return box


_TO_NORMALIZED = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def cutmix(strong: torch.Tensor, strong_mix: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Paste the box region of a second unlabelled batch into the strong view.

    Shape:
        - strong, strong_mix: ``(B, 3, H, W)``; box: ``(B, H, W)`` of 0/1 (:func:`cutmix_box`)
    """
    return torch.where(box[:, None].bool(), strong_mix, strong)


def cutmix_targets(labels, confidence, ignore, labels_mix, confidence_mix, ignore_mix, box):
    """The pseudo-labels, confidences and padding of the CutMix-ed strong view: the second batch's
    inside the box, the first's outside (every argument and result ``(B, H, W)``)."""
    inside = box.bool()
    return (
        torch.where(inside, labels_mix, labels),
        torch.where(inside, confidence_mix, confidence),
        torch.where(inside, ignore_mix, ignore),
    )


def normalize(image: Image.Image) -> torch.Tensor:
    """Convert an RGB image to a float tensor normalised with the ImageNet mean and std.

    Args:
        image: RGB image of size ``(W, H)``.

    Shape:
        - Output: ``(3, H, W)`` float32.

    Returns:
        ``(x / 255 - mean) / std`` per channel.
    """
    if image.mode != "RGB":
        raise ValueError(f"normalize expects an RGB image, got mode {image.mode!r}")
    return _TO_NORMALIZED(image)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Undo :func:`normalize` for display.

    Shape:
        - Input: ``(3, H, W)`` normalised image.
        - Output: ``(H, W, 3)`` float in ``[0, 1]``.
    """
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Convert an index mask to a long tensor, keeping the raw indices (no palette lookup).

    Args:
        mask: single-channel ``"L"`` or ``"P"`` image of size ``(W, H)``.

    Shape:
        - Output: ``(H, W)`` long.

    Returns:
        The label indices.
    """
    if mask.mode not in ("L", "P"):
        raise ValueError(f"a mask must be a single-channel 'L' or 'P' image, got {mask.mode!r}")
    return torch.from_numpy(np.array(mask, dtype=np.int64))


def voc_palette() -> list[int]:
    """The Pascal VOC colour map, for ``Image.putpalette``: a flat ``[r0, g0, b0, r1, ...]`` list.

    Class ``i`` spreads the bits of ``i`` over the three channels, highest bit first: bit 0 of each
    group of three goes to red, bit 1 to green, bit 2 to blue. 255 (ignore) comes out (224, 224, 192).

    Returns:
        768 values, the colours of the indices 0 to 255.
    """
    palette = []
    for index in range(256):
        colour = [0, 0, 0]
        code = index
        for shift in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((code >> channel) & 1) << shift
            code >>= 3
        palette.extend(colour)
    return palette
