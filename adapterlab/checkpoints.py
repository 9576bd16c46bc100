"""Placeholder, being written."""
def load_llama(*a, **k): raise NotImplementedError
def load_adapter(*a, **k): raise NotImplementedError
def save_adapter(*a, **k): raise NotImplementedError
