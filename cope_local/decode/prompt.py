"""Prompt text from chat messages, the same way at training and drafting time.

The GGUF's own Jinja chat template is rendered (sandboxed, as transformers
does); a model without one gets a plain-text layout. BOS is never part of the
rendered text's contract: `with_bos` adds it exactly once, and only when the
model's `add_bos_token` flag asks for it (Gemma yes, SmolLM2 no). The paper's
code doubled BOS; this is the one place that decides it.
"""

from __future__ import annotations

from functools import lru_cache

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(
    messages: list[Message],
    template: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_bos: bool = False,
    add_generation_prompt: bool = True,
) -> str:
    """Messages -> the prompt string the model was trained on."""
    if template:
        text = _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token
        )
        # Templates that print bos_token themselves (Gemma) would double it with
        # the add_bos flag; strip it here and let with_bos() add it once. Where
        # the model adds no BOS the text stays as printed (SmolLM2's "BOS" is
        # <|im_start|>, which its template prints as the start of every turn).
        if add_bos and bos_token and text.startswith(bos_token):
            text = text[len(bos_token):]
        return text
    parts = [m["content"].strip() for m in messages if m["role"] in ("system", "user")]
    return "\n\n".join(parts) + "\n\n"


def with_bos(token_ids: list[int], bos_id: int | None, add_bos: bool) -> list[int]:
    """Prepend BOS once when the model asks for it."""
    if add_bos and bos_id is not None and bos_id >= 0 and (not token_ids or token_ids[0] != bos_id):
        return [bos_id, *token_ids]
    return list(token_ids)
