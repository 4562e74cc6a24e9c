"""Turning rows into token ids plus a per-token loss mask (pretraining text, or chat/SFT conversations).

The loss mask says which tokens are *targets*: for pretraining every token, for SFT only the assistant replies and
their end-of-turn token. Shifting into labels happens later, in packing, where sample boundaries are known.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from .sources import DataError, RowLocation, resolve_path

KNOWN_ROLES = ("system", "user", "assistant", "tool")
Mode = Literal["auto", "pretrain", "sft"]


def load_tokenizer(tokenizer: str, gguf_file: str | None = None) -> Any:
    """Load a Hugging Face tokenizer from a local folder, a ``package:`` path, or a ``.gguf`` file.

    ``tokenizer`` pointing straight at a ``.gguf`` file is split into folder + ``gguf_file`` for convenience.
    Raises ``DataError`` when the location does not exist.
    """
    from transformers import AutoTokenizer  # local: keeps `import veomni_lightning.data` light

    path = resolve_path(tokenizer)
    if gguf_file is None and path.lower().endswith(".gguf") and os.path.isfile(path):
        path, gguf_file = os.path.split(path)
    if not os.path.isdir(path):
        raise DataError(
            f"tokenizer {tokenizer!r} (resolved to {path}) is not a folder. Fix: give a local tokenizer/model folder, "
            f"a .gguf file, or a 'package:<name>/<path>' location."
        )
    if gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)):
        raise DataError(f"tokenizer_gguf_file {gguf_file!r} not found in {path}. Fix: check the file name.")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(path, **kwargs)


def pad_token_id(tok: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0 (padding is never a loss token)."""
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


