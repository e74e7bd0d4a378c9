"""Tiny configs of every causal-LM family in the installed transformers (for the family sweep).

``causal_lm_families()`` lists (family, config class, model class) from transformers' auto mapping;
``build_family(name)`` builds one with random init from a tiny config: a few generic size overrides, plus a
small table of per-family overrides for families whose configs need more. Families that cannot be built from
a config here (remote code, vision towers, missing optional dependencies) raise ``FamilySkip`` with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch

VOCAB = 96

# generic overrides: set when the config has the attribute
SIZES = {
    "vocab_size": VOCAB, "hidden_size": 32, "n_embd": 32, "d_model": 32, "embed_dim": 32, "dim": 32,
    "intermediate_size": 48, "ffn_dim": 48, "n_inner": 48, "decoder_ffn_dim": 48, "encoder_ffn_dim": 48,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "decoder_attention_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64, "n_positions": 64,
    "max_seq_len": 64, "seq_length": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16, "n_routed_experts": 4, "n_shared_experts": 1,
    "tie_word_embeddings": False, "use_cache": False,
}

# per-family extra overrides (applied after SIZES)
OVERRIDES = {
    "mamba": {"state_size": 4, "expand": 2, "conv_kernel": 2, "time_step_rank": 4},
    "falcon": {"new_decoder_architecture": False, "multi_query": True, "alibi": False},
    "gpt_bigcode": {"multi_query": True},
    "reformer": {"attn_layers": ["local", "local"], "axial_pos_shape": [8, 8], "axial_pos_embds_dim": [16, 16],
                 "local_attn_chunk_length": 8, "hidden_size": 32},
    "xlnet": {"mem_len": 0},
    "gptj": {"rotary_dim": 4},
    "codegen": {"rotary_dim": 4},
}


class FamilySkip(Exception):
    """This family cannot be built from a tiny config here (the message says why)."""


def causal_lm_families():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for fam, model_cls in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        if fam in CONFIG_MAPPING_NAMES and isinstance(model_cls, str):
            out.append(fam)
    return out


def build_family(fam: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(fam)
    except Exception as e:  # noqa: BLE001
        raise FamilySkip(f"config: {type(e).__name__}: {str(e)[:120]}")
    sub = getattr(cfg, "text_config", None)
    targets = [cfg] + ([sub] if sub is not None and sub is not cfg else [])
    for c in targets:
        for k, v in {**SIZES, **OVERRIDES.get(fam, {})}.items():
            try:
                if hasattr(c, k):
                    setattr(c, k, v)
            except Exception:  # noqa: BLE001 - heterogeneous configs refuse some global attributes
                pass
        for k in ("layer_types", "mlp_only_layers", "sliding_window_pattern", "attention_layers"):
            try:
                val = getattr(c, k, None)
                if isinstance(val, list) and len(val) > 2:
                    setattr(c, k, val[:2])
            except Exception:  # noqa: BLE001
                pass
    try:
        cfg._attn_implementation = "eager"
    except Exception:  # noqa: BLE001
        pass
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001
        raise FamilySkip(f"build: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    model.eval()
    return model


def family_batch(B: int = 3, T: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if B >= 2:
        mask[1, T // 2:] = 0  # right padding
        ids[1, T // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# families whose tiny model takes over ~20 s per scoring on 2 CPU cores here (reference kernels in pure
# Python): swept by ``benchmarks/family_sweep.py --all``, skipped by the CI test
SLOW = {"bailing_hybrid", "blt", "dots3_note", "dots3_note_text"}


@dataclass
class FamilyResult:
    family: str
    status: str  # "ok", "skip" (cannot be built / run from a tiny config here)
    reason: str = ""
    auto_backend: str = ""
    auto_err: float = float("nan")
    auto_coverage: Dict[str, int] = field(default_factory=dict)
    ghost: str = ""  # "exact", "refused: ...", or "WRONG" / "crash: ..." (defects)
    ghost_err: float = float("nan")
    ghost_coverage: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def how(self) -> str:
        """rules / module fallbacks / whole-model vmap / loop: how auto scores it."""
        if self.status != "ok":
            return "skip"
        if self.auto_backend in ("vmap", "loop"):
            return "whole-model vmap" if self.auto_backend == "vmap" else "loop"
        if self.auto_coverage.get("module fallback") or self.auto_coverage.get("whole-model vmap"):
            return "module fallbacks"
        return "rules (+ op uses)" if self.auto_coverage.get("op") else "rules"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = (a - b).abs().masked_fill(both_nan, 0)
    return float(d.max() / b.abs().masked_fill(both_nan, 0).max().clamp(min=1e-12))


def sweep_one(fam: str, tol: float = 1e-5) -> FamilyResult:
    """Build ``fam`` tiny, score one batch with the loop, ``auto`` and ``ghost``; compare."""
    import time

    import gradsel_core as gs

    t0 = time.perf_counter()
    try:
        model = build_family(fam)
    except FamilySkip as e:
        return FamilyResult(fam, "skip", str(e))
    batch = family_batch()
    try:
        ref = gs.GradNormEngine(model, backend="loop").score(batch)
    except Exception as e:  # noqa: BLE001 - the model's own forward/backward fails on this config
        return FamilyResult(fam, "skip", f"the tiny model does not run: {type(e).__name__}: {str(e)[:120]}")
    res = FamilyResult(fam, "ok")
    eng = gs.GradNormEngine(model, backend="auto")
    got = eng.score(batch)
    res.auto_backend, res.auto_err, res.auto_coverage = got.backend, rel_err(got.norms, ref.norms), eng.coverage().counts()
    try:
        eng = gs.GradNormEngine(model, backend="ghost")
        got = eng.score(batch)
        res.ghost_err, res.ghost_coverage = rel_err(got.norms, ref.norms), eng.coverage().counts()
        res.ghost = "exact" if res.ghost_err <= tol else "WRONG"
    except gs.UnsupportedModule as e:
        res.ghost = "refused: " + str(e).splitlines()[0][:140]
    except Exception as e:  # noqa: BLE001 - a crash is a defect the test reports
        res.ghost = f"crash: {type(e).__name__}: {str(e)[:140]}"
    res.seconds = time.perf_counter() - t0
    return res
