"""cope-local's terminal UI (Textual): draft, chat, history and profiles.

    cope tui            (or: python -m tui)

Uses only cope_local's public API; never imports torch or transformers (training runs
`cope profile train` in a child process).
"""


def run(**options) -> int:
    """Start the app; options as CopeApp takes them (profile, model, task, max_tokens, ...)."""
    from tui.app import CopeApp

    CopeApp(**options).run()
    return 0
