"""Task templates (email-reply, email, review, post, rewrite, headline, title, free, lamp7).

    task = get_task("email-reply")
    items = task.make_inputs(items, generate)       # fills missing inputs (paraphrases via the base model)
    messages, target = task.training_pair(item)     # for SFT / DPO
    messages = task.draft_messages("Can we meet Tuesday?")
"""

from cope_local.tasks.registry import (
    DEFAULT_TASK,
    PARAPHRASE_EXAMPLES,
    PARAPHRASE_INSTRUCTION,
    TASKS,
    Messages,
    Task,
    clean_generated,
    echoes_example,
    get_task,
    list_tasks,
    paraphrase_messages,
    topic_of,
)

__all__ = ["DEFAULT_TASK", "PARAPHRASE_EXAMPLES", "PARAPHRASE_INSTRUCTION", "TASKS", "Messages", "Task",
           "clean_generated", "echoes_example", "get_task", "list_tasks", "paraphrase_messages", "topic_of"]
