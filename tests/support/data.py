"""Where the shared test data lives (../shared beside the project root)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path inside ../shared; fail loudly (not skip) when the folder is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"test data missing: {path} (the tests need ../shared beside the project root)")
    return path
