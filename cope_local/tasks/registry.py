"""Task templates: how a history item becomes a (prompt, target) pair, and how a draft is asked for.

Training and drafting build their prompts from the same template, so the
model sees at draft time exactly the wording it was trained on (the paper's
code used different templates for the two). A prompt is a list of chat
messages; the caller applies the model's chat template.

Items without an input get one: topic tasks (email, post, review, free) use
the subject, title or first line; source tasks (rewrite, LaMP-7) need a
neutral paraphrase from the base model, made by `Task.make_inputs(items,
generate)` with a decoder-backed `generate(prompt) -> text` passed in (this
module never imports a decoder); headline/title items without their article
are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from cope_local.errors import CopeError
from cope_local.ingest.items import DEFAULT_INPUT_FIELDS, DEFAULT_TARGET_FIELDS, HistoryItem

Messages = list[dict[str, str]]
MAIL_INPUTS = {"in-reply-to", "quoted", "subject-match"}  # input_from values meaning "the mail replied to"

# 2-shot, as chat turns: a 135M instruct model refuses or copies with a zero-shot paraphrase prompt
# (shared/notes/pilot-lamp7.md), and with both examples inside one message it answered with the first
# example's rewrite instead: 1,079 of the 2,312 LaMP-7 dev training inputs of sessions 1-6 echoed it ("It is
# raining again. This summer has been very bad."; 16 of 40 tweets tried; as turns: 0 of 40, README).
PARAPHRASE_INSTRUCTION = ("Rewrite the text in plain, neutral words. Keep the meaning; drop the style. "
                          "Answer with the rewritten text only.\n\nText: ")
PARAPHRASE_EXAMPLES = (
    ("omg cant believe its raining AGAIN. worst summer ever lol", "It is raining again. This summer has been very bad."),
    ("just finished my first 10k!!! legs are jelly but SO worth it",
     "I finished my first 10-kilometre run. My legs are tired, but it was worth it."),
)


def paraphrase_messages(text: str) -> Messages:
    """The chat the base model answers with a neutral paraphrase of `text`: the examples as earlier turns."""
    turns: Messages = []
    for example, rewritten in PARAPHRASE_EXAMPLES:
        turns += [{"role": "user", "content": PARAPHRASE_INSTRUCTION + example}, {"role": "assistant", "content": rewritten}]
    return turns + [{"role": "user", "content": PARAPHRASE_INSTRUCTION + text}]


# How an answer is cleaned (clean_generated), for the key: other cleaning makes other inputs from the same answers.
PARAPHRASE_CLEANING = "first paragraph; no label, quotes or refusal; up to the first repeated sentence"


def paraphrase_fingerprint() -> str:
    """What the paraphrase prompt and its cleaning are, for the inputs stage's key."""
    import hashlib
    import json

    made_by = [PARAPHRASE_INSTRUCTION, PARAPHRASE_EXAMPLES, PARAPHRASE_CLEANING]
    return hashlib.sha256(json.dumps(made_by).encode()).hexdigest()[:16]


def echoes_example(made: str, n: int = 5) -> bool:
    """The answer repeats n words in a row of an example's rewrite ("It's raining again. This summer
    has been..."): the model answered the examples, not the text."""
    said = f" {_norm(made)} "
    for _, rewritten in PARAPHRASE_EXAMPLES:
        words = _norm(rewritten).split()
        if any(f" {' '.join(words[i:i + n])} " in said for i in range(len(words) - n + 1)):
            return True
    return False


