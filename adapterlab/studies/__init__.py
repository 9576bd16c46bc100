"""Studies: the adapter against other ways of tuning a frozen model, and against its own variants, over seeds.

``baselines`` (LoRA, full fine-tuning, ...), ``ablate`` (zero-init vs random-init gates vs ungated prompts),
``families`` (the same comparison on the ViT and the text encoder). Results are committed under docs/results.
"""