class SampleEncoder:
    """Validate one row and encode it as ``(input_ids, loss_mask)``; row problems raise ``DataError`` with location.

    Only problems of the row itself are ``DataError`` (and so skippable with ``on_bad_row="skip"``); any other
    exception is a bug or a setup problem and propagates with its own type.

    ``mode="auto"`` picks SFT for rows holding ``messages_key`` and pretraining for rows holding ``text_key``.
    SFT masking is template-agnostic: if the chat template marks assistant text with ``{% generation %}`` the
    tokenizer's ``return_assistant_tokens_mask`` is used; otherwise conversation prefixes are rendered as text and
    diffed to find each assistant reply's character span, which is then mapped onto tokens via offsets.
    """

    def __init__(
        self,
        tokenizer: Any,
        mode: Mode = "auto",
        text_key: str = "text",
        messages_key: str = "messages",
        add_eos: bool = True,
    ) -> None:
        self.tok = tokenizer
        self.mode = mode
        self.text_key = text_key
        self.messages_key = messages_key
        self.add_eos = add_eos
        self.eos_id = tokenizer.eos_token_id
        self.eos_str = tokenizer.eos_token
        template = getattr(tokenizer, "chat_template", None) or ""
        self.has_template = bool(template)
        self.template_has_generation = "generation" in template and "{%" in template and "endgeneration" in template

    # ----------------------------------------------------------------------------------------------- dispatch
    def encode(self, row: Any, loc: RowLocation) -> tuple[list[int], list[bool]]:
        """Encode a parsed row; raises ``DataError`` (naming ``loc``) if it is malformed."""
        if not isinstance(row, dict):
            raise DataError(
                f"{loc}: row is a {type(row).__name__}, expected a JSON object. Fix: each row must look like "
                f'{{"{self.text_key}": "..."}} or {{"{self.messages_key}": [...]}}.'
            )
        mode = self.mode
        if mode == "auto":
            if row.get(self.messages_key) is not None:
                mode = "sft"
            elif row.get(self.text_key) is not None:
                mode = "pretrain"
            else:
                raise DataError(
                    f"{loc}: row has neither {self.text_key!r} nor {self.messages_key!r} (keys: {sorted(row)[:8]}). "
                    f"Fix: add one of them, or set text_key/messages_key to the field names your data uses."
                )
        if mode == "sft":
            return self._encode_chat(row, loc)
        return self._encode_text(row, loc)

    # ----------------------------------------------------------------------------------------------- pretrain
    def _encode_text(self, row: dict, loc: RowLocation) -> tuple[list[int], list[bool]]:
        if self.text_key not in row:
            raise DataError(
                f"{loc}: missing key {self.text_key!r} (keys: {sorted(row)[:8]}). Fix: add it or set text_key."
            )
        text = row[self.text_key]
        if not isinstance(text, str):
            raise DataError(
                f"{loc}: {self.text_key!r} is a {type(text).__name__}, expected a string. Fix: store the text as a string."
            )
        ids = list(self.tok(text, add_special_tokens=True)["input_ids"])
        if self.add_eos and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(int(self.eos_id))
        return ids, [True] * len(ids)

    # ----------------------------------------------------------------------------------------------- sft
    def _validate_messages(self, row: dict, loc: RowLocation) -> list[dict]:
        if self.messages_key not in row:
            raise DataError(f"{loc}: missing key {self.messages_key!r}. Fix: add it or set messages_key.")
        msgs = row[self.messages_key]
        if not isinstance(msgs, list):
            raise DataError(
                f"{loc}: {self.messages_key!r} is a {type(msgs).__name__}, expected a list. Fix: store it as a list "
                f'of {{"role": ..., "content": ...}} objects.'
            )
        if not msgs:
            raise DataError(f"{loc}: {self.messages_key!r} is empty. Fix: drop the row or add the conversation turns.")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(
                    f"{loc}: message {i} is a {type(m).__name__}, expected an object. Fix: write each message as "
                    f'{{"role": ..., "content": ...}}.'
                )
            role, content = m.get("role"), m.get("content")
            if role not in KNOWN_ROLES:
                raise DataError(
                    f"{loc}: message {i} has unknown role {role!r}. Fix: use one of {', '.join(KNOWN_ROLES)} "
                    f"(rename e.g. 'human'/'gpt' to 'user'/'assistant')."
                )
            if not isinstance(content, str):
                raise DataError(
                    f"{loc}: message {i} content is a {type(content).__name__}, expected a string. Fix: store "
                    f"plain-text content (multimodal content lists are not supported here)."
                )
            clean.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in clean):
            raise DataError(
                f"{loc}: conversation has no assistant message, so nothing would be learned from it. "
                f"Fix: drop the row or add the assistant reply."
            )
        return clean

    def _apply_template(self, msgs: list[dict], loc: RowLocation, **kwargs: Any) -> Any:
        """``tokenizer.apply_chat_template``; only the template's own rejection of this row becomes a ``DataError``.

        That is jinja2's runtime ``TemplateError`` family: ``raise_exception(...)`` in the template (transformers
        raises ``jinja2.exceptions.TemplateError`` for it, e.g. "roles must alternate") or an undefined field. A
        template that does not compile (``TemplateSyntaxError``) is a setup problem of every row, and any other
        exception (a bug in our code or in the tokenizer) propagates unchanged, so ``on_bad_row="skip"`` never
        hides it.
        """
        from jinja2.exceptions import TemplateError, TemplateSyntaxError  # local: keeps the import light

        try:
            return self.tok.apply_chat_template(msgs, **kwargs)
        except TemplateSyntaxError:
            raise
        except TemplateError as e:
            raise DataError(
                f"{loc}: the chat template rejected this conversation: {e}. Fix: reorder/repair the turns as the "
                f"template requires, or drop the row."
            ) from e

    def _render(self, msgs: list[dict], loc: RowLocation, add_generation_prompt: bool = False) -> str:
        return self._apply_template(msgs, loc, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _encode_chat(self, row: dict, loc: RowLocation) -> tuple[list[int], list[bool]]:
        if not self.has_template:
            raise DataError(
                f"{loc}: row has {self.messages_key!r} but the tokenizer has no chat template. Fix: use a tokenizer "
                f"with a chat_template, or provide pretraining rows with {self.text_key!r}."
            )
        msgs = self._validate_messages(row, loc)
        if self.template_has_generation:
            return self._encode_chat_generation_tags(msgs, loc)
        return self._encode_chat_by_diff(msgs, loc)

    def _encode_chat_generation_tags(self, msgs: list[dict], loc: RowLocation) -> tuple[list[int], list[bool]]:
        out = self._apply_template(msgs, loc, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = [int(x) for x in out["input_ids"]]
        mask = [bool(x) for x in out["assistant_masks"]]
        return ids, mask

    def _assistant_char_spans(self, msgs: list[dict], loc: RowLocation) -> tuple[str, list[tuple[int, int]]]:
        """Render prefixes and diff them: returns the full text and the character spans that are loss targets."""
        full = self._render(msgs, loc)
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            upto = self._render(msgs[: i + 1], loc)
            if not full.startswith(upto):
                raise DataError(
                    f"{loc}: the chat template is not prefix-stable (rendering the first {i + 1} messages is not a "
                    f"prefix of the whole conversation), so assistant tokens cannot be located. Fix: use a template "
                    f"with {{% generation %}} markers."
                )
            if i > 0:
                # The rendered prompt with the generation header ends exactly where the reply starts.
                head = self._render(msgs[:i], loc, add_generation_prompt=True)
                start = len(head) if upto.startswith(head) else len(self._render(msgs[:i], loc))
            else:
                start = 0  # an empty conversation cannot be rendered; locate the content below instead
            block = upto[start:]
            # Skip anything the template puts before the content (header, whitespace) by finding the content.
            c = block.find(m["content"]) if m["content"] else -1
            if c >= 0:
                start += c
                end = start + len(m["content"])
            else:
                end = len(upto)
            # Include the end-of-turn token (the EOS string) that closes the reply, but not what follows it.
            rest = upto[end:]
            if self.eos_str and self.eos_str in rest:
                end += rest.index(self.eos_str) + len(self.eos_str)
            else:
                end = len(upto)
            spans.append((start, end))
        return full, spans

    def _encode_chat_by_diff(self, msgs: list[dict], loc: RowLocation) -> tuple[list[int], list[bool]]:
        full, spans = self._assistant_char_spans(msgs, loc)
        # The template already contains any BOS/special tokens, so do not add them again.
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = [int(x) for x in enc["input_ids"]]
        mask = []
        for s, _e in enc["offset_mapping"]:
            # A token is a target if it starts inside an assistant span.
            mask.append(any(a <= s < b for a, b in spans))
        return ids, mask
