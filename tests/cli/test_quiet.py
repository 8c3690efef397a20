"""Third-party warnings and download bars stay off the terminal unless -v; the log file keeps them."""

from __future__ import annotations

import io
import logging
import os
import warnings

import pytest

from mlmfilter.cli.quiet import quiet_third_party


@pytest.mark.parametrize("verbose", [False, True])
def test_library_warnings_go_to_the_log_file_and_to_the_terminal_only_with_v(tmp_path, monkeypatch, verbose):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the quiet settings are process-wide
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.pop(name, None)
    terminal, logfile = io.StringIO(), tmp_path / "score-main.log"
    console = logging.StreamHandler(terminal)
    file_handler = logging.FileHandler(logfile)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(console)
    root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(False)  # start from Python's own warning display, whatever ran before
    try:
        quiet_third_party(console, verbose)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("`torch_dtype` is deprecated! Use `dtype` instead!", FutureWarning)
        logging.getLogger("sentence_transformers.util").warning("Xet Storage is enabled for this repo")
        logging.getLogger("urllib3.connectionpool").error("weights could not be loaded")
        # openai 3 logs every request under httpx2; a library nobody listed is kept off the terminal too
        logging.getLogger("httpx2").info('HTTP Request: POST http://127.0.0.1/v1/chat/completions "200 OK"')
        logging.getLogger("a_library_nobody_listed").warning("unlisted chatter")
        logging.getLogger("mlmfilter.api").info("scoring 3 shards")
    finally:
        logging.captureWarnings(False)
        root.removeHandler(console)
        root.removeHandler(file_handler)
        file_handler.close()
        root.setLevel(old_level)
    shown, kept = terminal.getvalue(), logfile.read_text()
    for line in ("torch_dtype", "Xet Storage", "weights could not be loaded", "scoring 3 shards", "HTTP Request"):
        assert line in kept  # the log file has everything
    assert "scoring 3 shards" in shown and "weights could not be loaded" in shown  # ours, and library errors
    assert ("torch_dtype" in shown) is verbose and ("Xet Storage" in shown) is verbose
    assert ("HTTP Request" in shown) is verbose and ("unlisted chatter" in shown) is verbose
    assert (os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1") is not verbose  # no download bars
    assert (os.environ.get("TRANSFORMERS_VERBOSITY") == "error") is not verbose  # their own stderr handlers
    assert (os.environ.get("HF_HUB_VERBOSITY") == "error") is not verbose
