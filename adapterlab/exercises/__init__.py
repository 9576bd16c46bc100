"""Automatic checkers for the notebooks' "check yourself" exercises, one module per notebook.

Notebook ``NN_name.ipynb`` imports its checkers from ``adapterlab.exercises.name`` (notebook 01 borrows
notebook 03's):

    notebook  module                  checkers
    01, 03    zero_init_attention     check_step0_gradients (01 and 03), check_zero_init_attention,
                                      check_adapter_param_count
    02        llama_from_blocks       check_rmsnorm, check_llama_param_count, check_kv_cache_bytes
    04        pretraining_tiny_llama  check_uniform_loss
    05        instruction_tuning      check_target_token_count
    06        gate_dynamics           check_adapted_layers, check_most_open_layer
    07        ablations               check_training_state_bytes
    08        multi_gpu               check_accumulation_steps
    09        multimodal              check_multimodal_param_count
    10        real_weights_and_data   check_hf_to_meta_rows
    11        beyond_llama            check_squad_f1
    12        a_real_model            check_gqa_adapter_param_count

``feedback`` holds what they share: :class:`CheckResult` (truthy when right, shown in Jupyter as a message
that names the likely mistake) and the helpers that read an answer. Every checker is also importable
from here:

    >>> from adapterlab.exercises import check_adapter_param_count
    >>> check_adapter_param_count(1_228_800)
    Not yet: 1,228,800 counts the prompts (K*L*C) but not the gates: one per head in each adapted layer, L*H = 960.
"""
from .a_real_model import check_gqa_adapter_param_count
from .ablations import check_training_state_bytes
from .beyond_llama import check_squad_f1
from .feedback import CheckResult
from .gate_dynamics import check_adapted_layers, check_most_open_layer
from .instruction_tuning import check_target_token_count
from .llama_from_blocks import check_kv_cache_bytes, check_llama_param_count, check_rmsnorm, llama_param_count
from .multi_gpu import check_accumulation_steps
from .multimodal import check_multimodal_param_count
from .pretraining_tiny_llama import check_uniform_loss
from .real_weights_and_data import check_hf_to_meta_rows
from .zero_init_attention import check_adapter_param_count, check_step0_gradients, check_zero_init_attention

__all__ = [
    "CheckResult",
    "check_rmsnorm",
    "check_llama_param_count",
    "check_kv_cache_bytes",
    "check_zero_init_attention",
    "check_adapter_param_count",
    "check_step0_gradients",
    "llama_param_count",
    "check_uniform_loss",
    "check_target_token_count",
    "check_adapted_layers",
    "check_most_open_layer",
    "check_training_state_bytes",
    "check_hf_to_meta_rows",
    "check_multimodal_param_count",
    "check_accumulation_steps",
    "check_squad_f1",
    "check_gqa_adapter_param_count",
]
