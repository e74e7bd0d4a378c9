"""GradSelTrainer (in-step filtering inside transformers.Trainer) and select_dataset (offline selection).

Tiny random-init Llama + PEFT LoRA on q_proj/v_proj, a tiny dataset made in code (prompt tokens labelled
-100), CPU only.
"""
from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from gradsel_core.integrations.hf import GradSelTrainer, SelectionConfig, select_dataset  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)

# peft calls transformers' deprecated `is_gradient_checkpointing` (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

VOCAB = 64
PAD = 0


def make_model(lora_dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    model = get_peft_model(LlamaForCausalLM(cfg),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=["q_proj", "v_proj"]))
    # PEFT inits lora_B to zero (then lora_A gets no gradient): give every factor a value
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make_records(n: int = 32, seed: int = 0):
    """Records of length 6..14 whose first 2..4 ("prompt") tokens are labelled -100."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(6, 15))
        ids = rng.integers(3, VOCAB, size=L).tolist()
        P = int(rng.integers(2, 5))
        out.append({"input_ids": ids, "labels": [-100] * P + ids[P:], "task": "a" if i % 2 == 0 else "b"})
    return out


def collate(features):
    T = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(features), T), dtype=torch.long)
    labels = torch.full((len(features), T), -100, dtype=torch.long)
    for i, f in enumerate(features):
        L = len(f["input_ids"])
        ids[i, :L] = torch.tensor(f["input_ids"])
        mask[i, :L] = 1
        labels[i, :L] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_args(tmp_path, **kw):
    from transformers import TrainingArguments

    cfg = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
               learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
               disable_tqdm=True, seed=0, remove_unused_columns=False)
    cfg.update(kw)
    return TrainingArguments(**cfg)


class Recording:
    """Mixin: keeps every micro-batch the trainer trains on (after _prepare_inputs) with its FilteredResult."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        batch = {k: v.clone() for k, v in inputs.items()}
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.seen.append((batch, self.gradsel_last, float(loss)))
        return loss


class RecordingTrainer(Recording, GradSelTrainer):
    pass


