"""GradSelSFTTrainer: TRL's SFTTrainer with in-step selection, on a tiny Llama + PEFT LoRA and a
prompt/completion dataset (loss on the completions only). Packed batches are refused."""
from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from conftest import WORDS  # noqa: E402
from test_hf_integration import Recording, base_state, lora_state, per_sample_losses, sgd  # noqa: E402

from gradsel_core.errors import UsageError  # noqa: E402
from gradsel_core.filtered import packed_rows  # noqa: E402
from gradsel_core.integrations.hf import GradSelMixin  # noqa: E402
from gradsel_core.integrations.trl import GradSelSFTTrainer  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.needs_trl]


class RecordingSFT(Recording, GradSelSFTTrainer):
    pass


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def lora_llama(vocab_size):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=3,
                      bos_token_id=1, eos_token_id=2)
    model = get_peft_model(LlamaForCausalLM(cfg),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT inits lora_B to zero: give every factor a value
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def prompt_completion(n=16):
    rows = []
    for i in range(n):
        rows.append({"prompt": "Q : what is two plus " + WORDS[10 + i % 4] + " ?",
                     "completion": " A : " + " ".join(WORDS[i % 7: i % 7 + 2 + i % 3])})
    return datasets.Dataset.from_list(rows)


def sft_args(tmp_path, **kw):
    from trl import SFTConfig

    cfg = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1,
               learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
               seed=0)
    cfg.update(kw)
    return SFTConfig(**cfg)


def test_sft_lora_completion_only_exact_step(tmp_path):
    lr = 1e-2
    tok = tokenizer()
    model = lora_llama(len(tok)).double()  # float64: the update's own rounding stays far below the check
    ref = copy.deepcopy(model)
    lora0, base0 = lora_state(model), base_state(model)
    trainer = RecordingSFT(model=model, args=sft_args(tmp_path, max_grad_norm=0.0, learning_rate=lr),
                           train_dataset=prompt_completion(), processing_class=tok, optimizers=sgd(model, lr),
                           selection={"policy": "median_band", "ratio": 0.5, "loss_filter_std": None})
    trainer.train()
    assert len(trainer.seen) == 2  # one optimizer step of 2 micro-batches

    prompt_len = len(tok("Q : what is two plus four ?")["input_ids"])
    for batch, res, _ in trainer.seen:
        assert res.n_kept == 2 and res.kept.shape == (4,)
        # completion-only loss: TRL's collator labelled every prompt token -100
        assert (batch["labels"][:, :prompt_len] == -100).all()
        assert (batch["labels"][:, prompt_len:] != -100).any(dim=1).all()

    logs = [h for h in trainer.state.log_history if "gradsel/kept_fraction" in h]
    assert len(logs) == 1 and logs[0]["gradsel/kept_fraction"] == 0.5 and logs[0]["gradsel/samples"] == 8

    # reference: plain autograd on the mean loss of each micro-batch's kept samples, averaged over the 2
    ref.train()
    for batch, res, _ in trainer.seen:
        losses = per_sample_losses(ref, batch)
        assert torch.allclose(losses.detach().float(), res.losses, rtol=1e-5, atol=1e-6)
        (losses[res.kept].mean() / 2).backward()
    num = den = 0.0
    lora1 = lora_state(model)
    for n, p in ref.named_parameters():
        if "lora_" not in n:
            continue
        expected, delta = -lr * p.grad, lora1[n] - lora0[n]
        assert torch.allclose(delta, expected, rtol=1e-5, atol=1e-12), n
        num += float((delta - expected).pow(2).sum())
        den += float(expected.pow(2).sum())
    assert den > 0 and math.sqrt(num / den) < 1e-5
    assert all(torch.equal(base0[n], p) for n, p in base_state(model).items())  # only the adapter moved


@pytest.mark.parametrize("packing", [dict(padding_free=True, max_length=None), dict(packing=True)])
def test_sft_packed_batches_are_refused(tmp_path, packing):
    tok = tokenizer()
    trainer = GradSelSFTTrainer(model=lora_llama(len(tok)), args=sft_args(tmp_path, gradient_accumulation_steps=1,
                                                                         **packing),
                                train_dataset=prompt_completion(), processing_class=tok, selection={"ratio": 0.5})
    with pytest.raises(UsageError, match="packing=False, padding_free=False"):
        trainer.train()


def test_sft_selection_none_is_plain_sft(tmp_path):
    from trl import SFTTrainer

    tok = tokenizer()
    states = []
    for cls, kw in ((SFTTrainer, {}), (GradSelSFTTrainer, {"selection": None})):
        model = lora_llama(len(tok))
        cls(model=model, args=sft_args(tmp_path / cls.__name__), train_dataset=prompt_completion(),
            processing_class=tok, **kw).train()
        states.append(lora_state(model))
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])
    assert any(not torch.equal(states[0][n], v) for n, v in lora_state(lora_llama(len(tok))).items())


def test_mixin_over_any_trainer():
    from transformers import Trainer

    class MyTrainer(GradSelMixin, Trainer):
        pass

    assert issubclass(GradSelSFTTrainer, trl.SFTTrainer) and issubclass(GradSelSFTTrainer, GradSelMixin)
    assert MyTrainer.training_step is GradSelMixin.training_step
    from gradsel_core.integrations import hf

    assert hf.GradSelSFTTrainer is GradSelSFTTrainer  # lazily exported next to GradSelTrainer


def test_packed_rows_detection():
    ids = torch.ones(2, 6, dtype=torch.long)
    assert packed_rows({"input_ids": ids}) is None
    pos = torch.arange(6).repeat(2, 1)
    assert packed_rows({"input_ids": ids, "position_ids": pos}) is None
    # right padding with position_ids padded by 0 is not packing
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    padded = pos.masked_fill(mask == 0, 0)
    assert packed_rows({"input_ids": ids, "position_ids": padded, "attention_mask": mask}) is None
    packed = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    assert "row 0" in packed_rows({"input_ids": ids, "position_ids": packed}) and "token 3" in \
        packed_rows({"input_ids": ids, "position_ids": packed})
    assert "cu_seq_lens_q" in packed_rows({"input_ids": ids[:1], "cu_seq_lens_q": torch.tensor([0, 3, 6])})
