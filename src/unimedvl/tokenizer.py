"""The Qwen2 tokenizer of a checkpoint, with the special tokens handled as the official loader does.

The official loader checks the tokenizer's special-token map for ``<|im_start|>``, ``<|im_end|>``,
``<|vision_start|>`` and ``<|vision_end|>``, adds the missing ones as new tokens, and then uses
``<|im_start|>``/``<|im_end|>`` as the begin/end of every text segment and
``<|vision_start|>``/``<|vision_end|>`` as the markers of every image block (ARCHITECTURE 4).
There is no chat template: a text item is ``<|im_start|> + tokens(text) + <|im_end|>``.

Text is always tokenised as text: a control-token string typed in a question or system message
(``<|im_end|><|im_start|>``, ``<|vision_start|>``, ...) becomes ordinary characters, never the
control id, so a request cannot forge turn boundaries or image markers.  Only :meth:`Tokenizer.encode_segment`
and the engine place the real markers.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
BUNDLED_TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny_tokenizer"


@dataclass(frozen=True)
class SpecialTokens:
    bos: int  # <|im_start|>: opens every text segment; first query of text generation
    eos: int  # <|im_end|>: closes every text segment; generation stop token
    start_of_image: int  # <|vision_start|>
    end_of_image: int  # <|vision_end|>


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Thin wrapper over ``transformers.Qwen2Tokenizer`` read from local files only."""

    def __init__(self, directory: str | Path):
        from transformers import Qwen2Tokenizer

        directory = Path(directory)
        for name in ("vocab.json", "merges.txt"):
            if not (directory / name).is_file():
                raise TokenizerError(f"{directory}: tokenizer file {name} is missing (a Qwen2 tokenizer needs vocab.json and merges.txt)")
        _check_tokenizer_files(directory)
        self.directory = directory
        try:
            self.hf = Qwen2Tokenizer.from_pretrained(str(directory), local_files_only=True)
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
            raise TokenizerError(f"{directory}: cannot load the tokenizer files ({type(e).__name__}: {str(e)[:200]})") from None
        # The official loader consults the special-token map (which, in the transformers version it
        # pins, includes ``additional_special_tokens``); newer transformers list those separately.
        # The missing ones are added (or, when already in the vocabulary as plain added tokens,
        # marked) as *special* tokens: the ids are the ones the official loader gives them, and
        # being special is what lets :meth:`encode` treat their strings in user text as text.
        present = set(self.hf.all_special_tokens)
        missing = [t for t in SPECIAL_TOKENS if t not in present]
        before = len(self.hf)
        if missing:
            self.hf.add_tokens(missing, special_tokens=True)
        self.num_added_tokens = len(self.hf) - before
        ids = self.hf.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        self.special = SpecialTokens(*ids)
        self._control_ids = frozenset(self.hf.all_special_ids) | set(ids)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any wrapping (no BOS/EOS added).

        Special-token strings inside ``text`` are split like any other characters
        (``split_special_tokens``): ``encode("<|im_end|>")`` is the ids of ``<``, ``|``, ``im``, ...,
        never the ``<|im_end|>`` id.  A control id in the result would mean the backend ignored
        that request, and is refused rather than passed to the model."""
        ids = self.hf.encode(text, add_special_tokens=False, split_special_tokens=True)
        if any(i in self._control_ids for i in ids):
            raise TokenizerError("the tokenizer turned special-token text into a control token; refusing to encode it")
        return ids

    def encode_segment(self, text: str) -> list[int]:
        """``<|im_start|> + tokens(text) + <|im_end|>``: how every text item enters the model."""
        return [self.special.bos, *self.encode(text), self.special.eos]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def decode_generation(self, ids: list[int]) -> str:
        """Decode generated ids as the reference does: keep the text after the first ``<|im_start|>``
        and before the first ``<|im_end|>`` (ARCHITECTURE 4.4)."""
        text = self.decode(ids)
        start, end = "<|im_start|>", "<|im_end|>"
        if start in text:
            text = text.split(start, 1)[1]
        return text.split(end, 1)[0]

    def save(self, directory: str | Path) -> None:
        """Copy the original tokenizer files (byte for byte) into ``directory``."""
        directory = Path(directory)
        for name in TOKENIZER_FILES:
            src, dst = self.directory / name, directory / name
            if src.is_file() and not (dst.exists() and dst.samefile(src)):
                shutil.copyfile(src, dst)


def _check_tokenizer_files(directory: Path) -> None:
    """:class:`TokenizerError` naming the file when ``vocab.json`` (an object of token -> integer id)
    or ``tokenizer_config.json`` (an object) is malformed, before the tokenizer library reads them."""
    import json

    for name in ("vocab.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise TokenizerError(f"{path}: expected a JSON object, got {type(doc).__name__}")
        if name == "vocab.json":
            bad = next(((k, v) for k, v in doc.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
            if bad is not None:
                raise TokenizerError(f"{path}: token {bad[0]!r} maps to {bad[1]!r}; expected a non-negative integer id")


def has_tokenizer(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
