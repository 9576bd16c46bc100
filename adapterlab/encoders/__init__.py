"""Zero-init gated prompts beyond LLaMA: a small ViT and a RoBERTa-style text encoder (``transformer``), and the
vision tower of a Hugging Face CLIP model (``clip``). Their attention calls the adapter's one Eq. 7 function."""
