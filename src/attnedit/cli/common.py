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


SADR_PREFIX = "sadr_"  # --param sadr_gamma=0.1: a setting of the SADR term, not of the method


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` pairs as a dict (the values still text)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--param expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out


def split_sadr(overrides: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Parsed ``--param`` overrides -> (the method's fields, the SADR settings): ``sadr_KEY=VALUE`` is
    the SADR setting KEY, handed to ``make_editor(..., sadr=...)`` like ``--gamma``/``--sadr-*``."""
    params = {k: v for k, v in overrides.items() if not k.startswith(SADR_PREFIX)}
    sadr = {k.removeprefix(SADR_PREFIX): v for k, v in overrides.items() if k.startswith(SADR_PREFIX)}
    return params, sadr
