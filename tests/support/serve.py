"""`transformers serve` on 127.0.0.1 for the tests that need a real OpenAI-compatible server
(teach labelling, the judge's openai backend): started as a subprocess, waited for, always stopped."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_served_llava(folder: Path) -> Path:
    """A tiny random LLaVA with a real processor (it takes the image data URL) and a local tokenizer."""
    from mlmfilter.models.tiny_vlm import fallback_tokenizer, save_tiny_vlm

    return save_tiny_vlm(folder, "llava", tokenizer=fallback_tokenizer())


@contextlib.contextmanager
def transformers_serve(model_dir: str | Path, log_dir: Path, startup_s: float = 120) -> Iterator[str]:
    """Yields the server's base URL (``http://127.0.0.1:PORT/v1``) once ``/v1/models`` answers."""
    import httpx

    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    log = open(Path(log_dir) / "serve.log", "w+")
    proc = subprocess.Popen(
        [str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"transformers serve did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
