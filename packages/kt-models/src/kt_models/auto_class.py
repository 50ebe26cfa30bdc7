"""Which transformers ``Auto*`` class builds a model from a config.

A causal language model is built by ``AutoModelForCausalLM``; a model type transformers lists
only as a vision-language model (its MoE language model inside) by
``AutoModelForImageTextToText``. Loading, discovery on ``meta`` and the tiny test models all
pick the class the same way.
"""

from __future__ import annotations

from typing import Any

from kt_models.config_fields import config_model_type

__all__ = ["auto_model_class"]


def auto_model_class(config: Any) -> Any:
    """``AutoModelForCausalLM`` when ``config``'s model type has a causal-LM mapping in the
    installed transformers, else ``AutoModelForImageTextToText``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config_model_type(config) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText
