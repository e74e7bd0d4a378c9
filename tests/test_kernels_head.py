"""The LM-head kernels (gradsel_kernels._head) against the torch chunk loop (gradsel_core.ghost.head).

CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported); with GRADSEL_KERNEL_DEVICE=cuda the same tests run compiled on the GPU. Reference: head_pass
(the torch chunk loop, itself tested against the per-sample loop in tests/test_head.py) on the same
inputs: losses, log-sum-exp and the gradient at the head's input.
"""
import importlib.util
import os

import pytest
import torch

from gradsel_core.batching import IGNORE_INDEX
from gradsel_core.ghost import head as H

_DEVICE = os.environ.get("GRADSEL_KERNEL_DEVICE", "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEV = torch.device(_DEVICE)

if HAS_TRITON:
    from gradsel_kernels import _head

if _DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("GRADSEL_KERNEL_DEVICE=cuda but CUDA is not available", allow_module_level=True)

pytestmark = [pytest.mark.needs_triton,
              pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'gradsel[triton]')")]

# fp32: 1e-5 relative (summation order only); bf16: the logits are rounded to bf16 in both paths, so only
# summation order differs before that rounding, which can move a logit by one bf16 ulp (2^-8 relative)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _case(B, T, d, V, dtype, bias, seed=0, ignore=0.25, reduction="mean"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g).to(dtype)
    W = (torch.randn(V, d, generator=g) / d ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignore] = IGNORE_INDEX
    h, W, labels = h.to(DEV), W.to(DEV), labels.to(DEV)
    b = b.to(DEV) if b is not None else None
    return h, W, b, labels


def _both(h, W, b, labels, reduction="mean", post="none", value=1.0):
    core, out = H.head_pass(h, W, b, labels, reduction=reduction, post=post, value=value, chunk=7)
    A = h[:, :-1]  # (B, T', d) a strided view: the kernels read it in place
    lse, tok = _head.head_lse(A, W, b, core.target, core.coef, post, value)
    grad = _head.head_grad(A, W, b, core.target, core.coef, lse, post, value)
    return core, out, lse, tok, grad


def _close(x, ref, dtype, what):
    rtol = RTOL[dtype] * (1 if _DEVICE == "cpu" else 10)
    ref = ref.float()
    atol = rtol * float(ref.abs().max()) + 1e-12
    torch.testing.assert_close(x.float(), ref, rtol=rtol, atol=atol, msg=lambda m: f"{what} {dtype}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,d,V,bias", [
    (2, 9, 24, 70, True),  # V not a multiple of the 64-column block, odd T and d
    (1, 2, 16, 16, False),  # B = 1, one predicting position
    (3, 20, 40, 131, False),  # rows over one 16-row block
    (2, 5, 130, 33, True),  # d over several d blocks of head_grad (64) and BLOCK_K steps
    (2, 4, 144, 40, False),  # bf16: 128-column d blocks (d a multiple of 16)
])
def test_head_kernels_match_the_torch_chunk_loop(B, T, d, V, bias, dtype):
    h, W, b, labels = _case(B, T, d, V, dtype, bias)
    core, out, lse, tok, grad = _both(h, W, b, labels)
    assert lse.dtype == torch.float32 and grad.shape == (B, T - 1, d)
    _close(lse, core.lse, dtype, "lse")
    _close(tok.sum(1), out.losses, dtype, "losses")
    _close(grad, out.grad_h[:, :-1], dtype, "grad_h")


def test_ignored_labels_and_sum_reduction():
    h, W, b, labels = _case(3, 11, 24, 50, torch.float32, True, seed=1, ignore=0.5)
    labels[1] = IGNORE_INDEX  # a sample with no counted token: zero loss and zero gradient
    core, out, lse, tok, grad = _both(h, W, b, labels, reduction="sum")
    _close(tok.sum(1), out.losses, torch.float32, "losses")
    _close(grad, out.grad_h[:, :-1], torch.float32, "grad_h")
    assert torch.equal(tok[1], torch.zeros_like(tok[1])) and torch.equal(grad[1], torch.zeros_like(grad[1]))
    # the ignored rows contribute nothing, but their lse is still the row's log-sum-exp
    _close(lse, core.lse, torch.float32, "lse")


def test_logit_scale():
    h, W, b, labels = _case(2, 8, 32, 45, torch.float32, False, seed=2)
    core, out, lse, tok, grad = _both(h, W, b, labels, post="scale", value=0.37)
    _close(tok.sum(1), out.losses, torch.float32, "losses")
    _close(grad, out.grad_h[:, :-1], torch.float32, "grad_h")


def test_against_autograd_cross_entropy():
    """Independent of head.py: the loss and input gradient of F.cross_entropy over full logits."""
    h, W, b, labels = _case(2, 10, 20, 37, torch.float32, True, seed=3)
    A = h[:, :-1].clone().requires_grad_(True)
    tgt = labels[:, 1:]
    logits = A @ W.t() + b  # (B, T', V)
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE_INDEX,
                                             reduction="sum")
    loss.backward()
    coef = (tgt != IGNORE_INDEX).float()
    lse, tok = _head.head_lse(h[:, :-1], W, b, tgt, coef)
    grad = _head.head_grad(h[:, :-1], W, b, tgt, coef, lse)
    _close(tok.sum(), loss.detach(), torch.float32, "loss")
    _close(grad, A.grad, torch.float32, "grad")