_REFUSAL_RE = re.compile(r"^\s*(i'?m sorry|sorry,|i can(no|')t|as an ai)", re.IGNORECASE)
_NOTHING_RE = re.compile(r"^\s*i'?m not sure what to say\W*$", re.IGNORECASE)  # the whole answer, after repeats go
_PREFIX_RE = re.compile(r"^\s*(re|fw|fwd|aw|wg|sv)(\[\d+\])?\s*:\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    template: str  # the user message; {input} is the item's input at training time, the user's text when drafting
    default_alpha: float  # CoPe contrast weight (expert minus alpha * amateur)
    max_new_tokens: int  # draft length cap
    input_kind: str  # "reply" (input = mail replied to), "topic" (subject/title/first line), "source" (text to transform)
    missing: str  # item without input: "topic" (derive it), "paraphrase" (base model makes one), "drop"
    fallback: str | None = None  # task whose template serves items without input (email-reply -> email)
    target_fields: tuple[str, ...] = DEFAULT_TARGET_FIELDS  # row fields holding the user's text (ingest)
    input_fields: tuple[str, ...] = DEFAULT_INPUT_FIELDS  # row fields holding its input (ingest)
    input_format: str = ""  # several row fields joined into {input} (LongLaMP review); "" = one field of input_fields
    default_tau: float = 0.1  # CoPe head set: p_user >= tau * max p_user; the paper's 0.1 unless measured on the task
    sft_mode: str = "user"  # draft mode of an OPPU (SFT-only) adapter: "cope" only where the contrast on it measured better

    def row_input(self, row: dict) -> str | None:
        """{input} for a multi-field benchmark row (input_format), or None when the task has none or a field is missing."""
        if not self.input_format:
            return None
        keys = re.findall(r"{(\w+)}", self.input_format)
        if any(row.get(k) in (None, "") for k in keys):
            return None
        return self.input_format.format(**{k: str(row[k]).strip() for k in keys})

    def draft_messages(self, user_text: str) -> Messages:
        """Chat messages asking for a draft; `user_text` fills {input} (the mail to answer, a topic, a text)."""
        return [{"role": "user", "content": self.template.format(input=user_text.strip())}]

    def needs_generated_input(self, item: HistoryItem) -> bool:
        return not item.input and self.missing == "paraphrase"

    def prompt_input(self, item: HistoryItem) -> str | None:
        """The text that fills {input} for this item, or None when it has to be made or dropped."""
        if self.input_kind == "topic" and (not item.input or item.meta.get("input_from") in MAIL_INPUTS):
            return topic_of(item)  # a replied-to mail is not the topic of a new email
        if item.input:
            return item.input
        return topic_of(item) if self.missing == "topic" else None

    def training_pair(self, item: HistoryItem) -> tuple[Messages, str]:
        """(chat messages, target text) for SFT/DPO; raises ValueError if the item needs make_inputs first."""
        if not item.input and self.fallback:
            return get_task(self.fallback).training_pair(item)
        text = self.prompt_input(item)
        if text is None:
            raise ValueError(f"item {item.id} has no input for task {self.name}; run task.make_inputs(items, generate) first")
        return self.draft_messages(text), item.output

    def make_inputs(self, items: Iterable[HistoryItem], generate: Callable[[str], str] | None = None) -> list[HistoryItem]:
        """Items every one of which `training_pair` accepts: paraphrases generated, unusable items dropped."""
        out = []
        for item in items:
            if item.input or self.fallback or self.missing == "topic":
                out.append(item)
            elif self.missing == "paraphrase":
                if generate is None:
                    raise ValueError(f"task {self.name}: items without input need a generate function for paraphrases")
                made = clean_generated(generate(paraphrase_messages(item.output.strip())))
                if made and _norm(made) != _norm(item.output) and not echoes_example(made):
                    out.append(replace(item, input=made, meta={**item.meta, "input_from": "generated"}))
                else:  # the small model copied, refused or echoed an example: fall back to the text itself, as the pilot did
                    out.append(replace(item, input=item.output, meta={**item.meta, "input_from": "generated-copy"}))
            # missing == "drop": a headline without its article teaches nothing
        return out


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text).strip().casefold()


def gives_away(made_input: str, text: str) -> bool:
    """True when an input made for `text` holds all of it (case, spacing and punctuation aside): a
    paraphrase that copied the text, perhaps with more around it."""
    return bool(_norm(text)) and f" {_norm(text)} " in f" {_norm(made_input)} "


