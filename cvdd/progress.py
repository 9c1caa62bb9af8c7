"""Progress bars: tqdm.auto (a widget in notebooks, text in a terminal).

Reports set CVDD_NO_PROGRESS=1 for the notebooks they execute, so the saved notebooks
hold results instead of dozens of finished progress bars.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm as _auto_tqdm


def tqdm(*args, **kwargs):
    if os.environ.get("CVDD_NO_PROGRESS"):
        kwargs["disable"] = True
    return _auto_tqdm(*args, **kwargs)
