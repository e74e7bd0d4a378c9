"""``score_dataset(model, records, out, tokenizer=...)``: text, prompt + response and chat ``messages``
records straight from Python, as ``gradsel score --data`` takes them; and ``import gradsel``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradsel_core as gs
from gradsel_core.batching import IGNORE_INDEX
from gradsel_core.data import ByteTokenizer, encode_messages, encode_record, encode_records, tiny_model

REPO = Path(__file__).resolve().parents[1]

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
RECORDS = [
    {"id": "t", "text": "the cat sat on the mat", "task": "lm"},
    {"id": "p", "prompt": "2+3=", "response": "5", "task": "math"},
    {"id": "m", "messages": CHAT, "task": "chat"},
]


def _targets(tok, rec):
    return tok.decode([i for i, l in zip(rec["input_ids"], rec["labels"]) if l != IGNORE_INDEX])


def test_messages_targets_are_the_assistant_turns_only():
    tok = ByteTokenizer()
    rec = encode_record({"messages": CHAT}, tok)
    assert tok.decode(rec["input_ids"]) == tok.apply_chat_template(CHAT)
    assert _targets(tok, rec) == "hello\n4\n"  # each assistant turn with its end-of-turn newline
    assert len(rec["labels"]) == len(rec["input_ids"]) == len(rec["attention_mask"])


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty list"),
    ([{"role": "user"}], "string 'role' and 'content'"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
])
def test_bad_messages_are_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(bad, ByteTokenizer())


def test_messages_need_a_chat_template():
    class NoTemplate(ByteTokenizer):
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        encode_record({"messages": CHAT}, NoTemplate())


def test_a_template_that_rewrites_earlier_turns_is_refused():
    class Rewrites(ByteTokenizer):  # numbers the turns from the end: a prefix renders differently
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return "".join(f"[{len(messages) - i}]{m['content']}" for i, m in enumerate(messages))

    with pytest.raises(ValueError, match="prefix"):
        encode_record({"messages": CHAT}, Rewrites())


def test_encode_records_names_the_bad_record():
    with pytest.raises(ValueError, match=r"record 1 \(id 'x'\)"):
        encode_records([{"text": "ok"}, {"id": "x", "prompt": "no response"}], ByteTokenizer())


def test_score_dataset_with_a_tokenizer_equals_pre_encoded_records(tmp_path):
    model, tok = tiny_model(), ByteTokenizer()
    via_tok = gs.score_dataset(model, RECORDS, tmp_path / "a", tokenizer=tok, batch_size=2, progress=False)
    encoded = encode_records(RECORDS, tok, 512)
    ref = gs.score_dataset(model, encoded, tmp_path / "b", batch_size=2, progress=False)
    assert via_tok.ids.tolist() == ["t", "p", "m"]
    assert via_tok.fields["task"].tolist() == ["lm", "math", "chat"]
    np.testing.assert_array_equal(via_tok.norms, ref.norms)
    np.testing.assert_array_equal(via_tok.losses, ref.losses)
    # targets: every text token but the first; the response + EOS; the assistant turns
    assert via_tok.tokens.tolist() == [len("the cat sat on the mat"), 2, len("hello\n4\n")]
    assert np.isfinite(via_tok.norms).all() and (via_tok.norms > 0).all()


def test_score_dataset_max_length_truncates_and_needs_a_tokenizer(tmp_path):
    model, tok = tiny_model(), ByteTokenizer()
    store = gs.score_dataset(model, RECORDS[:1], tmp_path / "a", tokenizer=tok, max_length=5, progress=False)
    assert store.tokens.tolist() == [4]
    with pytest.raises(ValueError, match="needs tokenizer="):
        gs.score_dataset(model, encode_records(RECORDS, tok), tmp_path / "b", max_length=5, progress=False)


def test_score_dataset_without_a_tokenizer_says_to_pass_one(tmp_path):
    with pytest.raises(ValueError, match="pass tokenizer="):
        gs.score_dataset(tiny_model(), RECORDS, tmp_path / "a", progress=False)


def test_hf_chat_template_assistant_turns(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from transformers import AutoTokenizer

    from conftest import make_llama_dir

    tok = AutoTokenizer.from_pretrained(make_llama_dir(tmp_path / "llama"))
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    chat = [{"role": "user", "content": "what is two plus three ?"}, {"role": "assistant", "content": "five"}]
    rec = encode_record({"messages": chat}, tok)
    assert rec["input_ids"] == tok.encode(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)
    targets = [i for i, l in zip(rec["input_ids"], rec["labels"]) if l != IGNORE_INDEX]
    assert targets == tok.encode("five </s>", add_special_tokens=False)  # the reply and its end of turn


def test_import_gradsel_is_gradsel_core():
    code = (
        "import gradsel, gradsel_core\n"
        "assert gradsel is gradsel_core\n"
        "import gradsel.models, gradsel.store\n"
        "from gradsel.data import ByteTokenizer\n"
        "import gradsel_core.models, gradsel_core.store, gradsel_core.data\n"
        "assert gradsel.models is gradsel_core.models and gradsel.store is gradsel_core.store\n"
        "assert ByteTokenizer is gradsel_core.data.ByteTokenizer\n"
        "assert gradsel.GradNormEngine is gradsel_core.GradNormEngine\n"
        "try:\n    import gradsel.no_such_module\nexcept ModuleNotFoundError:\n    pass\n"
        "else:\n    raise AssertionError('gradsel.no_such_module imported')\n"
        "print(gradsel.__version__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == gs.__version__