def clean_generated(text: str) -> str:
    """First paragraph of a model's answer, without a 'Rewritten:' label, quotes or a refusal."""
    text = (text or "").strip()
    text = re.sub(r"^\s*(rewritten|paraphrase|text)\s*:\s*", "", text, flags=re.IGNORECASE)
    text = text.split("\n\n")[0].strip().strip('"“”').strip()
    if _REFUSAL_RE.match(text):
        return ""
    text = until_repeat(text)
    return "" if _NOTHING_RE.match(text) else text


_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_BREAK.split(text.strip()) if s]


def until_repeat(text: str) -> str:
    """The text up to the first sentence that repeats an earlier one. SmolLM2-135M often loops on a
    sentence until the token cap ("I'm glad to hear that." x14, then "I'm glad to hear"): 206 of 718
    LaMP-7 paraphrases of 7 users (README). A cut-off last sentence that an earlier one begins with goes too."""
    kept: list[str] = []
    seen: set[str] = set()
    sentences = _sentences(text)
    for i, sentence in enumerate(sentences):
        key = _norm(sentence)
        cut = i == len(sentences) - 1 and not re.search(r"[.!?]\W*$", sentence)
        if key in seen or (cut and key and any(s.startswith(key) for s in seen)):
            break
        seen.add(key)
        kept.append(sentence)
    return " ".join(kept)


def loops(text: str) -> bool:
    """A finished sentence of `text` repeats an earlier one: generating more cannot change what
    `until_repeat` keeps, so a paraphrase may stop here."""
    done = [_norm(s) for s in _SENTENCE_BREAK.split(text.lstrip())[:-1]]  # the last one may still grow
    return len(set(done)) < len(done)


