"""Studies: the adapter against other ways of tuning a frozen model, and against its own variants, over seeds.

``harness`` (the one study harness: runs file, resume, machine, statistics, paired verdicts, old names),
``variants`` (ungated prompts, the design zero-init attention improves on, plugged into the adapter slot),
``baselines`` (LoRA, full fine-tuning, ...), ``ablate`` (zero-init vs random-init gates vs ungated prompts),
``families`` (the same comparison on the ViT and the text encoder). Results are committed under docs/results.
"""
