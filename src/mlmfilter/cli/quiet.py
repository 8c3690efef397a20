"""Third-party chatter off the terminal unless ``-v``: warnings and download bars go to the run's log.

Libraries under a scoring run warn freely (torch and transformers deprecations, hub download bars,
tokenizer advice). A curator's terminal shows mlmfilter's own lines; those records still reach
``RUN/logs/*.log`` through the root logger, and ``-v`` shows them on the terminal too.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: libraries known to log under a run (documentation: every logger but mlmfilter's own is kept off the
#: terminal below ERROR without -v, see ThirdPartyFilter; the log file keeps them)
THIRD_PARTY_LOGGERS = frozenset(
    {
        "py.warnings",
        "transformers",
        "torch",
        "huggingface_hub",
        "urllib3",
        "filelock",
        "accelerate",
        "datasets",
        "PIL",
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",
        "openai",
        "ray",
        "vllm",
        "fsspec",
        "asyncio",
        "matplotlib",
        "numba",
        "sentence_transformers",
    }
)

#: set before the libraries are imported (they read them once); a user's own setting wins
QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # hub download bars, and transformers' own tqdm bars
    "TRANSFORMERS_VERBOSITY": "error",  # transformers logs to its own stderr handler, not ours
    "HF_HUB_VERBOSITY": "error",  # so does huggingface_hub (and propagates: the log file sees what passes)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # the fork warning of the tokenizers library
}


#: the loggers whose records below ERROR reach the terminal: mlmfilter's own
OWN_LOGGERS = ("mlmfilter", "__main__")


class ThirdPartyFilter(logging.Filter):
    """Passes mlmfilter's records and everyone's errors; drops every other logger's info and warnings.

    An allowlist, not the list above: libraries rename their loggers (openai 3 logs each request
    as ``httpx2``), and a terminal must not fill with ``HTTP Request: POST`` lines when they do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        name = record.name
        return any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS)


def quiet_third_party(console_handler: logging.Handler, verbose: bool) -> None:
    """Route ``warnings.warn`` through logging (hence into the run's log files) and, unless
    ``verbose``, keep third-party records and progress bars off ``console_handler``'s terminal."""
    logging.captureWarnings(True)
    if verbose:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)  # worker processes inherit these
    console_handler.addFilter(ThirdPartyFilter())


@contextmanager
def library_log(path: Path, verbose: bool) -> Iterator[Path]:
    """For a command without a run folder (``convert``): the libraries' warnings, load reports and
    advice go to the log file ``path`` (made only when something is written), and to the terminal too
    with ``verbose``. transformers' records reach it through the root logger instead of its own
    stderr handler, for the length of the command."""
    import transformers.utils.logging as transformers_logging

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, delay=True, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level, root_level = transformers_logging.get_verbosity(), root.level
    root.addHandler(handler)
    root.setLevel(min(root_level or logging.WARNING, logging.INFO))  # the file has mlmfilter's info lines
    transformers_logging.set_verbosity_warning()  # its warnings and load reports: into the file
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    try:
        yield path
    finally:
        transformers_logging.set_verbosity(level)
        transformers_logging.disable_propagation()
        transformers_logging.enable_default_handler()
        root.removeHandler(handler)
        root.setLevel(root_level)
        handler.close()
