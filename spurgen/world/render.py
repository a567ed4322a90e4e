"""Procedural renderer of the synthetic world: a filled shape in front of a background texture.

Six object classes with distinct silhouettes, each paired with a spurious background texture, plus
neutral grey gradients. Every image is drawn from a seeded generator, vectorised over a batch with
numpy: shape and texture masks are computed on a supersampled grid and box-filtered down, which
anti-aliases their edges.

Two knobs set how much a classifier trained on biased data leans on the background. An object has
its class's colour most of the time and a random one otherwise: always its own colour makes the
object too easy to need the background, a random colour too hard to be learnt on a CPU budget. And a
texture's opacity varies per image, so some texture-only images are strong evidence of the class
and others weak, and classifiers disagree about them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLASS_COLOUR_PROB", "FEATURES", "NONE", "SHAPES", "TEXTURE_STRENGTH", "render"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "ring")
FEATURES: tuple[str, ...] = ("red dots", "green vertical stripes", "blue waves", "yellow grid",
                             "purple checkerboard", "orange diagonal stripes")
# Index meaning "no object" in ``objects`` and "neutral grey gradient" in ``backgrounds``.
NONE = -1

_FEATURE_RGB = np.array([(0.86, 0.10, 0.10), (0.10, 0.62, 0.16), (0.16, 0.30, 0.90),
                         (0.95, 0.85, 0.10), (0.56, 0.16, 0.70), (0.96, 0.50, 0.05)], dtype=np.float32)
# Chosen away from the texture colours, so an object's colour never imitates another class's texture.
_OBJECT_RGB = np.array([(0.10, 0.85, 0.90), (0.96, 0.96, 0.92), (0.08, 0.08, 0.10),
                        (1.00, 0.20, 0.85), (0.00, 0.45, 0.45), (0.65, 1.00, 0.30)], dtype=np.float32)
# Shapes are drawn in the unit disc's scale; this is how far past radius 1 any of them reaches.
_SHAPE_EXTENT = 1.15
# Tuned defaults: the world's classifiers reach >= 0.9 unbiased accuracy and 0.5-0.9 spurious accuracy.
CLASS_COLOUR_PROB = 0.95
TEXTURE_STRENGTH = 0.2


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of one silhouette in object coordinates (circumradius about 1)."""
    if shape == 0:
        return u * u + v * v <= 1.0
    if shape == 1:
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == 2:
        # Equilateral triangle: inside all three edge half-planes (normals at 270, 30, 150 degrees).
        half = _SHAPE_EXTENT / 2
        return (-v <= half) & (0.866 * u + 0.5 * v <= half) & (-0.866 * u + 0.5 * v <= half)
    if shape == 3:
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1.0))
    if shape == 4:
        # Five-pointed star: fold the angle onto one tip-to-notch edge and test against that edge.
        outer, inner, half_step = _SHAPE_EXTENT, 0.55, np.pi / 5
        rho = np.sqrt(u * u + v * v)
        folded = half_step - np.abs(np.mod(np.arctan2(v, u), 2 * half_step) - half_step)
        px, py = rho * np.cos(folded), rho * np.sin(folded)
        ex, ey = inner * np.cos(half_step) - outer, inner * np.sin(half_step)
        return ex * py - ey * (px - outer) >= 0
    if shape == 5:
        rho2 = u * u + v * v
        return (rho2 <= 1.05**2) & (rho2 >= 0.55**2)
    raise ValueError(f"unknown shape index {shape}")


