"""Text: JSONL readers, chat templates, tokenization, SentencePiece training."""
