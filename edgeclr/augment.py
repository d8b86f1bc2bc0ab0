"""SimCLR view augmentations, applied to whole batches on the training device.

Per-image PIL transforms in DataLoader workers would take the CPU cores the model needs (this
project's reference machine has two). Here every augmentation is a batched tensor operation with
per-sample parameters drawn from a `torch.Generator`, so a view is a pure function of
(seed, epoch, step, view): that is what makes `--resume` reproduce an uninterrupted run.

Order (SimCLR, Chen et al. 2020, appendix A): random resized crop + flips/rotations (one affine
resample) -> colour jitter with probability p (brightness, contrast, saturation, hue) -> random
grayscale -> Gaussian blur -> [stain jitter for histology] -> normalise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale
_LUMA = (0.299, 0.587, 0.114)
# Haematoxylin / eosin / DAB optical-density stain vectors (Ruifrok & Johnston 2001), rows = stains
_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of one SimCLR view transform."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop
    hflip: float = 0.5  # probability of a horizontal flip
    vflip: float = 0.0  # probability of a vertical flip
    rot90: bool = False  # rotate by a random multiple of 90 degrees (orientation-free images)
    jitter_strength: float = 0.5  # SimCLR colour-jitter strength s: (0.8s, 0.8s, 0.8s, 0.2s)
    jitter_p: float = 0.8  # probability of applying colour jitter
    hue_saturation: bool = True  # jitter hue and saturation (off for grayscale data)
    gray_p: float = 0.2  # probability of converting to grayscale (RGB only)
    blur_p: float = 0.0  # probability of a Gaussian blur (kernel ~10% of the image side)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma range of the blur, in pixels at 224 px (scaled)
    stain_jitter: float = 0.0  # HED stain perturbation sigma (Tellez et al. 2018), 0 = off

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PRESETS: dict[str, AugmentConfig] = {
    # tiny grayscale images (digits, Fashion-MNIST): no blur, no hue/saturation/grayscale
    "small-gray": AugmentConfig(crop_scale=(0.3, 1.0), jitter_strength=0.5, hue_saturation=False, gray_p=0.0),
    # tiny colour images (CIFAR-10): no blur
    "small-rgb": AugmentConfig(crop_scale=(0.2, 1.0), jitter_strength=0.5),
    # the paper's recipe for larger images (STL-10, photographs)
    "rgb": AugmentConfig(crop_scale=(0.08, 1.0), jitter_strength=1.0, blur_p=0.5),
    "gray": AugmentConfig(crop_scale=(0.08, 1.0), jitter_strength=1.0, hue_saturation=False, gray_p=0.0, blur_p=0.5),
    # histopathology tiles: orientation-free, stain variation instead of strong hue jitter
    "histo": AugmentConfig(crop_scale=(0.3, 1.0), hflip=0.5, vflip=0.5, rot90=True, jitter_strength=0.4,
                           gray_p=0.1, blur_p=0.3, stain_jitter=0.05),
}


def preset_for(channels: int, input_size: int) -> str:
    """Default preset for images of this channel count and model input size (blur only above 32 px)."""
    if input_size <= 32:
        return "small-gray" if channels == 1 else "small-rgb"
    return "gray" if channels == 1 else "rgb"


def get_preset(name: str) -> AugmentConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _crop_boxes(g: torch.Generator, n: int, h: int, w: int, scale, ratio, tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes as torchvision samples them, vectorised: (n, 4) = (cx, cy, cw, ch) in pixels."""
    area = h * w * _uniform(g, n * tries, *scale).view(n, tries)
    logr = _uniform(g, n * tries, math.log(ratio[0]), math.log(ratio[1])).view(n, tries)
    cw, ch = (area * logr.exp()).sqrt(), (area / logr.exp()).sqrt()
    ok = (cw <= w) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)[:, None]
    cw, ch = cw.gather(1, pick)[:, 0], ch.gather(1, pick)[:, 0]
    fallback = first < 0  # torchvision falls back to the whole image (clamped ratio); we use the whole image
    cw, ch = torch.where(fallback, float(w), cw), torch.where(fallback, float(h), ch)
    cx = cw / 2 + (w - cw) * torch.rand(n, generator=g)
    cy = ch / 2 + (h - ch) * torch.rand(n, generator=g)
    return torch.stack([cx, cy, cw, ch], 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W)."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _hue_matrices(theta: torch.Tensor) -> torch.Tensor:
    """Per-sample RGB hue rotation by angle theta (radians) through YIQ space: (B,) -> (B, 3, 3)."""
    t = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=theta.dtype)
    c, s = theta.cos(), theta.sin()
    rot = torch.zeros(len(theta), 3, 3, dtype=theta.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    return torch.linalg.inv(t) @ rot @ t


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (pixels). x: (B, C, H, W)."""
    b, c, h, w = x.shape
    k = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
    r = torch.arange(k, dtype=x.dtype, device=x.device) - k // 2
    ker = torch.exp(-(r[None] ** 2) / (2 * sigma.to(x.device, x.dtype)[:, None] ** 2))  # (B, k)
    ker = (ker / ker.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, k)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), ker.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), ker.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w)


def hed_jitter(x: torch.Tensor, g: torch.Generator, sigma: float) -> torch.Tensor:
    """HED colour augmentation: perturb each stain's optical density by alpha*od + beta."""
    m = torch.tensor(_HED, dtype=x.dtype)
    m = m / m.norm(dim=1, keepdim=True)
    m_inv = torch.linalg.inv(m).to(x.device)
    m = m.to(x.device)
    b = x.shape[0]
    alpha = _uniform(g, b * 3, 1 - sigma, 1 + sigma).view(b, 3, 1, 1).to(x.device, x.dtype)
    beta = _uniform(g, b * 3, -sigma, sigma).view(b, 3, 1, 1).to(x.device, x.dtype)
    od = -torch.log(x.clamp(min=1 / 255))  # (B, 3, H, W) optical density
    hed = torch.einsum("bchw,cs->bshw", od, m_inv)
    hed = hed * alpha + beta
    return torch.exp(-torch.einsum("bshw,sc->bchw", hed, m)).clamp(0, 1)


class SimCLRAugment:
    """Batched SimCLR view transform.

    Args:
        cfg: augmentation parameters.
        output_size: side of the square views.
        mean, std: per-channel normalisation applied last (the model's preprocessing).
    """

    def __init__(self, cfg: AugmentConfig, output_size: int, mean, std):
        self.cfg, self.size = cfg, output_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """x: (B, C, H, W) uint8 on any device -> (B, C, S, S) float32 normalised views.

        All random parameters are drawn on the CPU from `g`, so the views depend only on the
        generator's seed, not on the device.
        """
        cfg, dev = self.cfg, x.device
        b, c, h, w = x.shape
        x = x.float() / 255.0

        # 1. random resized crop + flips + 90-degree rotations: one bilinear resample per image
        box = _crop_boxes(g, b, h, w, cfg.crop_scale, cfg.crop_ratio)
        sx, sy = box[:, 2] / w, box[:, 3] / h  # half-extent of the crop in normalised coordinates
        tx, ty = 2 * box[:, 0] / w - 1, 2 * box[:, 1] / h - 1
        fx = torch.where(torch.rand(b, generator=g) < cfg.hflip, -1.0, 1.0)
        fy = torch.where(torch.rand(b, generator=g) < cfg.vflip, -1.0, 1.0)
        k = torch.randint(0, 4, (b,), generator=g) if cfg.rot90 else torch.zeros(b, dtype=torch.long)
        cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[k]
        sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[k]
        # input = t + diag(sx, sy) @ R(k) @ diag(fx, fy) @ output
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = sx * cos * fx, -sx * sin * fy
        theta[:, 1, 0], theta[:, 1, 1] = sy * sin * fx, sy * cos * fy
        theta[:, 0, 2], theta[:, 1, 2] = tx, ty
        grid = F.affine_grid(theta.to(dev), [b, c, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

        # 2. colour jitter with probability p (fixed order: brightness, contrast, saturation, hue)
        s = cfg.jitter_strength
        apply = (torch.rand(b, generator=g) < cfg.jitter_p).float()

        def factor(lo, hi):  # per-sample factor, 1 where jitter is not applied; (B, 1, 1, 1)
            f = _uniform(g, b, lo, hi)
            return (1 + apply * (f - 1)).view(b, 1, 1, 1).to(dev)

        if s > 0:
            x = (x * factor(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)).clamp(0, 1)
            m = _luma(x).mean((1, 2, 3), keepdim=True)
            x = ((x - m) * factor(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s) + m).clamp(0, 1)
            if c == 3 and cfg.hue_saturation:
                gray = _luma(x)
                x = ((x - gray) * factor(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s) + gray).clamp(0, 1)
                hue = _uniform(g, b, -0.2 * s, 0.2 * s) * apply * 2 * math.pi
                x = torch.einsum("bij,bjhw->bihw", _hue_matrices(hue).to(dev), x).clamp(0, 1)

        # 3. random grayscale
        if c == 3 and cfg.gray_p > 0:
            gmask = (torch.rand(b, generator=g) < cfg.gray_p).view(b, 1, 1, 1).to(dev)
            x = torch.where(gmask, _luma(x).expand_as(x), x)

        # 4. Gaussian blur (sigma scaled from the paper's 224-px range to this size)
        if cfg.blur_p > 0:
            sig = _uniform(g, b, *cfg.blur_sigma) * (self.size / 224)
            bmask = (torch.rand(b, generator=g) < cfg.blur_p).view(b, 1, 1, 1).to(dev)
            x = torch.where(bmask, _blur(x, sig.clamp(min=1e-3)), x)

        # 5. stain jitter (histopathology)
        if cfg.stain_jitter > 0 and c == 3:
            x = hed_jitter(x, g, cfg.stain_jitter)

        return (x - self.mean.to(dev)) / self.std.to(dev)


def view_generator(seed: int, epoch: int, step: int, view: int, rank: int = 0) -> torch.Generator:
    """The generator for one view of one batch: randomness is a pure function of these numbers
    (and of the rank, so that the ranks of a distributed run draw different augmentations)."""
    import numpy as np

    key = [seed, epoch, step, view] + ([rank] if rank else [])
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))
    return g
