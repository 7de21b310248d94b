"""What every command shares: logging and thread setup, ``--param KEY=VALUE`` parsing."""

from __future__ import annotations

import logging

import typer


def setup_logging(verbose: bool, threads: int | None) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False)],
        force=True,
    )
    for noisy in ("transformers", "httpx", "huggingface_hub", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    if threads:
        torch.set_num_threads(threads)


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--param expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out
