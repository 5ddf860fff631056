"""Screenshots of the TUI at 80x24 for the README: docs/tui-{draft,chat,history,profiles}.png.

    .venv/bin/python docs/make_tui_screenshots.py [--profile-dir DIR] [--settings dpo=false ...]

Runs the real app headless on the default model in a throw-away COPE_HOME with the sample
persona "ro" (cope_local/data/persona). With --profile-dir (a trained profile folder, e.g.
one made by `cope profile train ro`), drafts use its adapter and the Profiles picture shows
its stages (rerun: all up to date); without it, an untrained random demo adapter stands in.
SVG -> PNG needs `rsvg-convert` (Debian: librsvg2-bin); without it the SVGs are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
SIZE = (80, 24)


async def wait_for(pilot, condition, timeout=600.0):
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise SystemExit("timed out")
        await pilot.pause(0.05)
    await pilot.pause(0.2)


async def shoot(profile_dir: Path | None, settings: list[str], out: Path) -> list[Path]:
    from importlib.resources import files

    from cope_local import profile as profiles
    from tui.app import CopeApp

    persona = str(files("cope_local").joinpath("data/persona/history.jsonl"))
    if profile_dir:
        shutil.copytree(profile_dir, profiles.profile_dir("ro"))
    else:
        from convert.synthetic import write_random_lora
        from cope_local.models import resolve_model

        prof, _, _ = profiles.create_profile("ro", [persona])
        profiles.set_active_adapter(prof, write_random_lora(resolve_model(), prof.adapters_dir / "ro-demo.gguf",
                                                            std=0.08, seed=1))
    app = CopeApp(profile="ro", max_tokens=48, threads=2)
    svgs = []

    def save(name: str) -> None:
        svgs.append(Path(app.save_screenshot(f"tui-{name}.svg", path=str(out))))

    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.model_ready)
        draft = app.screen
        await pilot.press("ctrl+b")
        for text in ("Is the mainsail ready? We sail on Saturday.",
                     "hi ro, the jib tore along the leech again. can you fix it by friday?"):
            draft.query_one("#prompt").load_text(text)
            before = draft.last_result
            await pilot.press("enter")
            await wait_for(pilot, lambda before=before: draft.last_result is not before and not draft.busy)
        draft.query_one("#prompt").focus()
        save("draft")
        await app.switch_mode("chat")
        chat = app.screen
        for text in ("which knot should i use for a jib sheet?", "thanks! and for a fender?"):
            chat.query_one("#chat-input").load_text(text)
            n = len(chat.query("Bubble"))
            await pilot.press("enter")
            await wait_for(pilot, lambda n=n: len(chat.query("Bubble")) == n + 2 and not chat.busy)
        save("chat")
        await app.switch_mode("history")
        app.screen.query_one("#search").focus()
        await pilot.press(*"jib")
        await pilot.pause(0.3)
        save("history")
        await app.switch_mode("profiles")
        await pilot.pause(0.3)
        if profile_dir:
            screen = app.screen
            screen.action_train(settings=settings)
            await wait_for(pilot, lambda: screen.training_profile is None)
            await wait_for(pilot, lambda: app.model_ready)
        save("profiles")
    return svgs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile-dir", type=Path, help="a trained profile folder to copy in as 'ro'")
    ap.add_argument("--settings", nargs="*", default=[], help="the --set KEY=VALUE it was trained with")
    ap.add_argument("--out", type=Path, default=DOCS)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cope-shots-"))
    os.environ["COPE_HOME"] = str(work / "home")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        svgs = asyncio.run(shoot(args.profile_dir, args.settings, work))
        rsvg = shutil.which("rsvg-convert")
        for svg in svgs:
            if rsvg:
                png = args.out / (svg.stem + ".png")
                subprocess.run([rsvg, str(svg), "-o", str(png)], check=True)
                print(png)
            else:
                shutil.copy(svg, args.out / svg.name)
                print(args.out / svg.name, "(no rsvg-convert: SVG kept)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(DOCS.parent))
    raise SystemExit(main())
