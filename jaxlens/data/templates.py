"""Prompt templates: every prompt text jaxlens builds for multiple choice comes from here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxlens.data.items import LETTERS, Item


@dataclasses.dataclass(frozen=True)
class Template:
    """How an item becomes text (str.format patterns).

    stem      the question as shown: {prompt}, {cue} (the cue of the item's kind, from `cues`)
    context   option log-likelihood: the text each option continues ({stem})
    option    an option as a continuation of `context` ({option}); tokenized on its own
    lettered  letter scoring: the prompt whose next token is the answer letter ({stem}, {choices})
    choice    one line of {choices} ({letter}, {option})
    """

    stem: str = "{prompt}"
    cues: tuple[tuple[str, str], ...] = ()
    context: str = "{stem}\nAnswer:"
    option: str = " {option}"
    lettered: str = "{stem}\n{choices}\nAnswer:"
    choice: str = "{letter}. {option}"

    def stem_text(self, item: Item) -> str:
        cues = dict(self.cues)
        if "{cue}" in self.stem and item.kind not in cues:
            raise ValueError(f"template has no cue for question kind {item.kind!r} (item {item.id}, {item.lang}); "
                             f"it knows {sorted(cues)}")
        return self.stem.format(prompt=item.prompt, cue=cues.get(item.kind, ""))

    def context_text(self, item: Item) -> str:
        return self.context.format(stem=self.stem_text(item))

    def option_text(self, option: str) -> str:
        return self.option.format(option=option)

    def lettered_text(self, item: Item) -> str:
        choices = "\n".join(self.choice.format(letter=LETTERS[k], option=o) for k, o in enumerate(item.options))
        return self.lettered.format(stem=self.stem_text(item), choices=choices)

    def override(self, path) -> "Template":
        """This template with the fields a JSON file sets, e.g. {"context": "{stem}\nAnswer:", "cues": {"cause": "Why?"}}."""
        try:
            fields = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read template {path}: {e}") from None
        known = {f.name for f in dataclasses.fields(self)}
        if not isinstance(fields, dict) or set(fields) - known or not all(isinstance(v, (str, dict)) for v in fields.values()):
            raise ValueError(f"template {path}: expected a JSON object of strings with fields from {sorted(known)} "
                             "(cues: an object {kind: text})")
        if "cues" in fields:
            if not isinstance(fields["cues"], dict):
                raise ValueError(f"template {path}: cues must be an object {{kind: text}}")
            fields["cues"] = tuple(sorted(fields["cues"].items()))
        return dataclasses.replace(self, **fields)


# The instructions stay in English for every language (the item text is in its own language), so
# a language's score moves with its content, not with how well the model reads translated cues.
XCOPA_TEMPLATE = Template(
    stem="{prompt}\nQuestion: {cue}",
    cues=(("cause", "What was the cause?"), ("effect", "What happened as a result?")),
)
JSONL_TEMPLATE = Template()
TEMPLATES = {"xcopa": XCOPA_TEMPLATE, "jsonl": JSONL_TEMPLATE}