def test_empty_and_errors():
    h, W, b, labels = _case(2, 1, 16, 20, torch.float32, False)
    A = h[:, :0]
    e = torch.zeros(2, 0, dtype=torch.int64, device=DEV)
    lse, tok = _head.head_lse(A, W, None, e, e.float())
    assert lse.shape == (2, 0) and tok.shape == (2, 0)
    assert _head.head_grad(A, W, None, e, e.float(), lse).shape == (2, 0, 16)
    h, W, b, labels = _case(2, 5, 16, 20, torch.float32, False)
    tgt = labels[:, 1:].clone()
    tgt[0, 0] = 20  # outside the vocabulary
    with pytest.raises(ValueError, match="outside"):
        _head.head_lse(h[:, :-1], W, None, tgt, torch.ones(2, 4, device=DEV))
    with pytest.raises(ValueError, match="soft-capped"):
        _head.head_lse(h[:, :-1], W, None, labels[:, 1:], torch.ones(2, 4, device=DEV), post="softcap")
    with pytest.raises(TypeError, match="float64"):
        _head.head_lse(h[:, :-1].double(), W.double(), None, labels[:, 1:], torch.ones(2, 4, device=DEV))


@pytest.mark.skipif(_DEVICE != "cpu", reason="interpreter check")
def test_head_kernels_run_interpreted():
    assert type(_head._head_lse_kernel).__name__ == "InterpretedFunction"
    assert type(_head._head_grad_kernel).__name__ == "InterpretedFunction"


# -- the wiring: head_pass and the engine use the kernels only where they are exact ------------------------


@pytest.fixture
def head_kernels_on(monkeypatch):
    from gradsel_core import dispatch

    monkeypatch.setattr(dispatch, "HEAD_KERNELS", True)


def test_head_kernels_are_off_by_default():
    h, W, b, labels = _case(2, 9, 24, 70, torch.float32, True, seed=4)
    assert not H.head_pass(h, W, b, labels, chunk=7, use_triton=True)[0].kernel


def test_head_pass_uses_the_kernels_only_for_a_frozen_head(head_kernels_on):
    h, W, b, labels = _case(2, 9, 24, 70, torch.float32, True, seed=4)
    ref_core, ref = H.head_pass(h, W, b, labels, chunk=7)
    core, out = H.head_pass(h, W, b, labels, chunk=7, use_triton=True)
    assert core.kernel and not ref_core.kernel
    _close(out.losses, ref.losses, torch.float32, "losses")
    _close(out.grad_h, ref.grad_h, torch.float32, "grad_h")
    _close(core.lse, ref_core.lse, torch.float32, "lse")
    # a scored head parameter, fp64 and soft-capping keep the torch chunk loop
    assert not H.head_pass(h, W, b, labels, want=("weight",), chunk=7, use_triton=True)[0].kernel
    assert not H.head_pass(h.double(), W.double(), b.double(), labels, chunk=7, use_triton=True)[0].kernel
    assert not H.head_pass(h, W, b, labels, post="softcap", value=3.0, chunk=7, use_triton=True)[0].kernel


@pytest.mark.skipif(_DEVICE != "cpu", reason="the engine test runs its models on CPU")
def test_engine_triton_backend_with_a_frozen_head_matches_the_loop(head_kernels_on):
    import transformers as tf

    import gradsel_core as gs
    from gradsel_core.backends.loop import score_loop
    from gradsel_core.batching import prepare_batch
    from gradsel_core.ghost import score_ghost
    from gradsel_core.types import scoring_mode

    torch.manual_seed(0)
    V = 97
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2))
    model.lm_head.requires_grad_(False)  # a frozen head: only the gradient at its input is needed
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    labels = gs.batching.default_labels(ids, mask)
    labels[0, 2:4] = IGNORE_INDEX
    batch = prepare_batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, lm_loss=True)
    eng = gs.GradNormEngine(model, params="trainable", backend="ghost", fused_head=True)
    with scoring_mode(model, eng.params):
        fast = score_ghost(eng.ghost, batch, use_triton=True, strict=True)
        assert eng.ghost.head_status.startswith("on") and "Triton kernels" in eng.ghost.head_status, \
            eng.ghost.head_status
        ref = score_loop(eng.spec, batch, None)
    for name, sq in ref.per_param_sq.items():
        _close(fast.per_param_sq[name], sq, torch.float32, name)
