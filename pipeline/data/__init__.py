"""Data: the corpus (`corpus.py`: prepare's reading, cleaning and splitting), the SentencePiece tokenizer, the
memory-mapped token store, the pretraining objectives, the fine-tuning tasks (their mixture and metrics), and the
datasets and collation the training stages feed their models with (`datamodule.py`)."""
