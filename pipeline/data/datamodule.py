"""Data for training: packing, objectives, collation, and a sampler whose position is checkpointed.

The training stream is infinite (epoch after epoch, each a fresh permutation drawn from `(seed, epoch)`), so the
number of optimizer steps alone decides how long a run is. The stream position is the number of micro-batches
this process has consumed; `TrainDataModule.state_dict` (`pipeline/training/module.py`) puts it in every Lightning
checkpoint and a resumed run starts its sampler there. Every example is a pure function of
`(seed, epoch, index)` (`objectives.example_rng`), so an interrupted run that resumes sees exactly the batches
an uninterrupted run would have seen.

Batches (dicts of tensors) follow the contract documented in `pipeline/training/module.py`, which also holds the
Lightning side (`TrainDataModule`, `SamplerPosition`): this file imports no Lightning, so evaluation starts fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from pipeline.data.objectives import (
    IGNORE_INDEX,
    SpanCorruption,
    causal_lm,
    example_rng,
    lm_raw_length,
    pack_documents,
    prefix_lm,
)
from pipeline.data.tokenstore import TokenSplit, TokenStore

Item = tuple[int, int]  # (epoch, index): what the sampler yields and the datasets take


# ----------------------------------------------------------------------------------------------- corpus


def load_tokenized(path: str | Path) -> TokenStore:
    """The token store written by the tokenize stage: `store[split]` is a memory-mapped `TokenSplit`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; run the tokenize stage first (`dvc repro tokenize`)")
    try:
        return TokenStore(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged meta.json, offsets or token file
        from pipeline.common import CorruptFileError

        raise CorruptFileError(path, f"{type(exc).__name__}: {exc}", "re-run `dvc repro tokenize --force`") from None


def document_arrays(split: Any) -> Sequence[np.ndarray]:
    """The documents of a tokenized split, in stored order: a `TokenSplit` is returned as is (its documents are
    views of the mapped file, nothing is read); a list of id sequences becomes a list of int64 arrays."""
    if isinstance(split, TokenSplit):
        return split
    return [np.asarray(doc, dtype=np.int64) for doc in split]


def unigram_entropy(docs: Sequence[np.ndarray]) -> float:
    """Entropy (nats per token) of the unigram distribution of the tokens: the loss of a model that ignores context.

    A language model that learned anything from context has a loss clearly below this. A `TokenSplit` brings
    its counts (computed by the tokenize stage), so no pass over the corpus is needed.
    """
    if isinstance(docs, TokenSplit):
        counts = docs.counts
    else:
        counts = np.bincount(np.concatenate(docs)) if len(docs) else np.zeros(1)
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------- sampler


class ResumableSampler(Sampler[Item]):
    """Endless `(epoch, index)` stream: per epoch a permutation of `range(num_items)` seeded by `(seed, epoch)`,
    dealt round-robin over `world_size` ranks, starting after the first `start` items of this rank's stream."""

    def __init__(self, num_items: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        if num_items < world_size:
            raise ValueError(f"{num_items} training examples cannot feed {world_size} processes")
        self.num_items, self.seed, self.start, self.rank, self.world_size = num_items, seed, start, rank, world_size
        self.per_rank = num_items // world_size  # the remainder of each epoch is dropped, equally on every rank

    def __iter__(self) -> Iterator[Item]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            # the same order as `permutation(num_items)` in half the memory (int32: 4 bytes per chunk)
            order = np.arange(self.num_items, dtype=np.int32 if self.num_items < 2**31 else np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(order)
            mine = order[self.rank :: self.world_size][: self.per_rank]
            for index in mine[offset:]:
                yield epoch, int(index)
            epoch, offset = epoch + 1, 0


# --------------------------------------------------------------------------------------------- datasets


class PretrainDataset(Dataset):
    """Packed chunks of the corpus turned into examples by the pretraining objective, per `(epoch, index)`.

    On a `TokenSplit` the chunks are a view of the memory-mapped token file: building the dataset reads nothing,
    and each example reads its own `raw_length` tokens. Pickles without the chunks (re-packed on arrival), so
    loader workers map the file rather than receive a copy.
    """

    def __init__(self, docs: Sequence[np.ndarray], objective: str, input_length: int, seed: int, **span_args: Any):
        self.docs, self.objective, self.seed = docs, objective, seed
        if objective == "span_corruption":
            self.corrupt = SpanCorruption(input_length=input_length, **span_args)
            raw_length = self.corrupt.raw_length
        elif objective in ("causal_lm", "prefix_lm"):
            raw_length = lm_raw_length(input_length)
        else:
            raise ValueError(f"unknown objective {objective!r}")
        self.raw_length = raw_length
        self.chunks = pack_documents(docs, raw_length)  # (N, raw_length), a view on a TokenSplit

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "chunks"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.chunks = pack_documents(self.docs, self.raw_length)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, item: Item) -> dict[str, np.ndarray | int]:
        epoch, index = item
        if isinstance(self.docs, TokenSplit):  # one positional read of this chunk: (raw_length,)
            if not 0 <= index < len(self.chunks):
                raise IndexError(f"chunk {index} out of range [0, {len(self.chunks)})")
            tokens = self.docs.read(index * self.raw_length, self.raw_length).astype(np.int64)
        else:
            tokens = np.asarray(self.chunks[index], dtype=np.int64)  # (raw_length,)
        if self.objective == "span_corruption":
            inputs, targets = self.corrupt(tokens, example_rng(self.seed, epoch, index))
            return {"inputs": inputs, "targets": targets}
        if self.objective == "causal_lm":
            inputs, labels = causal_lm(tokens)
            return {"inputs": inputs, "labels": labels}
        inputs, labels, prefix = prefix_lm(tokens, example_rng(self.seed, epoch, index))
        return {"inputs": inputs, "labels": labels, "prefix_length": prefix}


class TextToTextDataset(Dataset):
    """Fine-tuning examples: item `(epoch, index)` is mixture item `index` (a task drawn by its rate, then one
    of its examples, from `(seed, index)` alone: see `pipeline.tasks.Mixture`), tokenized.

    `encoded[task]` holds `(input_ids, target_ids)` per example of the task, tokenized once up front.
    """

    def __init__(self, mixture: Any, encoded: dict[str, list[tuple[list[int], list[int]]]]):
        self.mixture, self.encoded = mixture, encoded
        self.positions = {name: {id(e): i for i, e in enumerate(mixture.examples[name])} for name in mixture.names}

    def __len__(self) -> int:
        return len(self.mixture)

    def __getitem__(self, item: Item) -> dict[str, np.ndarray]:
        _, index = item
        name, example = self.mixture[index]
        inputs, targets = self.encoded[name][self.positions[name][id(example)]]
        return {"inputs": np.asarray(inputs, dtype=np.int64), "targets": np.asarray(targets, dtype=np.int64)}


def mixture_datasets(
    tasks: dict[str, dict[str, Any]],
    tokenizer: Any,
    seed: int,
    mixing: str,
    temperature: float,
    cap: int,
    prepared_dir: str | Path,
    input_length: int | None = None,
    target_length: int | None = None,
) -> tuple[TextToTextDataset, TextToTextDataset, dict[str, float]]:
    """(train, validation) mixtures of the fine-tuning tasks, tokenized, and the mixing rates used.

    Validation mixes the tasks' validation examples at the training rates, so `val/loss` weighs tasks alike.
    With `input_length`/`target_length` (what the collator cuts to), a generated task with an example longer than
    either is a `StageError` (`check_lengths`).
    """
    from pipeline.data.mixture import Mixture, mixing_rates
    from pipeline.data.tasks import build_examples

    datasets_ = []
    rates: dict[str, float] = {}
    for split in ("train", "validation"):
        examples = build_examples(tasks, split, seed, prepared_dir=prepared_dir)
        if split == "train":
            sizes = {name: len(v) for name, v in examples.items()}
            rates = mixing_rates(sizes, mixing, temperature, cap)
        encoded = {}
        for name, items in examples.items():
            inputs = tokenizer.encode([e.inputs for e in items]) if items else []
            targets = tokenizer.encode([e.targets for e in items]) if items else []
            encoded[name] = list(zip(inputs, targets, strict=True))
        check_lengths(encoded, split, input_length, target_length)
        split_rates = {name: rate for name, rate in rates.items() if examples.get(name)}
        mixture = Mixture(examples, split_rates, seed + (split == "validation"))
        datasets_.append(TextToTextDataset(mixture, encoded))
    return datasets_[0], datasets_[1], rates


def check_lengths(
    encoded: dict[str, list[tuple[list[int], list[int]]]],
    split: str,
    input_length: int | None,
    target_length: int | None,
) -> None:
    """Raise `StageError` when a generated task has examples the collator would cut: its answer depends on the
    whole input (and a cut target cannot be scored), so cutting silently trains on another task. Text tasks are
    cut as T5 does; only how many is logged."""
    import logging

    from pipeline.common import StageError
    from pipeline.data.tasks import GeneratedOptions, get_task

    inputs_fit = (lambda ids: True) if input_length is None else (lambda ids: len(ids) <= input_length)
    targets_fit = (lambda ids: True) if target_length is None else (lambda ids: len(ids) <= target_length)
    for name, pairs in encoded.items():
        cut = sum(not (inputs_fit(i) and targets_fit(t)) for i, t in pairs)
        if not cut:
            continue
        if not issubclass(get_task(name).options, GeneratedOptions):
            logging.getLogger("pipeline.finetune").info(
                "finetune.tasks.%s: %d of %d %s examples are cut to finetune.input_length %s / target_length %s",
                name, cut, len(pairs), split, input_length, target_length,
            )  # fmt: skip
            continue
        longest_in, longest_out = max(len(i) for i, _ in pairs), max(len(t) for _, t in pairs)
        raise StageError(
            f"finetune.tasks.{name}: {cut} of {len(pairs)} {split} examples tokenize longer than finetune.input_length "
            f"{input_length} or target_length {target_length} (longest: {longest_in} input, {longest_out} target "
            "tokens), and a generated task cut short is another task; raise those lengths or shorten the task's "
            "options (if the tokenizer splits the task's symbols into several tokens, "
            "tokenizer.user_defined_symbols keeps them whole)"
        )


class FixedItems(Dataset):
    """A finite, ordered view `(epoch 0, index i)` of a dataset taking `(epoch, index)` items (validation)."""

    def __init__(self, dataset: Dataset, limit: int | None = None):
        self.dataset = dataset
        self.size = len(dataset) if limit is None else min(limit, len(dataset))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Any:
        return self.dataset[(0, i)]


# ----------------------------------------------------------------------------------------------- losses


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the labelled tokens, the log-normaliser squared summed likewise, and their count.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX on padding. Computed in float32 whatever the precision.
    The loss of training, validation (`pipeline/training/module.py`) and evaluation (`pipeline/evaluate.py`) alike.
    """
    logits = logits.float()
    flat, target = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
    ce = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    mask = target != IGNORE_INDEX
    # z-loss (PaLM, section 5): pushes log Z towards 0 so logits stay in a numerically safe range
    z_sq = (torch.logsumexp(flat[mask], dim=-1) ** 2).sum()
    return ce, z_sq, mask.sum()


# -------------------------------------------------------------------------------------------- collation


def _pad(rows: Sequence[np.ndarray], value: int, length: int | None = None) -> torch.Tensor:
    """Right-pad 1-d arrays into a (B, max length) long tensor (truncating to `length` when given)."""
    rows = [np.asarray(r)[:length] if length else np.asarray(r) for r in rows]
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


class Collator:
    """Examples -> a batch for the model's layout.

    Examples are `{"inputs", "targets"}` (text-to-text, encoder-decoder or prefix LM: the decoder-only layouts
    read `inputs + targets` with loss on the targets only) or `{"inputs", "labels"[, "prefix_length"]}` (decoder-
    only LM examples already aligned). `pad_id` pads; padded label positions are IGNORE_INDEX.
    """

    def __init__(
        self,
        layout: str,
        pad_id: int = 0,
        decoder_start_id: int = 0,
        input_length: int | None = None,
        target_length: int | None = None,
    ):
        self.layout, self.pad_id, self.decoder_start_id = layout, pad_id, decoder_start_id
        self.input_length, self.target_length = input_length, target_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.layout == "encoder_decoder":
            return self._encoder_decoder(examples)
        if "targets" in examples[0]:  # text-to-text on a decoder-only model: one sequence, loss on targets
            examples = [self._concatenate(e) for e in examples]
        input_ids = _pad([e["inputs"] for e in examples], self.pad_id)  # (B, T)
        labels = _pad([e["labels"] for e in examples], IGNORE_INDEX)  # (B, T)
        lengths = torch.tensor([len(e["inputs"]) for e in examples])
        attention_mask = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]  # (B, T)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.layout == "prefix_lm":
            batch["prefix_lengths"] = torch.tensor([int(e.get("prefix_length", 0)) for e in examples])
        return batch

    def _encoder_decoder(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = _pad([e["inputs"] for e in examples], self.pad_id, self.input_length)  # (B, S)
        in_lengths = torch.tensor([min(len(e["inputs"]), self.input_length or 1 << 30) for e in examples])
        targets = _pad([e["targets"] for e in examples], self.pad_id, self.target_length)  # (B, T)
        out_lengths = torch.tensor([min(len(e["targets"]), self.target_length or 1 << 30) for e in examples])
        target_mask = torch.arange(targets.shape[1])[None, :] < out_lengths[:, None]  # (B, T)
        # teacher forcing: the decoder reads the targets shifted right behind the start token (T5 paper, 3.1)
        decoder_input_ids = torch.cat([torch.full_like(targets[:, :1], self.decoder_start_id), targets[:, :-1]], 1)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.arange(input_ids.shape[1])[None, :] < in_lengths[:, None],
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": torch.cat([torch.ones_like(target_mask[:, :1]), target_mask[:, :-1]], 1),
            "labels": targets.masked_fill(~target_mask, IGNORE_INDEX),
        }

    def _concatenate(self, e: dict[str, Any]) -> dict[str, Any]:
        inputs = np.asarray(e["inputs"])[: self.input_length]
        targets = np.asarray(e["targets"])[: self.target_length]
        sequence = np.concatenate([inputs, targets])
        labels = np.full(len(sequence) - 1, IGNORE_INDEX, dtype=np.int64)
        labels[len(inputs) - 1 :] = targets  # position t predicts token t + 1
        return {"inputs": sequence[:-1], "labels": labels, "prefix_length": len(inputs)}


def val_items(dataset: Dataset, batches: int, batch_size: int, world_size: int = 1) -> Dataset:
    """The fixed validation set: the first `batches` batches' worth of examples (per process) of epoch 0."""
    return FixedItems(dataset, limit=max(batches, 0) * batch_size * world_size)


def steps_per_epoch(num_items: int, batch_size: int, world_size: int = 1) -> float:
    """Micro-batches in one pass over `num_items` (for reporting how many epochs a run makes)."""
    return math.floor(num_items / world_size) / batch_size
