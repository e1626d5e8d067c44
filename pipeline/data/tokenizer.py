"""The SentencePiece tokenizer shared by every stage, with T5's conventions.

Ids: `pad=0`, `eos=1`, `unk=2` (no bos), then the SentencePiece pieces, then `num_sentinels` sentinel tokens
`<extra_id_0>` ... `<extra_id_{N-1}>` on top of the vocabulary, `<extra_id_0>` being the highest id:

    sentinel_id(i) = vocab_size - 1 - i        vocab_size = SentencePiece pieces + num_sentinels

This is the layout of T5's own `spiece.model` (32000 pieces + 100 sentinels = 32100), which loads unchanged.
Sentinels are not SentencePiece pieces: `encode` finds literal `<extra_id_N>` strings in the text and maps
them to the sentinel ids (as T5's tokenizer does), `decode` renders them back.

On disk (`data/tokenizer/`): `spm.model` and `tokenizer.json` (`num_sentinels`, `vocab_size`, ...);
`Tokenizer.load(directory)` reads both. `train_sentencepiece` trains a model deterministically.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from pipeline.common import StageError

MODEL_NAME = "spm.model"
CONFIG_NAME = "tokenizer.json"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
PAD_PIECE, EOS_PIECE, UNK_PIECE = "<pad>", "</s>", "<unk>"

_SENTINEL = re.compile(r"<extra_id_(\d+)>")


class Tokenizer:
    """A SentencePiece model plus `num_sentinels` sentinel ids on top of its pieces.

    Raises `StageError` when the model file is missing, unreadable, or does not use ids pad=0, eos=1, unk=2.
    Picklable (the model travels as its serialized bytes), so `datasets.map(num_proc=...)` can use it.
    """

    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, spm_model_path: str | Path, num_sentinels: int = 100):
        path = Path(spm_model_path)
        if not path.is_file():
            raise StageError(f"SentencePiece model {path} not found")
        self._init(path.read_bytes(), num_sentinels, str(path))

    def _init(self, proto: bytes, num_sentinels: int, origin: str) -> None:
        if num_sentinels < 0:
            raise ValueError(f"num_sentinels must be >= 0, got {num_sentinels}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError, TypeError) as exc:
            raise StageError(f"{origin} is not a readable SentencePiece model ({exc})") from None
        ids = {"pad": sp.pad_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
        if ids != {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}:
            raise StageError(f"{origin}: special ids are {ids}; the pipeline's models need pad=0, eos=1, unk=2")
        self.sp = sp
        self.proto = proto
        self.num_sentinels = num_sentinels
        self.num_pieces = sp.get_piece_size()
        self.vocab_size = self.num_pieces + num_sentinels

    def __getstate__(self) -> dict[str, Any]:
        return {"proto": self.proto, "num_sentinels": self.num_sentinels}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._init(state["proto"], state["num_sentinels"], "pickled tokenizer")

    def __repr__(self) -> str:
        return f"Tokenizer(pieces={self.num_pieces}, num_sentinels={self.num_sentinels}, vocab_size={self.vocab_size})"

    # ----------------------------------------------------------------------------------------- ids

    def sentinel_id(self, i: int) -> int:
        """Id of `<extra_id_{i}>`: `vocab_size - 1 - i` (so `<extra_id_0>` is the highest id)."""
        if not 0 <= i < self.num_sentinels:
            raise IndexError(f"sentinel index {i} out of range [0, {self.num_sentinels})")
        return self.vocab_size - 1 - i

    def is_sentinel(self, token_id: int) -> bool:
        """Whether `token_id` is one of the sentinel ids."""
        return self.num_pieces <= token_id < self.vocab_size

    def id_to_token(self, token_id: int) -> str:
        """The piece (or `<extra_id_N>`) of an id."""
        if self.is_sentinel(token_id):
            return f"<extra_id_{self.vocab_size - 1 - token_id}>"
        if not 0 <= token_id < self.num_pieces:
            raise IndexError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return self.sp.id_to_piece(token_id)

    # ------------------------------------------------------------------------------ encode / decode

    def encode(self, texts: Sequence[str], add_eos: bool = True, num_threads: int | None = None) -> list[list[int]]:
        """Token ids of each text, eos appended unless `add_eos=False`.

        Literal `<extra_id_N>` strings (N < num_sentinels) become sentinel ids; the text between them is
        encoded by SentencePiece piece by piece, as T5's tokenizer does. Texts without sentinels are encoded
        in one batched SentencePiece call, on `num_threads` threads (None: SentencePiece's default, all cores;
        worker processes that already split the work pass 1).
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        plain = [i for i, t in enumerate(texts) if self.num_sentinels == 0 or "<extra_id_" not in t]
        out: list[list[int]] = [[] for _ in texts]
        if plain:
            for i, ids in zip(plain, self.sp.encode([texts[i] for i in plain], num_threads=num_threads), strict=True):
                out[i] = ids
        if len(plain) < len(texts):
            done = set(plain)
            for i, text in enumerate(texts):
                if i not in done:
                    out[i] = self._encode_with_sentinels(text)
        if add_eos:
            for ids in out:
                ids.append(EOS_ID)
        return out

    def _encode_with_sentinels(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for match in _SENTINEL.finditer(text):
            index = int(match.group(1))
            if index >= self.num_sentinels:  # not a sentinel of this vocabulary: ordinary text
                continue
            ids.extend(self.sp.encode(text[pos : match.start()]))
            ids.append(self.sentinel_id(index))
            pos = match.end()
        ids.extend(self.sp.encode(text[pos:]))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of a sequence of ids.

        With `skip_special` pad, eos, unk and sentinels are dropped; without it they are rendered as
        `<pad>`, `</s>`, `<unk>` and `<extra_id_N>`. Ids outside the vocabulary (the padding rows of a model
        whose embedding was rounded up, or -100 label fillers) are always dropped.
        """
        parts: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                text = self.sp.decode(run)
                # SentencePiece drops the word-boundary space of a run's first piece; keep it between parts
                if parts and text and self.sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                parts.append(text)
                run.clear()

        for token_id in ids:
            token_id = int(token_id)
            if token_id in (PAD_ID, EOS_ID, UNK_ID) or self.is_sentinel(token_id):
                if skip_special:
                    continue
                flush()
                parts.append(self.id_to_token(token_id))  # no space before it, as in transformers' T5Tokenizer
            elif 0 <= token_id < self.num_pieces:
                run.append(token_id)
        flush()
        return "".join(parts)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special: bool = True) -> list[str]:
        """`decode` of each sequence (rows of a 2-D tensor, lists of ids)."""
        return [self.decode(ids, skip_special) for ids in sequences]

    # ------------------------------------------------------------------------------------ files

    def save(self, directory: str | Path, **info: Any) -> None:
        """Write `spm.model` and `tokenizer.json` (extra `info` keys are stored alongside) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_NAME).write_bytes(self.proto)
        meta = {
            "num_sentinels": self.num_sentinels,
            "vocab_size": self.vocab_size,
            "num_pieces": self.num_pieces,
            "pad_id": PAD_ID,
            "eos_id": EOS_ID,
            "unk_id": UNK_ID,
            "spm_sha256": hashlib.sha256(self.proto).hexdigest(),
            **info,
        }
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """The tokenizer saved in `directory` (`spm.model` + `tokenizer.json`)."""
        directory = Path(directory)
        meta_path = directory / CONFIG_NAME
        if not meta_path.is_file():
            raise StageError(f"{meta_path} not found: run the tokenize stage first (dvc repro tokenize)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            num_sentinels = int(meta["num_sentinels"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StageError(f"{meta_path}: unreadable tokenizer description ({exc})") from None
        tok = cls(directory / MODEL_NAME, num_sentinels)
        if "vocab_size" in meta and meta["vocab_size"] != tok.vocab_size:
            raise StageError(
                f"{meta_path}: vocab_size {meta['vocab_size']} does not match the model ({tok.vocab_size})"
            )
        return tok


def train_sentencepiece(
    texts: Iterable[str],
    output_path: str | Path,
    num_pieces: int,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    seed: int = 1234,
    user_defined_symbols: Sequence[str] = (),
) -> None:
    """Train a SentencePiece model of `num_pieces` pieces (pad=0, eos=1, unk=2, no bos) on `texts`.

    Every non-empty line is a training sentence. Deterministic for the same texts and arguments: one training
    thread (the EM sums depend on how work is split between threads) and, when there are more than
    `input_sentence_size` lines, a sample of them drawn with `random.Random(seed)`. Raises `StageError` when
    SentencePiece refuses the corpus (too small for the vocabulary, no text).
    """
    output_path = Path(output_path)
    # sentences go in through an iterator and the model comes out through a writer: no temporary files, whose
    # random names SentencePiece would otherwise record in the model's trainer spec (making models differ)
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if not lines:
        raise StageError("the tokenizer training text is empty (no non-blank lines in the train split)")
    if len(lines) > input_sentence_size:  # our own seeded sample, in corpus order; SentencePiece samples no more
        keep = sorted(random.Random(seed).sample(range(len(lines)), input_sentence_size))
        lines = [lines[i] for i in keep]
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=num_pieces,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=16384,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            pad_piece=PAD_PIECE,
            eos_piece=EOS_PIECE,
            unk_piece=UNK_PIECE,
            num_threads=1,
            minloglevel=2,
            **({"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols else {}),
        )
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        if "Vocabulary size is too high" in message or "vocab_size" in message.lower():
            raise StageError(
                f"tokenizer.vocab_size: {num_pieces} SentencePiece pieces is too many for this corpus "
                f"({message.split(': ', 1)[-1]}); lower tokenizer.vocab_size or use a larger corpus"
            ) from None
        raise StageError(f"SentencePiece training failed: {message}") from None
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_bytes(model.getvalue())
