"""The progress bar class: tqdm's notebook widget where it can be drawn, else the text bar.

``tqdm.auto`` picks the widget in Jupyter and, when ipywidgets is missing, warns with a
``TqdmWarning`` that names the user's site-packages path on every first bar; pvae checks for
ipywidgets itself and falls back to the text bar without a warning.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["progress_bar_class"]


def progress_bar_class():
    """``tqdm.notebook.tqdm`` inside a Jupyter kernel with ipywidgets installed, else ``tqdm.std.tqdm``."""
    in_kernel = "ipykernel" in sys.modules and "IPython" in sys.modules
    if in_kernel and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm
