"""Whether the Hugging Face hub can be reached, decided in about a second (torch-free).

Without this, an offline machine spends minutes in download retries before a missing model is
reported; with it, models load from the local cache only and a missing one fails at once with
the usual guidance.
"""

from __future__ import annotations

import os
import socket
import sys

HUB_HOST = "huggingface.co"


def names_a_local_path(name_or_path: str) -> bool:
    """A model name written as a path (``/x``, ``./x``, ``../x``, ``~/x``, ``a/b/c``): never a hub repo id."""
    return name_or_path.startswith(("/", "./", "../", "~", ".\\")) or name_or_path.count("/") >= 2


def hub_reachable(host: str = HUB_HOST, timeout: float = 1.5) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def use_offline_hub() -> None:
    """Load models from the local cache only, from now on in this process (and its workers)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    # huggingface_hub reads the variable once at import: tell it directly if it is loaded already
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def go_offline_if_unreachable() -> bool:
    """Switch to the local cache when the hub does not answer; True if it did."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True
    if hub_reachable():
        return False
    use_offline_hub()
    return True
