"""Data: sources (directory, manifest, Hub), audio decoding, cached preprocessing, datasets and the collator."""