def _texture_mask(feature: int, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Pattern coverage of one texture; ``x``, ``y`` are (B, S, S) pixel coordinates."""
    count = x.shape[0]

    def draw(low: float, high: float) -> np.ndarray:
        return rng.uniform(low * scale, high * scale, size=(count, 1, 1)).astype(np.float32)

    if feature == 0:
        period = draw(5.0, 7.0)
        dx = np.mod(x + draw(0, 7), period) - period / 2
        dy = np.mod(y + draw(0, 7), period) - period / 2
        return dx * dx + dy * dy <= (0.3 * period) ** 2
    if feature == 1:
        period = draw(5.0, 8.0)
        return np.mod(x + draw(0, 8), period) < 0.45 * period
    if feature == 2:
        period, wavelength = draw(6.0, 8.0), draw(9.0, 14.0)
        phase = rng.uniform(0, 2 * np.pi, size=(count, 1, 1)).astype(np.float32)
        wave = y + draw(1.0, 2.0) * np.sin(2 * np.pi * x / wavelength + phase)
        return np.mod(wave + draw(0, 8), period) < 0.4 * period
    if feature == 3:
        period, width = draw(6.0, 9.0), draw(1.2, 1.8)
        return (np.mod(x + draw(0, 9), period) < width) | (np.mod(y + draw(0, 9), period) < width)
    if feature == 4:
        cell = draw(3.5, 5.5)
        return np.mod(np.floor((x + draw(0, 6)) / cell) + np.floor((y + draw(0, 6)) / cell), 2) == 0
    if feature == 5:
        period = draw(5.0, 8.0)
        return np.mod((x + y) / np.sqrt(2) + draw(0, 8), period) < 0.45 * period
    raise ValueError(f"unknown feature index {feature}")


def _downsample(mask: np.ndarray, factor: int) -> np.ndarray:
    """Box filter from the supersampled grid: the fraction of each pixel that the mask covers."""
    count, side = mask.shape[0], mask.shape[1] // factor
    return mask.reshape(count, side, factor, side, factor).mean(axis=(2, 4), dtype=np.float32)


def _random_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """Saturated colours of random hue (HSV with S, V in [0.5, 1]) as RGB in [0, 1]."""
    hue = rng.uniform(0, 6, size=count)
    sat, val = rng.uniform(0.5, 1.0, size=count), rng.uniform(0.5, 1.0, size=count)
    k = np.mod(np.array([5.0, 3.0, 1.0])[None, :] + hue[:, None], 6)
    rgb = val[:, None] * (1 - sat[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1))
    return rgb.astype(np.float32)


def render(objects: np.ndarray, backgrounds: np.ndarray, rng: np.random.Generator, size: int = 32, *,
           class_colour_prob: float = CLASS_COLOUR_PROB, texture_strength: float = TEXTURE_STRENGTH,
           noise_std: float = 2.0, supersample: int = 4) -> np.ndarray:
    """Draws one image per entry of ``objects`` and ``backgrounds``.

    Args:
        objects: Shape index per image (into :data:`SHAPES`), or :data:`NONE` for no object.
        backgrounds: Texture index per image (into :data:`FEATURES`), or :data:`NONE` for a
            neutral grey gradient.
        rng: Source of every random choice; the same state gives the same pixels.
        size: Side of the square images in pixels; patterns and shapes scale with it.
        class_colour_prob: Probability that an object has its class's colour (jittered) rather
            than a random one; lower values make the background a stronger cue than the colour.
        texture_strength: Lowest opacity of a texture's pattern; each image draws its opacity
            from [texture_strength, 1].
        noise_std: Standard deviation of the Gaussian pixel noise, in 8-bit levels.
        supersample: Sub-samples per pixel side for the anti-aliased masks.

    Returns:
        ``uint8`` array of shape ``(N, size, size, 3)``.
    """
    objects, backgrounds = np.asarray(objects), np.asarray(backgrounds)
    count, scale = len(objects), size / 32
    # Neutral base for every image: a grey linear gradient in a random direction.
    axis = np.arange(size, dtype=np.float32) / (size - 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi, size=(count, 1, 1))
    ramp = np.cos(angle) * axis[None, None, :] + np.sin(angle) * axis[None, :, None]
    grey = rng.uniform(0.35, 0.75, size=(count, 1, 1)) + rng.uniform(0.1, 0.35, size=(count, 1, 1)) * ramp
    tint = rng.uniform(-0.03, 0.03, size=(count, 1, 1, 3))
    image = (grey[..., None] + tint).astype(np.float32) * np.ones(3, dtype=np.float32)

    fine = (np.arange(size * supersample, dtype=np.float32) + 0.5) / supersample
    for feature in range(len(FEATURES)):
        rows = np.flatnonzero(backgrounds == feature)
        if rows.size == 0:
            continue
        x = np.broadcast_to(fine[None, None, :], (rows.size, fine.size, fine.size))
        y = np.broadcast_to(fine[None, :, None], (rows.size, fine.size, fine.size))
        alpha = _downsample(_texture_mask(feature, x, y, rng, scale), supersample)[..., None]
        colour = np.clip(_FEATURE_RGB[feature] + rng.uniform(-0.08, 0.08, size=(rows.size, 3)), 0, 1)
        # Faint textures make some images weak evidence of the feature, so spuriousness varies by image.
        alpha *= rng.uniform(texture_strength, 1.0, size=(rows.size, 1, 1, 1)).astype(np.float32)
        image[rows] = image[rows] * (1 - alpha) + colour[:, None, None, :].astype(np.float32) * alpha

    for shape in range(len(SHAPES)):
        rows = np.flatnonzero(objects == shape)
        if rows.size == 0:
            continue
        radius = rng.uniform(0.24 * size, 0.34 * size, size=(rows.size, 1, 1)).astype(np.float32)
        theta = rng.uniform(0, 2 * np.pi, size=(rows.size, 1, 1)).astype(np.float32)
        # Keeps the whole silhouette inside the frame.
        margin = radius * _SHAPE_EXTENT
        cx, cy = margin + rng.uniform(0, 1, size=(2, rows.size, 1, 1)).astype(np.float32) * (size - 2 * margin)
        dx, dy = fine[None, None, :] - cx, fine[None, :, None] - cy
        cos, sin = np.cos(theta) / radius, np.sin(theta) / radius
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        alpha = _downsample(_shape_mask(shape, u, v), supersample)[..., None]
        own = np.clip(_OBJECT_RGB[shape] + rng.uniform(-0.1, 0.1, size=(rows.size, 3)), 0, 1)
        colour = np.where(rng.uniform(size=(rows.size, 1)) < class_colour_prob, own, _random_colours(rng, rows.size))
        image[rows] = image[rows] * (1 - alpha) + colour[:, None, None, :].astype(np.float32) * alpha

    noisy = image * 255 + noise_std * rng.standard_normal(size=image.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