def topic_of(item: HistoryItem) -> str:
    """Subject or title (Re:/Fw: stripped), else the first line; a one-line text gives its first third."""
    for key in ("subject", "title"):
        value = item.meta.get(key)
        if isinstance(value, str) and _PREFIX_RE.sub("", value).strip():
            while _PREFIX_RE.match(value):
                value = _PREFIX_RE.sub("", value, count=1)
            return value.strip()
    lines = [x.strip() for x in item.output.strip().split("\n") if x.strip()]
    first = lines[0] if lines else ""
    words = first.split()
    if len(lines) <= 1:  # the first line is the whole text: a topic must not give it away
        keep = max(3, len(words) // 3)
        return " ".join(words[:keep]) + (" …" if keep < len(words) else "")
    return " ".join(words[:15]) + (" …" if len(words) > 15 else "")


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("email-reply", "reply to an email in your voice (input: the email you answer)",
             "Write a reply to this email:\n\n{input}",
             default_alpha=0.3,  # 0.3: the brief's default; paper uses 0.1-0.3, no reply-task evidence either way
             max_new_tokens=200, input_kind="reply", missing="topic", fallback="email"),
        Task("email", "write a new email (input: subject or what it is about)",
             "Write an email about: {input}",
             default_alpha=0.3, max_new_tokens=200, input_kind="topic", missing="topic"),
        Task("review", "write a review (input: the product, place or thing reviewed)",
             "Write a review of: {input}",
             default_alpha=0.3, max_new_tokens=300, input_kind="topic", missing="topic",
             input_fields=("input", "description", "summary", "title", "query", "prompt")),
        Task("post", "write a social media / blog post (input: its topic)",
             "Write a post about: {input}",
             default_alpha=0.3, max_new_tokens=100, input_kind="topic", missing="topic"),
        Task("rewrite", "rewrite a text in your voice (input: the text to rewrite)",
             "Rewrite this text in my style, without any explanation before or after it:\n\n{input}",
             default_alpha=0.1,  # a near-copy task: alpha .1 beat .3 on LaMP-7 in the pilot (shared/notes/pilot-lamp7.md)
             max_new_tokens=150, input_kind="source", missing="paraphrase"),
        Task("headline", "write a news headline (input: the article) - LaMP-4",
             "Generate a headline for the following article: {input}",
             default_alpha=0.3,  # 0.3: the value the paper's code uses for headlines
             max_new_tokens=32, input_kind="source", missing="drop",
             target_fields=("output", "title", "headline"), input_fields=("input", "text", "article", "abstract")),
        Task("title", "write a paper title (input: the abstract) - LaMP-5",
             "Generate a title for the following abstract of a paper: {input}",
             default_alpha=0.3, max_new_tokens=32, input_kind="source", missing="drop",
             target_fields=("output", "title"), input_fields=("input", "abstract", "text")),
        Task("free", "free writing (input: a topic or first line)",
             "Write a text about: {input}",
             default_alpha=0.3, max_new_tokens=200, input_kind="topic", missing="topic"),
        Task("lamp7", "paraphrase a tweet in your voice - LaMP-7",
             "Paraphrase the following tweet without any explanation before or after it: {input}",
             default_alpha=0.7,  # `cope eval sweep`, 39 LaMP-7 dev users, clean inputs: CoPe - OPPU ROUGE-L -.004/-.001/
             #   +.005/+.013 at .1/.3/.5/.7 (tau .1), and .9/1.0 collapse (-.033/-.098) (README "Results")
             max_new_tokens=64, input_kind="source", missing="paraphrase",
             default_tau=0.3,  # at alpha .7: +.009/.013/.013/.018/.015/.015 at tau .05/.1/.2/.3/.4/.5 (.3-.5: CIs above 0);
             #   the point chosen on either half of the queries among alpha .5/.7 x tau .1-.5, +.018 [+.006, +.032]
             sft_mode="cope"),  # so an OPPU adapter drafts with the contrast here (attribution +.029 [+.005, +.053])
    ]
}
# Benchmark-only tasks (LongLaMP, Kumar et al. 2024), with the benchmarks' own prompts: `cope eval` and get_task
# find them; they stay out of TASKS so the everyday task pickers (CLI help, TUI) list only writing tasks.
BENCHMARK_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("abstract-generation", "write a paper abstract (input: its title) - LongLaMP-2",
             'Generate an abstract for the title "{input}"',
             default_alpha=0.1,  # 0.1: the paper code's default (no per-task value for LongLaMP)
             max_new_tokens=600, input_kind="source", missing="drop",  # 600: the paper's cap for LongLaMP
             target_fields=("output", "abstract"), input_fields=("input", "title")),
        Task("review-writing", "write a product review (input: rating, description, summary) - LongLaMP-3",
             "Generate the review text written by a reviewer who has a given an overall rating of {input}",
             default_alpha=0.1, max_new_tokens=600, input_kind="source", missing="drop",
             target_fields=("output", "reviewText", "review"), input_fields=("input", "summary", "description"),
             input_format='"{overall}" for a product with description "{description}". '
                          'The summary of the review text is "{summary}".'),
        Task("topic-writing", "write a reddit post (input: its summary) - LongLaMP-4",
             "Generate the content for a reddit post {input}",
             default_alpha=0.1, max_new_tokens=600, input_kind="source", missing="drop",
             target_fields=("output", "content"), input_fields=("input", "summary")),
    ]
}
ALIASES = {"lamp-7": "lamp7", "reply": "email-reply", "tweet": "lamp7", "lamp-4": "headline", "lamp-5": "title",
           "longlamp-2": "abstract-generation", "longlamp-3": "review-writing", "longlamp-4": "topic-writing"}
DEFAULT_TASK = "email-reply"


def get_task(name: str) -> Task:
    key = (name or "").strip().lower()
    key = ALIASES.get(key, key).replace("_", "-")
    if key in BENCHMARK_TASKS:
        return BENCHMARK_TASKS[key]
    if key not in TASKS:
        raise CopeError(f"--task {name!r}: unknown task; choose one of: {', '.join(TASKS)}")
    return TASKS[key]


def list_tasks() -> list[Task]:
    return list(TASKS.values())
