"""Tasks: prompts, tokenization, answer extraction and grading for the training loop."""
