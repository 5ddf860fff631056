"""The Textual drafting studio (`cope tui`). Not built yet: see the open TUI issue.

It will call only cope_local's public API (Decoder, GenConfig, profiles).
"""
