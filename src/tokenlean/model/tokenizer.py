"""Tokenizer (`tokenizers`' tokenizer.json, or rebuilt from a GGUF) and chat templates (jinja2)."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from tokenlean.errors import UserError


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


# Special tokens that end a turn in the chat templates of the families we load. A template
# that writes one of them after each message is telling us where the model stops talking.
END_OF_TURN = frozenset({
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>",
    "<|endoftext|>", "<|end_of_text|>", "<|EOT|>", "<|END_OF_TURN_TOKEN|>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",  # DeepSeek's full-width spelling
})


def _folder_parts(folder: Path) -> dict:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder} has no tokenizer.json")
    try:
        tok = _HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise UserError(f"cannot read {path}: {e}") from None
    config = _read_json(folder / "tokenizer_config.json")
    generation = _read_json(folder / "generation_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():  # transformers >= 4.43 saves it here, and reads it first
        template = jinja.read_text(encoding="utf-8")
    eos = generation.get("eos_token_id")
    return {"tok": tok, "chat_template": template,
            "bos_token": _token_text(config.get("bos_token")),
            "eos_token": _token_text(config.get("eos_token")),
            "eos_ids": eos if isinstance(eos, list) else [eos] if eos is not None else []}


class Tokenizer:
    """Text <-> ids, the chat template, and the ids that end a generation.

    `Tokenizer(path)` reads a Hugging Face folder or a .gguf file; `Tokenizer.from_parts`
    takes the pieces. `eos_ids`, the default stop ids, are the union of
    - the given eos ids (generation_config.json's eos_token_id; GGUF's eos/eot/eom ids),
    - the eos token's id (tokenizer_config.json / GGUF),
    - the special or added tokens that appear in the chat template text and are named like an
      end of turn (END_OF_TURN: `<|im_end|>`, `<|eot_id|>`, `<|end|>`, ...), so a model whose
      eos is `<|endoftext|>` but whose turns end with `<|im_end|>` stops after its answer.
      Other special tokens in a template (`<|im_start|>`, `<|end_header_id|>`) are not stops.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.suffix.lower() == ".gguf" and path.is_file():
            from tokenlean.model.gguf_read import GGUFFile  # gguf only when a file needs it

            parts = GGUFFile(path).tokenizer_parts()
        else:
            parts = _folder_parts(path)
        self._setup(**parts)

    @classmethod
    def from_parts(cls, tok: _HFTokenizer, chat_template: str | None = None,
                   bos_token: str | None = None, eos_token: str | None = None,
                   eos_ids: list[int] = ()) -> Tokenizer:
        self = cls.__new__(cls)
        self._setup(tok, chat_template, bos_token, eos_token, eos_ids)
        return self

    def _setup(self, tok, chat_template, bos_token, eos_token, eos_ids) -> None:
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        stops = set(eos_ids)
        if eos_token and tok.token_to_id(eos_token) is not None:
            stops.add(tok.token_to_id(eos_token))
        for i, added in tok.get_added_tokens_decoder().items():
            if added.content in END_OF_TURN and added.content in (chat_template or ""):
                stops.add(i)
        self.eos_ids = sorted(stops)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise UserError("this model has no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise UserError(f"chat template: {e}") from None

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    A character split across tokens (multi-byte UTF-8 under byte-level BPE)
    decodes to U+FFFD until its last byte arrives: hold it back until then.
    Decoding from a short window before the new tokens keeps each call cheap
    and keeps tokenizers' spacing rules right at the join.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window decoded before the new text
        self.read_offset = 0  # ids before this are already turned into text

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset])
        after = decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset])
        after = decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :]
