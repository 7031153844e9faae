"""The prompt template: how fine-tuning shows a prompt to the model, and generation shows it again.

finetune.py formats every prompt/completion example through a PromptTemplate and records its text
in each checkpoint's finetune.json; generate.py reads that text back (checkpoint.prompt_template)
and formats the user's prompts through the same object, so the model sees what it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError

PLACEHOLDER = "{prompt}"
DEFAULT_TEMPLATE = "### Prompt:\n{prompt}\n\n### Response:\n"


@dataclass(frozen=True)
class PromptTemplate:
    """Text with {prompt} exactly once, where the prompt goes."""

    text: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        if self.text.count(PLACEHOLDER) != 1:
            raise DataError(f"the prompt template must contain {PLACEHOLDER} exactly once, got {self.text!r}")

    def format(self, prompt: str) -> str:
        """The text the model sees before a completion (plain substitution: braces in prompts are text)."""
        return self.text.replace(PLACEHOLDER, prompt)
