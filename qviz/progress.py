"""Progress bars for long work: tqdm's notebook or terminal bar, whichever fits."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(items, description: str, enabled: bool = True):
    """Iterate ``items`` with a bar labelled ``description`` (a plain iterator when disabled)."""
    if not enabled:
        return items
    return tqdm(items, desc=f"qviz: {description}", leave=False)
