"""Whether the Hugging Face hub can be reached, decided once before the hub libraries are imported.

When it cannot, the libraries are put in offline mode, so a hub model, dataset or task name fails at
once (with our message naming the offline alternative) instead of after minutes of retries.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_offline(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return True
