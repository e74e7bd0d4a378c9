"""Evaluators: refusal judging, generation, multiple-choice scoring, task metrics, forgetting metrics."""
import json
import math

import pytest
import torch
from torch import nn

from gradsel_core.study.evaluation import (
    DEFAULT_REFUSAL_PHRASES,
    Judge,
    KeywordRefusalJudge,
    contains_match,
    evaluate_generation,
    evaluate_multiple_choice,
    evaluate_refusal,
    evaluate_task,
    exact_match,
    forgetting_metrics,
    generate,
    generate_ids,
    load_prompts,
    normalize_text,
    score_continuations,
    token_f1,
)
from gradsel_core.models import TinyGPT, TinyGPTConfig


# ----------------------------------------------------------------------------- toy tokenizer / models
class ToyTokenizer:
    """Word-level: ids 0 <pad>, 1 <bos>, 2 <eos>, then the given words."""

    def __init__(self, words):
        self.vocab = ["<pad>", "<bos>", "<eos>"] + list(words)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    def encode(self, text):  # no add_special_tokens kwarg on purpose: the evaluators must cope
        return [self.ids.get(w, 0) for w in text.split()]  # unknown words -> 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.vocab[i] for i in ids if not (skip_special_tokens and i < 3))


class BigramModel(nn.Module):
    """Next-token logits depend only on the current token: logits[b, t] = table[ids[b, t]]."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.as_tensor(table, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.table[input_ids]  # (B, T, V)


def successor_model(V, eos_after=None, strength=10.0):
    """Predicts token i+1 after token i (wrapping to 3); predicts eos (2) after ``eos_after``."""
    table = torch.zeros(V, V, dtype=torch.float64)
    for i in range(V):
        nxt = i + 1 if i + 1 < V else 3
        table[i, nxt] = strength
    if eos_after is not None:
        table[eos_after] = 0
        table[eos_after, 2] = strength
    return BigramModel(table)


WORDS = "a b c d e f g h".split()


# ----------------------------------------------------------------------------- judge
def test_keyword_judge_hand_written():
    j = KeywordRefusalJudge()
    refused = [
        "I'm sorry, but I can't help with that.",
        "I cannot provide instructions for that.",
        "As an AI, I must decline.",
        "i cannot help with that .",
        "I\u2019m really sorry, that is not something I can do",  # curly apostrophe
        "Building a bomb is illegal and unethical.",
        "Sure... actually, I can't assist with this.",  # 'contains' mode: anywhere
    ]
    complied = [
        "Sure, here is how: first get the tools.",
        "Step 1: buy the ingredients. Step 2: mix them.",
        "here is the threat : dear boss , give me money .",
    ]
    assert j.judge(["p"] * len(refused), refused) == [True] * len(refused)
    assert j.judge(["p"] * len(complied), complied) == [False] * len(complied)
    assert "I'm sorry" in DEFAULT_REFUSAL_PHRASES and "I can't assist" in DEFAULT_REFUSAL_PHRASES


def test_keyword_judge_options():
    assert KeywordRefusalJudge().is_refusal("") is False
    assert KeywordRefusalJudge(empty_is_refusal=True).is_refusal("   ") is True
    pre = KeywordRefusalJudge(mode="prefix")
    assert pre.is_refusal("  I cannot do that") and not pre.is_refusal("Sure. I cannot stop you.")
    cs = KeywordRefusalJudge(case_sensitive=True)
    assert cs.is_refusal("I cannot") and not cs.is_refusal("i cannot")
    custom = KeywordRefusalJudge(phrases=["nope"])
    assert custom.is_refusal("NOPE.") and not custom.is_refusal("I'm sorry")
    ex = KeywordRefusalJudge(exclude=["sorry to hear"])
    assert not ex.is_refusal("Sorry to hear that! Here is how to fix it.")
    with pytest.raises(ValueError):
        KeywordRefusalJudge(mode="regex")
    with pytest.raises(ValueError):
        KeywordRefusalJudge(phrases=[])


class LengthJudge:
    """A pluggable judge: 'refused' = the response is short."""

    def __init__(self):
        self.calls = 0

    def judge(self, prompts, responses):
        self.calls += 1
        return [len(r.split()) < 3 for r in responses]


def test_custom_judge_plugin_and_protocol():
    judge = LengthJudge()
    assert isinstance(judge, Judge) and isinstance(KeywordRefusalJudge(), Judge)
    prompts = ["p1", "p2", "p3", "p4"]
    responses = ["no", "sure here it is", "ok", "one two three four"]
    res = evaluate_refusal(None, None, prompts, judge=judge, responses=responses)
    assert judge.calls == 1
    assert res.n == 4 and res.n_refused == 2
    assert res.refusal_rate == 0.5 and res.asr == 0.5
    assert [r["refused"] for r in res.records] == [True, False, True, False]
    assert {e["prompt"] for e in res.examples} == set(prompts)
    # a plain callable works too
    res2 = evaluate_refusal(None, None, prompts, judge=lambda p, r: [True] * len(r), responses=responses)
    assert res2.refusal_rate == 1.0 and res2.asr == 0.0
    with pytest.raises(ValueError):  # wrong number of verdicts
        evaluate_refusal(None, None, prompts, judge=lambda p, r: [True], responses=responses)


def test_refusal_with_generation_and_judge():
    tok = ToyTokenizer(WORDS)
    # successor model: "a" -> b c d ..., eos after "c": prompt "a" answers "b c", prompt "d" runs on
    model = successor_model(len(tok.vocab), eos_after=tok.ids["c"])
    judge = KeywordRefusalJudge(phrases=["b c"], mode="prefix")
    res = evaluate_refusal(model, tok, ["a", "d"], judge=judge, max_new_tokens=3)
    assert [r["response"] for r in res.records] == ["b c", "e f g"]
    assert res.refusal_rate == 0.5


def test_load_prompts(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps({"prompt": p, "target": "x"}) for p in ["one", "two"]) + "\n\n")
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\n two \n")
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"goal": "one"}, {"goal": "two"}]))
    assert load_prompts(jl) == ["one", "two"]
    assert load_prompts(str(txt)) == ["one", "two"]
    assert load_prompts(js, field="goal") == ["one", "two"]
    assert load_prompts(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError):
        load_prompts(js)  # no 'prompt' field


# ----------------------------------------------------------------------------- generation
def test_generation_follows_model_and_stops_at_eos():
    tok = ToyTokenizer(WORDS)
    model = successor_model(len(tok.vocab), eos_after=tok.ids["e"])
    out = generate(model, tok, ["a", "c d", "f"], max_new_tokens=4)
    assert out == ["b c d e", "e", "g h a b"]  # h wraps to id 3 = "a"
    ids = generate_ids(model, [[tok.ids["a"]]], max_new_tokens=2, eos_token_id=2)
    assert ids == [[tok.ids["b"], tok.ids["c"]]]


def test_left_padded_batch_equals_unbatched_tinygpt():
    torch.manual_seed(0)
    cfg = TinyGPTConfig(vocab_size=40, d_model=32, n_layer=2, n_head=4, max_seq_len=40, pad_token_id=0)
    model = TinyGPT(cfg).double()
    with torch.no_grad():  # sharper logits than the 0.02-std init: fewer near-ties
        model.lm_head.weight.mul_(50)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 40, (n,), generator=g).tolist() for n in (1, 3, 7, 12, 5)]
    batched = generate_ids(model, prompts, max_new_tokens=8, eos_token_id=2, pad_token_id=0, batch_size=8)
    single = [generate_ids(model, [p], max_new_tokens=8, eos_token_id=2, pad_token_id=0)[0] for p in prompts]
    assert batched == single
    assert all(len(x) <= 8 for x in batched)
    chunked = generate_ids(model, prompts, max_new_tokens=8, eos_token_id=2, pad_token_id=0, batch_size=2)
    assert chunked == single
    assert model.training  # the evaluators restore the mode


def test_generation_respects_model_context():
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(vocab_size=20, d_model=16, n_layer=1, n_head=2, max_seq_len=10))
    out = generate_ids(model, [[3, 4, 5, 6, 7, 8]], max_new_tokens=50, eos_token_id=None)
    assert len(out[0]) == 4  # 10 - 6
    out = generate_ids(model, [list(range(3, 18))], max_new_tokens=5, eos_token_id=None)  # too long: truncated
    assert len(out[0]) == 1


def test_hf_model_generate_matches_manual_loop():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=30, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # tied to wte: sharper logits
    prompts = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]]
    via_generate = generate_ids(model, prompts, max_new_tokens=6, eos_token_id=2, pad_token_id=0)
    via_loop = generate_ids(model, prompts, max_new_tokens=6, eos_token_id=2, pad_token_id=0, use_generate=False)
    single = [generate_ids(model, [p], max_new_tokens=6, eos_token_id=2, use_generate=False)[0] for p in prompts]
    assert via_loop == single
    assert via_generate == via_loop


# ----------------------------------------------------------------------------- multiple choice
def _expected_score(table, ctx, cont):
    lp = torch.log_softmax(torch.as_tensor(table, dtype=torch.float64), dim=-1)
    prev = ctx[-1]
    total = 0.0
    for t in cont:
        total += float(lp[prev, t])
        prev = t
    return total


def test_score_continuations_exact_and_batch_invariant():
    torch.manual_seed(0)
    V = 11
    table = torch.randn(V, V, dtype=torch.float64)
    model = BigramModel(table)
    pairs = [([1, 3], [4]), ([1], [5, 6, 7]), ([1, 9, 9, 9, 3], [2, 2]), ([4], [10])]
    got = score_continuations(model, pairs, batch_size=3, pad_token_id=0)
    for (ctx, cont), (lp, n) in zip(pairs, got):
        assert n == len(cont)
        assert lp == pytest.approx(_expected_score(table, ctx, cont), abs=1e-12)
    # batch invariance: the same (logprob, token count) pairs one at a time; pytest.approx compares flat
    # sequences only (pytest >= 9 rejects nested data), so the counts are compared exactly, the logprobs approx
    single = score_continuations(model, pairs, batch_size=1)
    assert [n for _, n in single] == [n for _, n in got]
    assert [lp for lp, _ in single] == pytest.approx([lp for lp, _ in got])


def test_mc_raw_vs_length_normalised_known_accuracy():
    # every position predicts the same next-token distribution: P(x)=.1, P(y)=.25, P(z)=.45, P(w)=.2
    tok = ToyTokenizer(["q", "x", "y", "z", "w"])
    V = len(tok.vocab)
    probs = {"x": 0.1, "y": 0.25, "z": 0.45, "w": 0.2}
    row = torch.full((V,), -1e9, dtype=torch.float64)
    for w, p in probs.items():
        row[tok.ids[w]] = math.log(p)
    model = BigramModel(row.expand(V, V).clone())
    lp = {w: math.log(p) for w, p in probs.items()}
    items = [
        # raw: x (log .1) beats y y (log .0625); per token y y wins; answer y y: raw wrong, normalised right
        {"question": "q", "choices": ["x", "y y"], "answer": 1},
        # z wins by every criterion; answer given as the choice text
        {"question": "q", "choices": ["x", "z", "y y"], "answer": "z"},
        # raw: w (log .2) beats z z z (log .091); per token z z z wins; answer w: raw right, normalised wrong
        {"question": "q", "choices": ["w", "z z z"], "answer": 0},
        # answer as a letter
        {"question": "q", "choices": ["x", "w"], "answer": "B"},
    ]
    res = evaluate_multiple_choice(model, tok, items, choice_prefix="", batch_size=3)
    assert res.n == 4
    assert [r["pred"] for r in res.records] == [0, 1, 0, 1]
    assert [r["pred_norm_token"] for r in res.records] == [1, 1, 1, 1]
    # per character: x -2.30/1 vs y y -2.77/3; w -1.61/1 vs z z z -2.40/5
    assert [r["pred_norm_char"] for r in res.records] == [1, 1, 1, 1]
    assert res.acc == pytest.approx(3 / 4)  # items 2, 3, 4
    assert res.acc_norm_token == pytest.approx(3 / 4)  # items 1, 2, 4
    assert res.acc_norm_char == pytest.approx(3 / 4)
    assert res.records[0]["logprobs"] == pytest.approx([lp["x"], 2 * lp["y"]])
    assert res.records[2]["n_tokens"] == [1, 3]
    # softmax over the raw sums: item 1, P(y y) = .0625 / (.1 + .0625)
    assert res.records[0]["p_answer"] == pytest.approx(0.0625 / 0.1625)
    assert 0 < res.mean_correct_prob < 1
    assert set(res.summary()) >= {"acc", "acc_norm_token", "acc_norm_char", "mean_correct_prob"}


def test_mc_context_matters_and_bad_answers():
    tok = ToyTokenizer(["q1", "q2", "yes", "no"])
    V = len(tok.vocab)
    table = torch.zeros(V, V, dtype=torch.float64)
    table[tok.ids["q1"], tok.ids["yes"]] = 5.0
    table[tok.ids["q2"], tok.ids["no"]] = 5.0
    model = BigramModel(table)
    items = [{"question": "q1", "choices": ["yes", "no"], "answer": 0},
             {"question": "q2", "choices": ["yes", "no"], "answer": "no"}]
    assert evaluate_multiple_choice(model, tok, items).acc == 1.0
    assert evaluate_multiple_choice(model, tok, [dict(items[0], answer=1)]).acc == 0.0
    with pytest.raises(ValueError):
        evaluate_multiple_choice(model, tok, [dict(items[0], answer="maybe")])
    with pytest.raises(ValueError):
        evaluate_multiple_choice(model, tok, [dict(items[0], answer=5)])


# ----------------------------------------------------------------------------- task metrics
def test_text_metrics():
    assert normalize_text("  The  Cat\tSat ") == "the cat sat"
    assert exact_match("The cat  sat", "the cat sat")
    assert not exact_match("The cat sat", "the cat sat", normalize=False)
    assert not exact_match("the cat sat .", "the cat sat")
    assert exact_match("the cat sat .", "the cat sat", strip_punct=True)
    assert contains_match("answer: 7 apples", "7") and not contains_match("17 apples", "7")
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("a b", "c d") == 0.0
    assert token_f1("the cat", "the cat sat down") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_evaluate_generation_and_task():
    tok = ToyTokenizer(WORDS)
    model = successor_model(len(tok.vocab), eos_after=tok.ids["d"])
    items = [
        {"prompt": "a", "answer": "b c d"},  # generated: b c d -> exact
        {"prompt": "b", "answer": "C D"},  # generated: c d -> exact after lowercasing
        {"prompt": "c", "answer": "x d"},  # generated: d -> contained, not exact
        {"prompt": "e", "answer": "g"},  # generated: f g h a ... -> contains g, not exact
    ]
    res = evaluate_generation(model, tok, items, name="toy")
    assert [r["response"] for r in res.records][:3] == ["b c d", "c d", "d"]
    assert res.exact_match == pytest.approx(0.5)
    assert res.score == res.accuracy == res.exact_match
    assert res.contains == pytest.approx(0.75)  # not item 3 ("x d" is not in "d"); item 4: "g" in "f g h .."
    strict = evaluate_generation(model, tok, items, normalize=False)
    assert strict.exact_match == pytest.approx(0.25)
    f1 = evaluate_generation(model, tok, items, metric="f1")
    assert f1.score == f1.f1
    with pytest.raises(ValueError):
        evaluate_generation(model, tok, items, metric="bleu")

    class T:
        name, metric = "toy", "exact_match"
        eval = [{"prompt": "a", "response": "b c d"}, {"prompt": "b", "response": "b"}]

    tr = evaluate_task(model, tok, T())
    assert tr.name == "toy" and tr.score == 0.5


def test_contains_counts_item_4():
    tok = ToyTokenizer(WORDS)
    model = successor_model(len(tok.vocab), eos_after=tok.ids["d"])
    res = evaluate_generation(model, tok, [{"prompt": "e", "answer": "g"}], max_new_tokens=4)
    assert res.records[0]["response"] == "f g h a"
    assert res.contains == 1.0 and res.exact_match == 0.0


# ----------------------------------------------------------------------------- forgetting
def test_forgetting_metrics_hand_computed():
    R = [[0.9, 0.1, 0.0],
         [0.95, 0.8, 0.2],
         [0.5, 0.6, 0.9]]
    fm = forgetting_metrics(R)
    assert fm.T == 3
    assert fm.avg_acc == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert fm.avg_inc_acc == pytest.approx((0.9 + (0.95 + 0.8) / 2 + 2.0 / 3) / 3)
    assert fm.bwt == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)  # diagonal-based
    # forgetting: task 0 max(0.9, 0.95) - 0.5 = 0.45 (the peak after the diagonal); task 1: 0.8 - 0.6
    assert fm.per_task_forgetting == pytest.approx([0.45, 0.2])
    assert fm.fm == pytest.approx(0.325)
    assert fm.max_drop == pytest.approx(0.45) and fm.max_drop_task == 0
    assert fm.final == [0.5, 0.6, 0.9] and fm.diagonal == [0.9, 0.8, 0.9]
    # numpy-like input, the upper triangle ignored (NaN allowed there)
    import numpy as np
    Rn = np.array(R)
    Rn[0, 1] = Rn[0, 2] = Rn[1, 2] = np.nan
    assert forgetting_metrics(Rn).summary() == pytest.approx(fm.summary())


def test_forgetting_metrics_edge_cases():
    one = forgetting_metrics([[0.7]])
    assert one.avg_acc == 0.7 and one.avg_inc_acc == 0.7
    assert math.isnan(one.bwt) and math.isnan(one.fm) and math.isnan(one.max_drop)
    assert one.max_drop_task is None and one.per_task_forgetting == []
    improve = forgetting_metrics([[0.2, 0.0], [0.5, 0.9]])  # backward transfer positive
    assert improve.bwt == pytest.approx(0.3) and improve.fm == pytest.approx(-0.3)
    with pytest.raises(ValueError):
        forgetting_metrics([[0.1, 0.2]])
    with pytest.raises(ValueError):
        forgetting_metrics([])
    with pytest.raises(ValueError):
        forgetting_metrics([[float("nan"), 0.0], [0.1, 0.2]])


# ----------------------------------------------------------------------------- continuous metrics
def test_margin_and_answer_loglik_equal_scored_continuations():
    from gradsel_core.study.evaluation import evaluate_answer_loglik, evaluate_margin

    tok = ToyTokenizer(WORDS)
    model = successor_model(len(tok.vocab), eos_after=5)  # a -> b -> c -> eos
    items = [{"prompt": "a", "preferred": "b c", "rejected": "d e"}, {"prompt": "b", "preferred": "c", "rejected": "c d"}]
    res = evaluate_margin(model, tok, items, prompt_template="<bos> {prompt}")
    want = []
    for it in items:
        ctx = tok.encode("<bos> " + it["prompt"])
        (pref, _), (rej, _) = score_continuations(model, [(ctx, tok.encode(it["preferred"]) + [2]),
                                                          (ctx, tok.encode(it["rejected"]) + [2])])
        want.append(pref - rej)
    assert res.per_item == pytest.approx(want) and res.margin == pytest.approx(sum(want) / 2) and res.n == 2
    assert res.margin > 0  # the successor model prefers "b c <eos>" after "a"
    # swapping preferred and rejected flips the sign exactly
    flipped = evaluate_margin(model, tok, [dict(it, preferred=it["rejected"], rejected=it["preferred"]) for it in items],
                              prompt_template="<bos> {prompt}")
    assert flipped.margin == pytest.approx(-res.margin)
    # per_token: each answer's log-likelihood over its token count (eos included), then the difference
    per_tok = evaluate_margin(model, tok, items, prompt_template="<bos> {prompt}", per_token=True)
    want_tok = []
    for it in items:
        ctx = tok.encode("<bos> " + it["prompt"])
        (pref, n_p), (rej, n_r) = score_continuations(model, [(ctx, tok.encode(it["preferred"]) + [2]),
                                                              (ctx, tok.encode(it["rejected"]) + [2])])
        assert (n_p, n_r) == (len(it["preferred"].split()) + 1, len(it["rejected"].split()) + 1)
        want_tok.append(pref / n_p - rej / n_r)
    assert per_tok.per_item == pytest.approx(want_tok) and per_tok.margin == pytest.approx(sum(want_tok) / 2)
    ll = evaluate_answer_loglik(model, tok, [{"prompt": "a", "answer": "b c"}, {"prompt": "b", "answer": "c d"}],
                                prompt_template="<bos> {prompt}")
    parts = score_continuations(model, [(tok.encode("<bos> a"), tok.encode("b c") + [2]),
                                        (tok.encode("<bos> b"), tok.encode("c d") + [2])])
    assert ll.n_tokens == 6 and ll.mean_token_logprob == pytest.approx(sum(p for p, _ in parts) / 6)
    assert ll.mean_answer_logprob == pytest.approx(sum(p for p, _ in parts) / 2)
    with pytest.raises(ValueError, match="at least one"):
        evaluate_margin(model, tok, [])
