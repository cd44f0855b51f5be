"""Competition data: reading, formatting, fair truncation, tokenization, folds, scoring, synthetic samples."""
