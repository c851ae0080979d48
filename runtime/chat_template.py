"""What a pipeline prompt becomes before the tokenizer: LMDeploy's `do_preprocess` and `ChatTemplateConfig`.

kubellm sends a string prompt to the model as is and renders chat messages with the checkpoint's own chat
template (tokenizer_config.json). LMDeploy's options change that per pipeline and per call:

- `do_preprocess=True` (LMDeploy's default): a string is one user message, rendered by the chat template;
  `do_preprocess=False`: a string goes as is (chat messages are refused: they need a template);
  `do_preprocess=None` (kubellm's default): strings as is, chat messages rendered.
- `ChatTemplateConfig(model_name, ...)`: with any of the template's pieces (system, user, eoh, assistant, eoa,
  separator, eosys) the prompt is rendered from those pieces, as LMDeploy's BaseChatTemplate does; without,
  the checkpoint's own template renders it (LMDeploy picks a built-in template by `model_name`; kubellm carries
  none, so the checkpoint must have one). `meta_instruction` is the system message of conversations that
  have none; `stop_words` join every request's; `capability='completion'` sends strings as is.

Pure functions of the prompt and the config (no tokenizer): table-tested.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from kubellm.runtime.errors import RequestError

_PIECES = ("system", "eosys", "user", "eoh", "assistant", "eoa", "separator")


@dataclass
class ChatTemplateConfig:
    """LMDeploy's chat template config (docs/seeds.md): the pieces a prompt is rendered from."""

    model_name: str | None = None
    system: str | None = None            # begins the system message
    meta_instruction: str | None = None  # the system message of a conversation that has none
    eosys: str | None = None             # ends the system message
    user: str | None = None              # begins a user message
    eoh: str | None = None               # ends a user message
    assistant: str | None = None         # begins an assistant message (and the reply)
    eoa: str | None = None               # ends an assistant message
    separator: str | None = None         # after an assistant message's eoa
    capability: Literal["completion", "infilling", "chat", "python"] | None = None
    stop_words: list[str] | None = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "stop_words":
                if value is not None and (not isinstance(value, (list, tuple)) or
                                          not all(isinstance(w, str) and w for w in value)):
                    raise ValueError(f"ChatTemplateConfig.stop_words: expected a list of non-empty strings, "
                                     f"got {value!r}")
            elif f.name == "capability":
                if value not in (None, "completion", "chat"):
                    raise ValueError(f"ChatTemplateConfig.capability: {value!r} is a code model's mode of LMDeploy "
                                     "(infilling / python prompts) that kubellm does not render; use 'chat' or "
                                     "'completion'")
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"ChatTemplateConfig.{f.name}: expected a string, got {type(value).__name__}")

    @property
    def has_pieces(self) -> bool:
        return any(getattr(self, name) is not None for name in _PIECES)


def render_pieces(template: ChatTemplateConfig, messages: list[dict], field: str = "prompt") -> str:
    """Messages -> the prompt text, from the template's pieces (LMDeploy's BaseChatTemplate.messages2prompt):
    each message between its role's opening and closing piece; the meta instruction first as the system
    message when there is none; the assistant's opening piece last, where the reply begins."""
    piece = {name: getattr(template, name) or "" for name in _PIECES}
    opens = {"system": piece["system"], "user": piece["user"], "assistant": piece["assistant"]}
    closes = {"system": piece["eosys"], "user": piece["eoh"], "assistant": piece["eoa"] + piece["separator"]}
    text = ""
    if template.meta_instruction is not None and not (messages and messages[0].get("role") == "system"):
        text += f"{opens['system']}{template.meta_instruction}{closes['system']}"
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in opens:
            raise RequestError(f"{field}[{i}].role: {role!r}; the template's pieces render the roles system, "
                               "user and assistant")
        if not isinstance(content, str):
            raise RequestError(f"{field}[{i}].content: expected a string, got {type(content).__name__}")
        text += f"{opens[role]}{content}{closes[role]}"
    return text + opens["assistant"]


def _is_chat(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def prepare_prompt(prompt, do_preprocess: bool | None, template: ChatTemplateConfig | None, field: str = "prompt"):
    """A pipeline prompt -> what the tokenizer gets: a string as is, token ids as is, or chat messages (which
    the tokenizer renders with the checkpoint's template). See the module docstring for the rules."""
    if isinstance(prompt, str):
        as_is = (do_preprocess is None or do_preprocess is False
                 or (template is not None and template.capability == "completion"))
        if as_is:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    elif _is_chat(prompt):
        if do_preprocess is False:
            raise RequestError(f"{field}: do_preprocess=False sends the prompt to the model as is, and chat "
                               "messages need the chat template; pass a string, or do_preprocess=True")
    else:
        return prompt   # token ids (or something the tokenizer refuses with its own message)
    messages = [dict(m) for m in prompt]
    if template is None:
        return messages
    if template.has_pieces:
        return render_pieces(template, messages, field)
    if template.meta_instruction is not None and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": template.meta_instruction})
    return messages
