"""Files in and out: base weights (Meta, Hugging Face, GGUF), adapter files (ours, the official release's, PEFT's),
and the lowest helpers every writer uses (atomic writes, the cache folder, a cross-process lock, CPU threads).

``files`` sits below the core (the training loop writes through it); the readers and writers of weights sit above it.
"""
