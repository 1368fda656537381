"""Chat prompts: a dialog (a list of {"role", "content"} messages) turned into tokens.

Each model was fine-tuned on one format and only follows instructions given in it:
Llama 3 Instruct on Meta's header format (llama_models/llama3/chat_format.py), SmolLM2
on ChatML. The format is chosen from the tokenizer's special tokens.
Message text is always encoded as plain text, so a user typing "<|eot_id|>" cannot end
their own turn or impersonate the assistant.
"""

from __future__ import annotations

import re

from .errors import TokenizerError

ROLES = ("system", "user", "assistant", "ipython")


def check_dialog(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")


class Llama3Chat:
    """<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|> ...
    then the assistant's header, for the model to write the assistant's turn."""

    name = "llama3"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.end_of_turn = tokenizer.id_of("<|eot_id|>")
        self.stop_ids = set(tokenizer.stop_ids)

    def encode_header(self, role: str) -> list[int]:
        tok = self.tokenizer
        return [tok.id_of("<|start_header_id|>"), *tok.encode(role, bos=False),
                tok.id_of("<|end_header_id|>"), *tok.encode("\n\n", bos=False)]

    def encode_message(self, message: dict) -> list[int]:
        return [*self.encode_header(message["role"]),
                *self.tokenizer.encode(message["content"], bos=False), self.end_of_turn]

    def encode_dialog(self, messages: list[dict]) -> list[int]:
        check_dialog(messages)
        tokens = [self.tokenizer.bos_id]
        for message in messages:
            tokens += self.encode_message(message)
        return tokens + self.encode_header("assistant")


class ChatML:
    """<|im_start|>role\\n content <|im_end|>\\n ... then <|im_start|>assistant\\n (SmolLM2, Qwen)."""

    name = "chatml"

    def __init__(self, tokenizer, default_system: str | None = None):
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.end_of_turn = tokenizer.id_of("<|im_end|>")
        self.stop_ids = set(tokenizer.stop_ids) | {self.end_of_turn}

    def encode_message(self, message: dict) -> list[int]:
        tok = self.tokenizer
        return [tok.id_of("<|im_start|>"), *tok.encode(f"{message['role']}\n{message['content']}", bos=False),
                self.end_of_turn, *tok.encode("\n", bos=False)]

    def encode_dialog(self, messages: list[dict]) -> list[int]:
        check_dialog(messages)
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        tokens = [self.tokenizer.bos_id] if self.tokenizer.add_bos else []
        for message in messages:
            tokens += self.encode_message(message)
        return tokens + [self.tokenizer.id_of("<|im_start|>"), *self.tokenizer.encode("assistant\n", bos=False)]


# A ChatML template's hard-coded system turn, e.g. SmolLM2's
# {{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n' }}
# (the newline is a real one in some templates and the two characters \n in others).
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.+?)<\|im_end\|>", re.DOTALL)


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system message a ChatML chat template inserts when the dialog has none, if any.

    npllama does not run Jinja templates; it only reads this one string out of them, because
    a model fine-tuned with a default system message answers best when it gets it."""
    if not chat_template:
        return None
    match = _CHATML_SYSTEM.search(chat_template)
    # Text built from template variables ("system\n' + message['content'] + '") is not a default.
    if match is None or any(code in match[1] for code in ("{{", "{%", "' +", "\" +", "message[")):
        return None
    return match[1].replace("\\n", "\n")


def chat_format_for(tokenizer, default_system: str | None = None):
    """The chat format the tokenizer's special tokens belong to. A ChatML model's default system
    message, unless given, comes from its chat template (tokenizer.chat_template)."""
    specials = tokenizer.special_tokens
    if "<|start_header_id|>" in specials and "<|eot_id|>" in specials:
        return Llama3Chat(tokenizer)
    if "<|im_start|>" in specials and "<|im_end|>" in specials:
        if default_system is None:
            default_system = default_system_prompt(getattr(tokenizer, "chat_template", None))
        return ChatML(tokenizer, default_system)
    raise TokenizerError("this model's tokenizer has neither Llama 3's <|start_header_id|> nor ChatML's "
                         "<|im_start|>: it is not a chat model; run it without --chat")
