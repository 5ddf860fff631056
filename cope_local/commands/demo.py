"""`cope demo` (placeholder while written)."""


def register(sub) -> None:
    pass
