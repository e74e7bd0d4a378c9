"""Shared model and batch builders (random init from configs, no downloads)."""
from __future__ import annotations

import os

# Triton kernels are tested in interpreter mode on CPU tensors. Triton fixes interpreted vs compiled
# at its first import (torch.utils.flop_counter imports it), so this must precede every import.
# With GRADSEL_KERNEL_DEVICE=cuda (benchmarks/gpu_check.sh) the kernels run compiled on the GPU instead.
if os.environ.get("GRADSEL_KERNEL_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import gradsel_core as gs  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 61


def tiny_gpt(**kw) -> gs.models.TinyGPT:
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, max_seq_len=16)
    cfg.update(kw)
    torch.manual_seed(0)
    return gs.models.TinyGPT(gs.models.TinyGPTConfig(**cfg))


def hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def peft_llama():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        hf_llama(),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "embed_tokens"]),
    )
    # PEFT inits lora_B to zero; give every factor a non-zero value so norms are not trivially 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    return model


class Classifier(nn.Module):
    """A small sequence classifier: mean-pooled embeddings -> MLP -> class logits."""

    def __init__(self, vocab=VOCAB, d=16, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.hidden = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)  # (B, T, d)
        m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)  # (B, d)
        return self.head(torch.tanh(self.hidden(self.norm(pooled))))  # (B, classes)


def classifier_loss(outputs, batch):
    return nn.functional.cross_entropy(outputs, batch["labels"], reduction="none")


def lm_batch(B=4, T=10, seed=1, padding=True, vocab=VOCAB):
    """Variable lengths: right padding, one zero-target sample, left padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding and B >= 2:
        mask[1, T // 2:] = 0  # right padding
    if padding and B >= 3:
        mask[2, 1:] = 0  # a single token: no target
    if padding and B >= 4:
        mask[3, :2] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


MODEL_BUILDERS = {
    "tinygpt": lambda: tiny_gpt(),
    "tinygpt_tied": lambda: tiny_gpt(tie_weights=True, pad_token_id=0),
    "gpt2": hf_gpt2,
    "llama": hf_llama,
    "peft_llama": peft_llama,
}

_CACHE = {}


def params_for(name):
    """The parameters scored for a model of MODEL_BUILDERS: LoRA factors for the PEFT model."""
    return "lora" if name == "peft_llama" else "trainable"


def build(name):
    if name not in _CACHE:
        _CACHE[name] = MODEL_BUILDERS[name]()
    return copy.deepcopy(_CACHE[name])


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster on a shared 2-core box (and matches subprocess workers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=list(MODEL_BUILDERS))
def lm_name(request):
    return request.param


def assert_close_rel(a, b, rtol, what=""):
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp(min=1e-12)
    err = ((a - b).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol:g}\n{a}\n{b}"


WORDS = (
    "the a cat dog sat on mat what is two plus three answer four five six seven Q A : ? . hello world "
    "tell me about safety please no yes why because"
).split()


def save_word_tokenizer(d, specials, wrap: bool = False) -> dict:
    """Save a word-level fast tokenizer over ``specials`` (names in id order) + WORDS into ``d``; ``wrap``: add
    ``<s>`` ... ``</s>`` around every text (a seq2seq encoder's convention). Returns the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(specials)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if wrap:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(str(d))
    return vocab


def make_llama_dir(d) -> str:
    """Save a tiny random LlamaForCausalLM and a word-level tokenizer over WORDS into directory ``d``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = save_word_tokenizer(d, ["<unk>", "<s>", "</s>", "<pad>"])
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=3, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    return str(d)
