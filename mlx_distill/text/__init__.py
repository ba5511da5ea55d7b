"""Text: JSONL readers (`data.py`), tokenizers and chat templates (`tokenizer.py`), the chat
encoder that renders every record through the tokenizer's own template (`chat.py`), and the
tokenized example they produce (`examples.py`)."""
