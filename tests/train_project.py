"""A tiny, self-contained project for the training-stage tests: params, tokenizer info and tokenized data.

The corpus is synthetic but learnable: documents follow a fixed random Markov chain (each token picks its
successor among a few), so a model that uses context gets well below the unigram entropy within a few steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOK_VOCAB = 250  # tokenizer vocabulary (sentinels included); models get it padded to 256
NUM_SENTINELS = 20

MODELS = {
    "t5": {"family": "t5", "preset": "tiny", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4},
    "reformer": {
        "family": "reformer",
        "preset": "tiny",
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_heads": 4,
        "attn_layers": ["local", "lsh"],
        "axial_pos_shape": [8, 8],
        "axial_pos_dims": [16, 16],
        "lsh_chunk_length": 8,
        "local_chunk_length": 8,
    },
}

TRAIN = {
    "input_length": 32,
    "batch_size": 4,
    "max_steps": 8,
    "log_every_n_steps": 2,
    "val_every_n_steps": 4,
    "val_batches": 2,
    "checkpoint_every_n_steps": 4,
}


def markov_docs(n_docs: int, seed: int, low: int = 3, high: int = TOK_VOCAB - NUM_SENTINELS) -> list[list[int]]:
    chain = np.random.default_rng(0).integers(low, high, size=(high, 3))  # successors of each token
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        length = int(rng.integers(20, 80))
        tok = int(rng.integers(low, high))
        doc = []
        for _ in range(length):
            doc.append(tok)
            tok = int(chain[tok, rng.integers(0, 3)])
        docs.append([*doc, 1])  # eos
    return docs


FINETUNE_TASKS = {
    "listops": {"num_examples": 64, "num_eval_examples": 16, "max_depth": 2, "max_chars": 60, "min_chars": 5},
    "duplication": {"num_examples": 64, "num_eval_examples": 16, "length": 6, "vocab_size": 8},
}


# the `lengths` stage at tiny lengths (the tiny Reformer holds 64 positions): a few steps per length
LENGTHS = {
    "task": "needle",
    "task_options": {"num_examples": 32, "num_eval_examples": 12, "filler": 1},  # "a": one token in any vocabulary
    "seeds": [0],
    "seq_lengths": [32, 64],
    "fill": [0.75, 0.9],
    "budget": {"kind": "flops", "value": 1.0e8},
    "init": "pretrained",  # the path the default (scratch) does not take: from the run's pretrained weights
    "batch_size": 4,
    "eval_examples": 12,
    "eval_batch_size": 12,
}


def write_tokenizer(directory: Path, user_defined_symbols: list[str] | tuple[str, ...] = ()) -> None:
    """A real SentencePiece tokenizer of TOK_VOCAB ids, trained on the fine-tuning tasks' own texts."""
    from pipeline.data.tasks import build_examples
    from pipeline.data.tokenizer import Tokenizer, train_sentencepiece

    texts = []
    for split in ("train", "validation"):
        for examples in build_examples(FINETUNE_TASKS, split, seed=0).values():
            texts += [f"{e.inputs}\n{e.targets}" for e in examples]
    rng = np.random.default_rng(0)  # random words: enough distinct pieces for the vocabulary
    words = [" ".join("".join(rng.choice(list("abcdefghijklmnop"), size=5)) for _ in range(8)) for _ in range(300)]
    train_sentencepiece(
        texts + words,
        directory / "spm.model",
        num_pieces=TOK_VOCAB - NUM_SENTINELS,
        user_defined_symbols=user_defined_symbols,
    )
    Tokenizer(directory / "spm.model", NUM_SENTINELS).save(directory)


def make_project(
    tmp: Path, overrides: dict[str, Any] | None = None, n_train_docs: int = 300, with_tokenizer: bool = False
) -> Path:
    """Write params.yaml, data/tokenizer/ (tokenizer.json; a real spm.model too when `with_tokenizer`) and
    data/tokenized/ under `tmp`; returns `tmp`."""
    from pipeline.data.tokenstore import write_store

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"] = copy.deepcopy(MODELS)
    params["seeds"] = [0]
    params["tokenizer"]["vocab_size"] = TOK_VOCAB
    params["tokenizer"]["num_sentinels"] = NUM_SENTINELS
    for stage in ("pretrain", "finetune"):
        params[stage].update(TRAIN)
        params[stage]["optimizer"]["warmup_steps"] = 2
    params["pretrain"]["optimizer"]["lr"] = 3e-3
    params["finetune"]["tasks"] = copy.deepcopy(FINETUNE_TASKS)
    params["finetune"].update({"input_length": 64, "target_length": 16})
    params["lengths"] = copy.deepcopy(LENGTHS)
    params["trainer"].update({"accelerator": "cpu", "progress_bar": False})
    # runs of a few steps: the stuck-loss guard's patience must fit in them (pipeline/config/); tests of the guard
    # set it themselves
    params["trainer"]["divergence"]["patience_steps"] = 0
    params["mlflow"]["system_metrics"] = False
    for dotted, value in (overrides or {}).items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    tok_dir = tmp / "data" / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": TOK_VOCAB, "num_sentinels": NUM_SENTINELS, "pad_id": 0, "eos_id": 1, "unk_id": 2}
    (tok_dir / "tokenizer.json").write_text(json.dumps(meta))
    if with_tokenizer:
        write_tokenizer(tok_dir)

    splits = {"train": markov_docs(n_train_docs, 1), "validation": markov_docs(40, 2), "test": markov_docs(40, 3)}
    write_store(tmp / "data" / "tokenized", splits, TOK_VOCAB)
    return tmp
