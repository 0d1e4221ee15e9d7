"""minidino: DINO and DINOv2 self-supervised ViT training, small enough to read in an afternoon."""

__version__ = "0.1.0"
