"""Per-layer norm rules: the registry (``base``) and the built-in rules, one file per layer family.

Importing this package registers every built-in rule. Write your own with :func:`register_norm_rule`
(``docs/writing-a-rule.md``).
"""
from ..errors import LayoutError, UnsupportedModule
from .base import ModuleCall, NormRule, RuleFn, as_btd, find_rule, only, register_norm_rule, rule_status
from .linear import conv1d_rule, linear_rule
from .embedding import embedding_rule, scaled_embedding_rule
from .norms import layernorm_rule, rmsnorm_rule
from .lora import peft_lora_embedding_rule
from .attention import mha_rule

__all__ = ["ModuleCall", "NormRule", "RuleFn", "register_norm_rule", "find_rule", "rule_status", "as_btd", "only",
           "LayoutError", "UnsupportedModule", "linear_rule", "conv1d_rule", "embedding_rule",
           "scaled_embedding_rule", "layernorm_rule", "rmsnorm_rule", "peft_lora_embedding_rule", "mha_rule"]
