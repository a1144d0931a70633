"""Qwen3 tokenizer: the Hugging Face ``tokenizers`` pipeline, plus the chat template and a streaming detokenizer.

The byte-level BPE itself is the Rust ``tokenizers`` library (fast, and byte-identical to what Qwen and
transformers use); this module only loads it from a checkpoint folder, keeps the ids the runtime needs
(eos/pad, the chat template) and adds :class:`StreamingDetokenizer`, which turns generated ids into text
increments without ever splitting a UTF-8 character.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from qwen3.hub import CheckpointError, read_json, resolve_model_dir
from qwen3.jinja_sandbox import compile_template

logger = logging.getLogger(__name__)

# The Qwen2/2.5/3 pre-tokenisation regex (tokenizer.json of Qwen3; transformers' Qwen2Tokenizer). Note
# ``\p{N}`` takes one digit at a time, so numbers are always split into single digits.
PRETOKENIZE_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_REPLACEMENT_CHAR = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")
# Marks an added token inside user text (Tokenizer.escape_text): private-use characters around an index.
_MARKER_OPEN, _MARKER_CLOSE = "\ue000", "\ue001"
_MARKER = re.compile("\ue000(\\d+)\ue001")
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]
# Written by save_pretrained when the loaded tokenizer_config.json lacks them (its own values win), so a saved
# folder loads in transformers as the Qwen2Tokenizer it is.
_DEFAULT_CONFIG: dict[str, Any] = {
    "add_bos_token": False,
    "add_prefix_space": False,
    "bos_token": None,
    "clean_up_tokenization_spaces": False,
    "errors": "replace",
    "split_special_tokens": False,
    "tokenizer_class": "Qwen2Tokenizer",
    "unk_token": None,
}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes a token either as a string or as an AddedToken dict (``{"content": ...}``)."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def build_backend(
    vocab_file: str | os.PathLike,
    merges_file: str | os.PathLike,
    added_tokens_decoder: Mapping[str, Mapping[str, Any]] | None = None,
) -> _Backend:
    """Build the Qwen byte-level BPE pipeline from vocab.json + merges.txt, as transformers' Qwen2Tokenizer does.

    Used when a checkpoint ships no tokenizer.json. ``added_tokens_decoder`` is tokenizer_config.json's
    ``{id: {"content", "special", ...}}`` map; the tokens are added in id order and each must land on its id.
    """
    vocab, merges = models.BPE.read_file(str(vocab_file), str(merges_file))
    return build_backend_from_vocab(vocab, merges, added_tokens_decoder)


def build_backend_from_vocab(
    vocab: Mapping[str, int],
    merges: list[tuple[str, str]],
    added_tokens_decoder: Mapping[str, Mapping[str, Any]] | None = None,
) -> _Backend:
    """The Qwen byte-level BPE pipeline from a token -> id map and the merges (see :func:`build_backend`;
    a GGUF file's ``tokenizer.ggml.*`` gives them too)."""
    bpe = models.BPE(
        dict(vocab),
        merges,
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    backend = _Backend(bpe)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    for key, spec in sorted((added_tokens_decoder or {}).items(), key=lambda item: int(item[0])):
        token = AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", False),
            special=spec.get("special", False),
        )
        backend.add_tokens([token])
        if backend.token_to_id(spec["content"]) != int(key):
            raise ValueError(
                f"added token {spec['content']!r} got id {backend.token_to_id(spec['content'])}, "
                f"but the tokenizer files say {key}: the vocabulary and the added tokens do not match"
            )
    return backend


# Texts longer than this go through encode_batch, which releases the GIL for the whole encoding (a plain
# encode was measured holding it for seconds on a 4 MB text, stalling every other thread of a server).
_LONG_TEXT = 16_384


def _encode(backend: _Backend, text: str) -> list[int]:
    if len(text) <= _LONG_TEXT:
        return backend.encode(text, add_special_tokens=False).ids
    return backend.encode_batch([text], add_special_tokens=False)[0].ids


def check_template(template: Any, path: Path) -> None:
    """Fail at load, naming the file, for a chat template that is not a string or does not compile."""
    if not isinstance(template, str):
        raise CheckpointError(f"{path}: chat_template must be a string, got {type(template).__name__}")
    try:
        compile_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(
            f"{path}: the chat template does not compile (line {exc.lineno}: {exc.message})"
        ) from None


def _is_unicode(text: Any) -> bool:
    return isinstance(text, str) and not _SURROGATE.search(text)


def _invalid_text(text: Any) -> ValueError:
    if not isinstance(text, str):
        return ValueError(f"text must be a string, got {type(text).__name__}")
    match = _SURROGATE.search(text)
    if match is None:
        return ValueError("text could not be encoded")
    return ValueError(
        f"text is not valid Unicode: a lone surrogate U+{ord(match.group()):04X} at character {match.start()}"
    )


class Tokenizer:
    """A Qwen3 tokenizer: encode/decode text, the chat template, and streaming detokenisation.

    Build it with :meth:`from_pretrained`. ``encode`` never adds BOS/EOS (Qwen adds none) and matches added
    tokens such as ``<|im_start|>`` or ``<think>`` as whole strings before BPE, so rendered chat prompts
    tokenize to the control ids the model was trained on.
    """

    def __init__(
        self, backend: _Backend, config: Mapping[str, Any] | None = None, chat_template: str | None = None
    ) -> None:
        self.backend = backend
        self.config: dict[str, Any] = dict(config or {})
        self.chat_template = chat_template
        self.eos_token: str | None = _token_content(self.config.get("eos_token"))
        self.pad_token: str | None = _token_content(self.config.get("pad_token"))
        # built on first use by escape_text / encode_rendered
        self._literal_list: list[str] | None = None
        self._index: dict[str, int] | None = None
        self._patterns: dict[frozenset[str], re.Pattern[str]] = {}
        self._split: re.Pattern[str] | None = None
        self._plain: _Backend | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike) -> Tokenizer:
        """Load from a folder or Hub repo id: tokenizer.json if present, else vocab.json + merges.txt.

        tokenizer_config.json supplies the eos/pad tokens, the added tokens (when there is no
        tokenizer.json) and the chat template; a ``chat_template.jinja`` file beside it wins over the
        config's ``chat_template``, as in transformers.
        """
        folder = resolve_model_dir(source, allow_patterns=TOKENIZER_FILES)  # never fetch weights for this
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path)
        try:
            if (folder / "tokenizer.json").is_file():
                backend_path = folder / "tokenizer.json"
                backend = _Backend.from_file(str(backend_path))
            elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                backend_path = folder / "vocab.json"
                if not config:
                    logger.warning(
                        "%s has no tokenizer_config.json: no added tokens (<|im_end|>, <think>, ...)", folder
                    )
                backend = build_backend(
                    folder / "vocab.json", folder / "merges.txt", config.get("added_tokens_decoder")
                )
            else:
                raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt")
        except FileNotFoundError:
            raise
        except Exception as exc:  # the Rust library raises a bare Exception for a corrupt file
            raise CheckpointError(
                f"{backend_path}: not a readable tokenizer ({type(exc).__name__}: {exc})"
            ) from None
        for key in ("eos_token", "pad_token"):
            if not isinstance(_token_content(config.get(key)), (str, type(None))):
                raise CheckpointError(f"{config_path}: {key} must be a token string, got {config[key]!r}")
        chat_template, template_path = config.pop("chat_template", None), config_path
        if isinstance(chat_template, list):  # legacy multi-template form: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, Mapping)}
            chat_template = named.get("default")
        if (folder / "chat_template.jinja").is_file():
            template_path = folder / "chat_template.jinja"
            try:
                chat_template = template_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{template_path}: not a readable template ({exc})") from None
        if chat_template is not None:
            check_template(chat_template, template_path)
        return cls(backend, config, chat_template)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer.json and tokenizer_config.json (with the chat template and added tokens).

        The pair is what transformers' ``AutoTokenizer.from_pretrained`` needs, so a saved folder works
        with both this class and transformers.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config = {
            **_DEFAULT_CONFIG,
            **self.config,
            "added_tokens_decoder": added,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return folder

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; nothing is prepended or appended. Text that is not valid Unicode (a lone
        surrogate such as ``"\\ud800"``, which JSON can carry) raises ValueError saying where."""
        try:
            return _encode(self.backend, text)
        except TypeError:
            raise _invalid_text(text) from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts, in parallel inside the Rust library."""
        texts = list(texts)
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            raise next(
                (_invalid_text(t) for t in texts if not _is_unicode(t)), ValueError("texts must be strings")
            ) from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. half a character) becomes U+FFFD.

        ``skip_special_tokens`` drops only tokens flagged special (for Qwen3 ids 151643..151656);
        ``<think>``, ``</think>``, ``<tool_call>`` and the other added tokens are kept.
        """
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (byte-level form, e.g. ``"Ġhello"``) or added token; None if unknown."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of ``token_id`` in byte-level form; None if out of range."""
        return self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids text can map to, added tokens included (151,669 for Qwen3; the embedding is larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        """Id of tokenizer_config.json's ``eos_token`` (``<|im_end|>`` for Qwen3 chat models)."""
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        """Id of tokenizer_config.json's ``pad_token`` (``<|endoftext|>`` for Qwen3)."""
        return self.token_to_id(self.pad_token) if self.pad_token else None

    # --- user text as plain text -----------------------------------------------------------------------

    def escape_text(self, value: Any, keep: Iterable[str] = ()) -> Any:
        """``value`` (a string, or lists and dicts of them) with every added token it spells replaced by a
        marker, so that :meth:`encode_rendered` encodes it as the plain text it is, never as a control id.

        The marker (private-use characters around an index) survives rendering and normalisation; a
        private-use marker character the text itself holds is marked too, so nothing can be confused.
        ``keep``: added tokens to leave as they are (the reasoning and tool-call tags an assistant message's
        content legitimately holds, which the template itself reads).
        """
        pattern = self._literal_pattern(frozenset(keep))
        if isinstance(value, str):
            return pattern.sub(self._mark, value) if pattern.search(value) else value
        if isinstance(value, Mapping):  # keys too: templates write them out (tojson of a tool's parameters)
            return {self.escape_text(k, keep): self.escape_text(v, keep) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.escape_text(v, keep) for v in value]
        return value

    def encode_rendered(self, prompt: str) -> list[int]:
        """Token ids of a prompt rendered from :meth:`escape_text`-ed strings: added tokens the template
        wrote are control ids; marked ones are encoded as plain text. For a prompt without markers this
        is exactly :meth:`encode` (the library, too, cuts text at added tokens and encodes each piece)."""
        ids: list[int] = []
        added = self._added_ids()
        for piece in self._added_split().split(prompt):
            if not piece:
                continue
            token_id = added.get(piece)
            if token_id is not None:
                ids.append(token_id)
                continue
            text = _MARKER.sub(self._unmark, piece)
            try:
                ids += _encode(self._plain_backend(), text)
            except TypeError:
                raise _invalid_text(text) from None
        return ids

    def _literals(self) -> list[str]:
        """What a marker's index stands for: the added tokens, then the marker character itself."""
        if self._literal_list is None:
            tokens = sorted(
                {t.content for t in self.backend.get_added_tokens_decoder().values()},
                key=lambda t: (-len(t), t),
            )
            self._literal_list = [*tokens, _MARKER_OPEN]
        return self._literal_list

    def _literal_pattern(self, keep: frozenset[str]) -> re.Pattern[str]:
        pattern = self._patterns.get(keep)
        if pattern is None:
            literals = [t for t in self._literals() if t not in keep]
            pattern = self._patterns[keep] = re.compile("|".join(map(re.escape, literals)))
        return pattern

    def _mark(self, match: re.Match[str]) -> str:
        return f"{_MARKER_OPEN}{self._literal_index()[match.group()]}{_MARKER_CLOSE}"

    def _unmark(self, match: re.Match[str]) -> str:
        literals, index = self._literals(), int(match.group(1))
        return literals[index] if index < len(literals) else match.group()  # not one of ours: as written

    def _literal_index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {t: i for i, t in enumerate(self._literals())}
        return self._index

    def _added_ids(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()}

    def _added_split(self) -> re.Pattern[str]:
        """Splits a prompt into added tokens (kept, as the capture group) and the text between them."""
        if self._split is None:
            tokens = self._literals()[:-1]
            self._split = (
                re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else re.compile("(?!)")
            )
        return self._split

    def _plain_backend(self) -> _Backend:
        """The same pipeline with no added tokens: text through it is only ever text (built once, on first
        use, by whichever worker thread needs it first)."""
        with self._lock:
            if self._plain is None:
                spec = json.loads(self.backend.to_str())
                spec["added_tokens"] = []
                self._plain = _Backend.from_str(json.dumps(spec))
        return self._plain

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids flagged special, i.e. those ``decode(..., skip_special_tokens=True)`` drops."""
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render ``messages`` with this tokenizer's chat template (the built-in Qwen3 one if it has none).

        Returns token ids (``tokenize=True``) or the prompt text. Like transformers, the template also
        sees ``eos_token``/``pad_token``; ``kwargs`` (e.g. ``continue_final_message``) go to
        :func:`qwen3.chat.render`.
        """
        from qwen3.chat import render

        template_vars = {k: v for k, v in (("eos_token", self.eos_token), ("pad_token", self.pad_token)) if v}
        text = render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            template=self.chat_template,
            **{**template_vars, **kwargs},
        )
        return self.encode(text) if tokenize else text

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh :class:`StreamingDetokenizer` for one generated sequence."""
        return StreamingDetokenizer(self, skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, pad={self.pad_token!r})"


class StreamingDetokenizer:
    """Turns ids arriving one (or a few) at a time into text increments that never split a character.

    A character can span several byte-level tokens (most CJK characters and emoji do), and decoding a
    lone piece gives U+FFFD. As in vLLM (prefix/read offsets), only a short window is decoded each step:
    the ids emitted last step (context, so decoders that look at neighbours still see them) plus the new
    ones; the increment is the window's text minus the context's text. While the window's text ends in
    U+FFFD the incomplete character is held back. Each step costs O(window), not O(sequence), and the
    increments concatenate to ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the window only: [:_read] already emitted (context), [_read:] pending
        self._read = 0
        self._prefix_text = ""  # decode(self._ids[:self._read])

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append ids; return the text they complete ("" while a character is still incomplete)."""
        self._ids.extend([int(token_ids)] if isinstance(token_ids, numbers.Integral) else map(int, token_ids))
        text = self._decode(self._ids)
        if text.endswith(_REPLACEMENT_CHAR) or len(text) < len(self._prefix_text):
            return ""
        delta = text[len(self._prefix_text) :]
        # Slide the window: the ids just emitted become the prefix that gives the next step its context.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta

    def flush(self) -> str:
        """Return whatever is held back (an unfinished character comes out as U+FFFD) and reset."""
        delta = self._decode(self._ids)[len(self._prefix_text) :]
        self._ids, self._read, self._prefix_text = [], 0, ""
        return delta
