"""spurgen: class-wise spurious image generation with fine-tuned text-to-image diffusion models."""

__version__ = "0.1.0"