def sgd(model, lr):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.0, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def per_sample_losses(model, batch):
    """Reference per-sample loss, independent of gradsel: mean CE over each sample's non -100 targets."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lg, lb = logits[:, :-1], batch["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100,
                                            reduction="none").view(lb.shape)
    return tok.sum(1) / (lb != -100).sum(1).clamp(min=1)


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def base_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


# --------------------------------------------------------------------------------------------------


def test_kept_fraction_logged_and_only_lora_changes(tmp_path, monkeypatch):
    import gradsel_core.integrations.hf as hf

    built = []

    class CountingFilter(hf.FilteredBackward):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(hf, "FilteredBackward", CountingFilter)
    model = make_model()
    lora0, base0 = lora_state(model), base_state(model)
    trainer = RecordingTrainer(model=model, args=make_args(tmp_path), train_dataset=make_records(),
                               data_collator=collate,
                               selection={"policy": "median_band", "ratio": 0.5, "loss_filter_std": None})
    assert isinstance(trainer.selection, SelectionConfig)
    trainer.train()

    # 3 optimizer steps x 2 micro-batches of 4, each keeping floor(0.5 * 4) = 2
    assert len(trainer.seen) == 6
    for batch, res, _ in trainer.seen:
        assert res.kept.shape == (4,) and res.n_kept == 2
        assert (batch["labels"][:, :2] == -100).all()  # the prompt labels reached the filter
    assert trainer.gradsel_last is trainer.seen[-1][1]
    assert [r is s for r, s in zip(trainer.gradsel_step, [s[1] for s in trainer.seen[-2:]])] == [True, True]

    logs = [h for h in trainer.state.log_history if "gradsel/kept_fraction" in h]
    assert len(logs) == 3
    for i, h in enumerate(logs):
        assert h["gradsel/kept_fraction"] == 0.5
        assert h["gradsel/samples"] == 8 and h["gradsel/kept"] == 4
        norms = torch.cat([r.norms for _, r, _ in trainer.seen[2 * i: 2 * i + 2]])
        assert h["gradsel/norm_max"] == pytest.approx(float(norms.max()), rel=1e-6)
        assert h["gradsel/norm_mean"] == pytest.approx(float(norms.mean()), rel=1e-6)
        assert h["gradsel/norm_mean"] <= h["gradsel/norm_max"]
        assert math.isfinite(h["gradsel/norm_median"]) and math.isfinite(h["gradsel/loss_kept"])
        kept_losses = torch.cat([r.losses[r.kept] for _, r, _ in trainer.seen[2 * i: 2 * i + 2]])
        assert h["gradsel/loss_kept"] == pytest.approx(float(kept_losses.mean()), rel=1e-6)
        # the Trainer's own loss: mean over the step's micro-batches of the kept-sample mean loss
        step_loss = sum(r.loss for _, r, _ in trainer.seen[2 * i: 2 * i + 2]) / 2
        assert h["loss"] == pytest.approx(step_loss, abs=2e-4)
        assert h["step"] == i + 1

    assert len(built) == 1  # one FilteredBackward for the whole run, not one per step
    assert set(trainer.gradsel_filter(model).engine.params) == set(lora0)  # params="trainable" = the LoRA factors
    lora1, base1 = lora_state(model), base_state(model)
    assert all(not torch.equal(lora0[n], lora1[n]) for n in lora0)  # every LoRA factor moved
    assert all(torch.equal(base0[n], base1[n]) for n in base0)  # the base model did not


@pytest.mark.parametrize("mode", ["auto", "two_pass"])
def test_one_sgd_step_is_exact_gradient_of_kept_mean_loss(tmp_path, mode):
    lr = 1e-2
    # float64: in float32 the update's own rounding (W1 = W0 - lr*g, |W0| >> |lr*g|) is ~3e-5 of the step
    model = make_model().double()
    ref = copy.deepcopy(model)
    lora0, base0 = lora_state(model), base_state(model)
    args = make_args(tmp_path, max_steps=1, max_grad_norm=0.0, learning_rate=lr)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=make_records(), data_collator=collate,
                               optimizers=sgd(model, lr), selection=SelectionConfig(ratio=0.5), gradsel_mode=mode)
    trainer.train()
    assert trainer.gradsel_mode == ("one_backward" if mode == "auto" else "two_pass")
    assert len(trainer.seen) == 2  # one optimizer step = 2 accumulated micro-batches
    assert sum(res.n_kept for _, res, _ in trainer.seen) > 0

    # reference: plain autograd on the mean loss over each micro-batch's kept samples, averaged over the
    # accumulation micro-batches
    ref.train()
    ref.zero_grad(set_to_none=True)
    for batch, res, _ in trainer.seen:
        if res.n_kept:
            losses = per_sample_losses(ref, batch)
            assert torch.allclose(losses.detach().float(), res.losses, rtol=1e-5, atol=1e-6)
            (losses[res.kept].mean() / 2).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if "lora_" in n}
    assert all(g is not None for g in ref_grads.values())

    lora1 = lora_state(model)
    num = den = 0.0
    for n, g in ref_grads.items():
        expected = -lr * g
        delta = lora1[n] - lora0[n]
        num += float((delta - expected).double().pow(2).sum())
        den += float(expected.double().pow(2).sum())
        assert torch.allclose(delta, expected, rtol=1e-5, atol=1e-12), n
    logging.getLogger(__name__).info("relative error of the SGD step: %.3g", math.sqrt(num / den))
    assert math.sqrt(num / den) < 1e-5
    assert all(torch.equal(base0[n], p) for n, p in base_state(model).items())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_selection_none_is_plain_trainer(tmp_path):
    from transformers import Trainer

    records = make_records()
    results = []
    for cls, kw in ((Trainer, {}), (GradSelTrainer, {"selection": None})):
        model = make_model()
        trainer = cls(model=model, args=make_args(tmp_path / cls.__name__, max_steps=2), train_dataset=records,
                      data_collator=collate, **kw)
        trainer.train()
        results.append((lora_state(model), [h.get("loss") for h in trainer.state.log_history], trainer))
    (a, loss_a, _), (b, loss_b, gs_trainer) = results
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert loss_a == loss_b
    assert not any(k.startswith("gradsel/") for h in gs_trainer.state.log_history for k in h)
    assert gs_trainer.gradsel_last is None


def test_random_policy_and_seed(tmp_path):
    model = make_model()
    trainer = RecordingTrainer(model=model, args=make_args(tmp_path, max_steps=1, torch_empty_cache_steps=1),
                               train_dataset=make_records(), data_collator=collate,
                               selection=SelectionConfig(policy="random", ratio=0.25, loss_filter_std=None))
    assert trainer.gradsel_seed(0) == 0  # the first micro-batch uses global_step as the seed
    assert trainer.gradsel_seed(1) == [0, 1, 0]
    trainer.train()
    assert [res.n_kept for _, res, _ in trainer.seen] == [1, 1]
    assert trainer.state.log_history[0]["gradsel/kept_fraction"] == 0.25


def test_short_last_accumulation_window(tmp_path):
    # 12 records, batch 4, accumulation 2: step 1 has 2 micro-batches, step 2 only 1 -> its loss scale is 1
    model = make_model()
    args = make_args(tmp_path, max_steps=-1, num_train_epochs=1)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=make_records(12), data_collator=collate,
                               selection={"ratio": 0.5, "loss_filter_std": None})
    trainer.train()
    assert trainer.state.global_step == 2
    scales = [res.loss / ret for _, res, ret in trainer.seen]
    assert scales == pytest.approx([2.0, 2.0, 1.0], rel=1e-5)
    assert len(trainer.gradsel_step) == 1 and trainer.gradsel_step[0] is trainer.seen[-1][1]
    logs = [h for h in trainer.state.log_history if "gradsel/samples" in h]
    assert [h["gradsel/samples"] for h in logs] == [8, 4]


def test_bf16_autocast_on_cpu(tmp_path):
    model = make_model()
    lora0 = lora_state(model)
    try:
        args = make_args(tmp_path, max_steps=1, bf16=True)
    except (ValueError, ImportError) as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"bf16 on CPU unavailable: {e}")
    trainer = RecordingTrainer(model=model, args=args, train_dataset=make_records(), data_collator=collate,
                               selection={"ratio": 0.5, "loss_filter_std": None})
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    assert [res.n_kept for _, res, _ in trainer.seen] == [2, 2]
    assert all(math.isfinite(res.loss) for _, res, _ in trainer.seen)
    assert all(not torch.equal(lora0[n], p) for n, p in lora_state(model).items())


def test_selection_config_validation():
    assert SelectionConfig.coerce(None) is None
    cfg = SelectionConfig.coerce({"policy": "band", "policy_kwargs": {"low_q": 0.1, "high_q": 0.9}})
    assert cfg.policy == "band" and cfg.ratio == 0.2 and cfg.params == "trainable"
    with pytest.raises(ValueError, match="unknown key"):
        SelectionConfig.coerce({"ratio": 0.2, "rate": 0.1})
    with pytest.raises(ValueError, match="unknown selection policy"):
        SelectionConfig(policy="nope")
    with pytest.raises(ValueError, match="ratio"):
        SelectionConfig(ratio=1.5)
    with pytest.raises(TypeError):
        SelectionConfig.coerce(0.2)


# --------------------------------------------------------------------------------------------------
# offline selection


def test_select_dataset_list():
    import gradsel_core as gs

    model = make_model()
    records = make_records(20)
    kept, sel = select_dataset(model, records, policy="median_band", ratio=0.25, loss_filter_std=None, batch_size=8)
    assert len(kept) == 5 and len(sel) == 5
    assert list(sel.kept_ids) == sorted(sel.kept_ids)
    assert all(kept[j] is records[int(i)] for j, i in enumerate(sel.kept_ids))  # the records themselves
    assert sel.summary["kept"] == 5 and sel.summary["n"] == 20

    # the same scores as scoring the records directly, batch by batch
    res = gs.GradNormEngine(model).score(collate(records))
    direct = gs.select(res, policy="median_band", ratio=0.25, loss_filter_std=None)
    assert list(direct.kept_ids) == list(sel.kept_ids)

    # per group: floor(0.25 * 10) = 2 in each of the two tasks; a generator works too
    kept_g, sel_g = select_dataset(model, iter(records), ratio=0.25, group_by="task", loss_filter_std=None)
    assert len(kept_g) == 4 and sel_g.summary["n_groups"] == 2
    assert sorted(r["task"] for r in kept_g) == ["a", "a", "b", "b"]

    # select options pass through (seed, a policy's own parameters)
    _, sel_r = select_dataset(model, records, policy="random", ratio=0.5, seed=3)
    assert sel_r.summary["seed"] == 3
    _, sel_b = select_dataset(model, records, policy="band", low_q=0.0, high_q=1.0, loss_filter_std=None)
    assert len(sel_b) == 20


def test_select_dataset_out_dir_keeps_store(tmp_path):
    from gradsel_core.store import ScoreStore

    model = make_model()
    records = make_records(12)
    _, sel = select_dataset(model, records, ratio=0.5, out_dir=tmp_path / "scores", loss_filter_std=None)
    assert len(sel) == 6
    store = ScoreStore.open(str(tmp_path / "scores"))
    assert len(store) == 12 and sel.summary["score_store"] == str(tmp_path / "scores")
    # a rerun reuses the store (resume) and selects the same records
    _, again = select_dataset(model, records, ratio=0.5, out_dir=tmp_path / "scores", loss_filter_std=None)
    assert list(again.kept_ids) == list(sel.kept_ids)


class SelectableRecords:
    """A dataset with ``.select(indices)`` like ``datasets.Dataset`` (which is not a dependency)."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def select(self, indices):
        return SelectableRecords([self.records[i] for i in indices])


def test_select_dataset_uses_dataset_select():
    model = make_model()
    records = make_records(16)
    subset, sel = select_dataset(model, SelectableRecords(records), ratio=0.25, loss_filter_std=None)
    assert isinstance(subset, SelectableRecords) and len(subset) == 4
    assert subset.records == [records[int(i)] for i in sel.kept_ids]


@pytest.mark.needs_datasets
def test_select_dataset_hf_dataset():
    datasets = pytest.importorskip("datasets")
    model = make_model()
    records = make_records(16)
    ds = datasets.Dataset.from_list(records)
    subset, sel = select_dataset(model, ds, ratio=0.25, loss_filter_std=None)
    assert isinstance(subset, datasets.Dataset)
    assert len(subset) == 4
    assert [r["input_ids"] for r in subset] == [records[int(i)]["input_ids"] for i in sel.kept_ids]
