"""Scoring rules with an official definition, written out so a student can read them: BLEU-4 (captions) and
SQuAD's exact match and F1 (extractive answers). Pure Python: nothing from the rest of the package."""
