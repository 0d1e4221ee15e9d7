"""minidino: DINO and DINOv2 self-supervised ViT training, small enough to read in an afternoon."""

import os

__version__ = "0.1.0"

# The Triton kernels live in the repository's top-level kernels/ folder and are this package's subpackage
# `minidino.kernels`. An installed minidino (`pip install -e .` or a wheel) has them there already
# (pyproject.toml maps the folder); in a plain source checkout the line below lets Python look for
# subpackages next to this folder too, which is where kernels/ is.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(__path__[0], "kernels")) and os.path.isdir(
    os.path.join(_checkout, "kernels")
):
    __path__.append(_checkout)
