"""Helpers for the TUI tests (tests/test_tui_*.py): start the app on the real default model, wait for it.

Not a test module; imported by them. Every app runs llama.cpp on 1 thread (2 shared cores)
and drafts a few tokens only.
"""

from __future__ import annotations

import asyncio
import functools
import time
from importlib.resources import files
from pathlib import Path

PERSONA = str(files("cope_local").joinpath("data/persona/history.jsonl"))
SIZE = (80, 24)


def sync(fn):
    """Run an async test body with asyncio.run (no pytest-asyncio needed); fixtures pass through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


def make_app(**kwargs):
    from tui.app import CopeApp

    kwargs.setdefault("profile", None)
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("threads", 1)
    return CopeApp(**kwargs)


async def wait_for(pilot, condition, timeout: float = 60.0, what: str = "condition") -> float:
    """Let the app run until condition() holds -> seconds waited; fail after `timeout`."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            what = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; screen {pilot.app.screen!r}, "
                                 f"status {_status(pilot.app)!r}")
        await pilot.pause(0.02)
    return time.monotonic() - t0


async def ready(pilot) -> None:
    """The model is loaded and the footer has settled."""
    await wait_for(pilot, lambda: pilot.app.model_ready, what="the model to load")
    await pilot.pause(0.05)


async def draft(pilot, text: str) -> None:
    """Type `text` into the Draft screen's input, press Enter, wait until the draft is done."""
    screen = pilot.app.screen
    before = screen.last_result
    screen.query_one("#prompt").focus()
    screen.query_one("#prompt").load_text(text)
    await pilot.press("enter")
    await wait_for(pilot, lambda: screen.last_result is not before and not screen.busy, what="the draft to finish")
    await pilot.pause(0.05)


def persona_profile(name: str = "ro", adapter: bool = True, seed: int = 1) -> Path:
    """A profile of the sample persona with a random (untrained) LoRA as its active adapter -> its folder."""
    from convert.synthetic import write_random_lora
    from cope_local import profile as profiles
    from cope_local.models import resolve_model

    prof, _items, _report = profiles.create_profile(name, [PERSONA])
    if adapter:
        path = write_random_lora(resolve_model(), prof.adapters_dir / f"{name}-demo.gguf", std=0.1, seed=seed)
        profiles.set_active_adapter(prof, path)
    return prof.path


def _status(app) -> str:
    try:
        return str(app.screen.query_one("#status").render())
    except Exception:  # a modal has none
        return ""
