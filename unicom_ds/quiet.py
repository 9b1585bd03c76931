"""Known third-party noise of a CPU run, dropped by its exact message; every other warning and log line shows.

Python warnings are ignored with warnings.filterwarnings (`install`, in this process) and through PYTHONWARNINGS
(`child_env`, in the processes deepspeed starts); log lines are dropped when they end with a listed message
(`install`: the loggers they come from; `is_noise`: launch_local's streaming of a step's processes).
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Mapping

# (category, the whole message) of Python warnings.
WARNINGS = (
    # torch deprecates the collective DeepSpeed's ZeRO-2 calls on every step (torch 2.14, DeepSpeed 0.19).
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated. "
                    "Please use `torch.distributed.all_gather_single` instead."),
)
# Regexes of whole log messages, whatever the logger's prefix.
LOG_MESSAGES = (
    r"Setting CUDA_VISIBLE_DEVICES=[\d,]*",  # deepspeed's launcher, also where there is no GPU
    # deepspeed's runner; launcher=local is one node by design
    r"Unable to find hostfile, will proceed with training with local resources only\.",
    r"No CUDA runtime is found, using CUDA_HOME='[^']*'",  # torch, building DeepSpeed's CPU op
    r"No pretrained weights loaded for model '[^']*'\. Model initialized randomly\.",  # open_clip: clip.pretrained=random
)
# The loggers their records are made on (a logger's filter sees only its own records, not its children's):
# the root logger (open_clip's), torch's extension builder (with a handler of its own).
LOGGERS = ("", "torch.utils.cpp_extension")
_MESSAGE = re.compile("|".join(LOG_MESSAGES))
_LINE = re.compile(rf"(?:^|[\s:\]])(?:{_MESSAGE.pattern})$")


def is_noise(line: str) -> bool:
    """True for a log line (any prefix: `[INFO] [launch.py:174:main] `, `WARNING:root:`) ending in a listed message."""
    return _LINE.search(line.rstrip("\r\n")) is not None


def _drop(record: logging.LogRecord) -> bool:
    return not _MESSAGE.fullmatch(record.getMessage())


def install() -> None:
    """Drop the listed warnings and the root logger's listed messages in this process (idempotent)."""
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z", category=category)
    for name in LOGGERS:
        if _drop not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_drop)


def child_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`env` with PYTHONWARNINGS also ignoring the listed warnings (an exact message, as -W matches it)."""
    rules = [f"ignore:{message}:{category.__name__}" for category, message in WARNINGS]
    return {**env, "PYTHONWARNINGS": ",".join(filter(None, [env.get("PYTHONWARNINGS"), *rules]))}
