"""The embedded worlds: data our code generates, tasks on it, and the bases our code pretrains on it.

``tinyworld`` (people and facts; the default LLaMA base), ``scenes`` / ``scenetext`` / ``vision`` / ``multimodal``
(pictures, what is asked about them, the visual encoder, the multi-modal adapter), ``vtab`` (picture tasks and the
ViT base), ``textqa`` (SQuAD-style questions and the text-encoder base).
"""
