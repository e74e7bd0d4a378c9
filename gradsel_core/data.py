"""Dataset plumbing shared by the scorer, the trainer and the CLIs: JSONL reading, tokenization,
model loading, collation and the length-bucketing batch planner.

Records
    A *record* is a dict ``{"input_ids": [...], "labels": optional [...], "attention_mask": optional
    [...], "id": optional int|str, ...}``. Other scalar top-level fields (e.g. ``"task"``,
    ``"source"``) ride along as metadata columns.

JSONL
    Each line is a JSON object with ``"text"``, ``"prompt"`` + ``"response"`` or chat ``"messages"`` (or
    already tokenized ``"input_ids"``), plus an optional ``"id"`` and metadata fields. :func:`encode_record`
    tokenizes it: ``text`` is encoded with the tokenizer's special tokens and every token is a target;
    ``prompt`` + ``response`` follow the SFT convention: the prompt is encoded with the special tokens
    (e.g. BOS), the response without them and followed by EOS (when the tokenizer has one), and the
    prompt's labels are -100, so the loss (and the gradient norm) covers response tokens only.
    Prompt and response are tokenized separately, so the boundary never merges across them.
    ``messages`` (``[{"role": "user"|"system"|"assistant", "content": str}, ...]``) are rendered with the
    tokenizer's chat template; the assistant turns (with their end-of-turn tokens) are the targets, every
    other token is -100. Each turn is tokenized on its own, so no token merges across a turn boundary.

Byte tokenizer (``--model tiny``)
    :class:`ByteTokenizer` maps UTF-8 bytes to ids 0..255 and has three specials: 256 ``<bos>``,
    257 ``<eos>``, 258 ``<pad>`` (vocab size 259). ``encode(text)`` prepends ``<bos>``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .batching import IGNORE_INDEX, default_labels
from .errors import UsageError
from .jsonl import (DEFAULT_MAX_LINE_BYTES, INT64_MAX, INT64_MIN, RESERVED_KEYS, check_record_values,  # noqa: F401
                    extra_fields, iter_jsonl, read_jsonl, record_digest)

log = logging.getLogger(__name__)

TOKEN_KEYS = ("input_ids", "labels", "attention_mask")

DEFAULT_MAX_LENGTH = 1024


# -- JSONL ------------------------------------------------------------------------------------------


# -- tokenization -----------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes -> ids 0..255, plus ``<bos>`` = 256, ``<eos>`` = 257, ``<pad>`` = 258 (vocab 259).

    Has the small slice of the HF tokenizer API the package uses: ``encode``, ``decode``, ``__call__``,
    ``bos_token_id``/``eos_token_id``/``pad_token_id`` and ``len()``.
    """

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259
    model_max_length = 512

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out.extend({256: b"<bos>", 257: b"<eos>", 258: b"<pad>"}.get(i, b"<unk>"))
        return out.decode("utf-8", errors="replace")

    def __call__(self, text: str, add_special_tokens: bool = True) -> Dict[str, List[int]]:
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def __len__(self) -> int:
        return self.vocab_size

    # a fixed, plain chat format, so ``messages`` records work with ``--model tiny`` too
    chat_template = "byte-chat: <|role|>, newline, content, newline per message"

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> Any:
        """``"<|role|>\\n" + content + "\\n"`` per message, then ``"<|assistant|>\\n"`` for a generation
        prompt; the text (``tokenize=False``) or its byte ids."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>\n"
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> List[int]:
    if not isinstance(text, str):
        raise TypeError(f"expected a string to tokenize, got {type(text).__name__}")
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=add_special_tokens)]


def _render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"{type(tokenizer).__name__}.apply_chat_template(tokenize=False) returned "
                        f"{type(text).__name__}, not a string")
    return text


def encode_messages(messages: Any, tokenizer: Any) -> Tuple[List[int], List[int]]:
    """``(input_ids, labels)`` of a chat: the tokenizer's chat template renders it, assistant turns are the
    targets (labels = ids), every other token is -100.

    The conversation text is cut where each assistant turn starts (the render of the turns before it with
    the generation prompt) and ends (the render up to and including it); each piece is tokenized on its
    own, without added special tokens (a chat template writes its own). A template whose renders of the
    shorter conversations are not prefixes of the full one cannot be split exactly: that is an error.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("'messages' must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{k}] must be a dict with string 'role' and 'content', got {m!r}")
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("'messages' has no assistant turn: nothing to score (the assistant turns are the targets)")
    if not callable(getattr(tokenizer, "apply_chat_template", None)) or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template, so 'messages' records cannot be rendered; set "
            "tokenizer.chat_template (a Jinja template), or give the records as 'prompt' + 'response'"
        )
    full = _render_chat(tokenizer, messages, False)
    cuts: List[Tuple[int, int]] = []  # (start, end) character spans of the assistant turns in `full`
    for k in turns:
        before = _render_chat(tokenizer, messages[:k], True)  # up to this turn's content (generation prompt)
        upto = _render_chat(tokenizer, messages[: k + 1], False)  # up to and including this turn
        if not (full.startswith(upto) and upto.startswith(before)) or (cuts and len(before) < cuts[-1][1]):
            raise ValueError(
                f"the chat template does not render messages[:{k}] as a prefix of the whole conversation, so "
                "the assistant turn cannot be cut out exactly; give the records as 'prompt' + 'response'"
            )
        cuts.append((len(before), len(upto)))
    ids: List[int] = []
    labels: List[int] = []
    pos = 0
    for start, end in cuts:
        for piece, target in ((full[pos:start], False), (full[start:end], True)):
            if piece:
                t = _encode(tokenizer, piece, add_special_tokens=False)
                ids += t
                labels += t if target else [IGNORE_INDEX] * len(t)
        pos = end
    if full[pos:]:
        t = _encode(tokenizer, full[pos:], add_special_tokens=False)
        ids, labels = ids + t, labels + [IGNORE_INDEX] * len(t)
    return ids, labels


def _int_list(values: Any, key: str) -> List[int]:
    """``values`` as a list of ints; a float (``3.0`` or ``3.7``), bool or string is refused, never truncated."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{key!r} must be a list of integer token ids, got {type(values).__name__}")
    out = []
    for j, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{key}[{j}] = {v!r} is not an integer token id ({type(v).__name__}); write token ids "
                             "as integers")
        out.append(int(v))
    return out


def has_targets(labels: Sequence[int]) -> bool:
    """Whether a causal-LM record has a token its loss covers: a label other than -100 after the first
    position (the first token is never predicted)."""
    return any(int(l) != IGNORE_INDEX for l in labels[1:])


def encode_record(record: Mapping[str, Any], tokenizer: Any, max_length: Optional[int] = None,
                  seq2seq: bool = False) -> Dict[str, Any]:
    """Tokenize one record into ``{"input_ids", "labels", "attention_mask", "id", ...metadata}``.

    ``seq2seq`` (an encoder-decoder model): ``prompt`` -> ``input_ids`` (the encoder's, with special tokens),
    ``response`` -> ``labels`` (the decoder's targets, with special tokens, e.g. EOS), each truncated to
    ``max_length``; ``input_ids`` records pass through with their own ``labels`` (any length); ``text`` and
    ``messages`` records are refused (there is no target to put on the decoder).

    ``text`` -> all tokens are targets; ``prompt`` + ``response`` -> only response tokens (and EOS) are
    targets; chat ``messages`` -> only the assistant turns are targets (:func:`encode_messages`); a record
    that already has ``input_ids`` is passed through. Everything is truncated on the right to
    ``max_length`` tokens. ``id`` is the record's ``"id"`` or ``None``.
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"a record must be a dict, got {type(record).__name__}")
    if seq2seq:
        return _encode_seq2seq(record, tokenizer, max_length)
    if "input_ids" in record:
        ids = _int_list(record["input_ids"], "input_ids")
        labels = _int_list(record["labels"], "labels") if record.get("labels") is not None else list(ids)
        mask = (_int_list(record["attention_mask"], "attention_mask") if record.get("attention_mask") is not None
                else [1] * len(ids))
    elif "prompt" in record or "response" in record:
        if "prompt" not in record or "response" not in record:
            raise ValueError(f"a record with 'prompt' needs 'response' too (and vice versa); keys: {sorted(record)}")
        p = _encode(tokenizer, record["prompt"], add_special_tokens=True)
        r = _encode(tokenizer, record["response"], add_special_tokens=False)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            r = r + [int(eos)]
        ids = p + r
        labels = [IGNORE_INDEX] * len(p) + list(r)
        mask = [1] * len(ids)
    elif "messages" in record:
        ids, labels = encode_messages(record["messages"], tokenizer)
        mask = [1] * len(ids)
    elif "text" in record:
        ids = _encode(tokenizer, record["text"], add_special_tokens=True)
        labels = list(ids)
        mask = [1] * len(ids)
    else:
        raise ValueError(
            f"a record needs 'text', or 'prompt' + 'response', or chat 'messages', or 'input_ids'; got keys {sorted(record)}"
        )
    if len(labels) != len(ids) or len(mask) != len(ids):
        raise ValueError(f"record {record.get('id')!r}: labels/attention_mask must have the length of input_ids")
    if max_length is not None:
        ids, labels, mask = ids[:max_length], labels[:max_length], mask[:max_length]
    out: Dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask, "id": record.get("id")}
    out.update(extra_fields(record))
    return out


def _encode_seq2seq(record: Mapping[str, Any], tokenizer: Any, max_length: Optional[int]) -> Dict[str, Any]:
    if "input_ids" in record:
        if record.get("labels") is None:
            raise UsageError("a record for an encoder-decoder model needs 'labels' (the decoder's targets) with its "
                             "'input_ids' (the encoder's)")
        ids = [int(i) for i in record["input_ids"]]
        labels = [int(i) for i in record["labels"]]
        mask = [int(i) for i in record["attention_mask"]] if record.get("attention_mask") is not None else [1] * len(ids)
        if len(mask) != len(ids):
            raise UsageError(f"record {record.get('id')!r}: attention_mask must have the length of input_ids")
    elif "prompt" in record and "response" in record:
        ids = _encode(tokenizer, record["prompt"], add_special_tokens=True)
        labels = _encode(tokenizer, record["response"], add_special_tokens=True)
        mask = [1] * len(ids)
    else:
        raise UsageError(
            "a record for an encoder-decoder model needs 'prompt' (to the encoder) + 'response' (the decoder's "
            f"targets), or 'input_ids' + 'labels'; got keys {sorted(record)}")
    if max_length is not None:
        ids, labels, mask = ids[:max_length], labels[:max_length], mask[:max_length]
    out: Dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask, "id": record.get("id")}
    out.update(extra_fields(record))
    return out


def compact_record(rec: Dict[str, Any]) -> Dict[str, Any]:
    """The same record in less memory: int32 arrays, ``attention_mask`` dropped when all ones and
    ``labels`` dropped when they equal ``input_ids`` (what :func:`collate` assumes when they are absent)."""
    out = dict(rec)
    ids = np.asarray(rec["input_ids"], dtype=np.int32)
    out["input_ids"] = ids
    mask = rec.get("attention_mask")
    all_ones = mask is None or all(int(m) == 1 for m in mask)
    if all_ones:
        out.pop("attention_mask", None)
    else:
        out["attention_mask"] = np.asarray(mask, dtype=np.int32)
    labels = rec.get("labels")
    if labels is not None:
        lab = np.asarray(labels, dtype=np.int32)
        if all_ones and np.array_equal(lab, ids):
            out.pop("labels")
        else:
            out["labels"] = lab
    return out


def encode_records(
    records, tokenizer: Any, max_length: Optional[int] = None, compact: bool = False, progress: Any = None,
    seq2seq: bool = False, offset: int = 0,
) -> List[Dict[str, Any]]:
    """:func:`encode_record` over an iterable (``compact``: :func:`compact_record` each, ~10x less memory
    than lists for large datasets); warns about records without a target token, saying whether they had
    none or truncation cut them all. ``progress``: called with the number of records encoded so far."""
    out = []
    none, cut = [], []  # positions of records without a target token: from the start / after truncation
    for pos, r in enumerate(records, offset):  # offset: the first record's position (a window of a stream)
        try:
            e = encode_record(r, tokenizer, max_length if seq2seq else None, seq2seq=seq2seq)
        except (ValueError, TypeError) as err:
            rid = r.get("id") if isinstance(r, Mapping) else None
            raise type(err)(f"record {pos}{'' if rid is None else f' (id {rid!r})'}: {err}") from err
        if seq2seq:  # decoder targets: every label counts (no shift); encode_record truncated both sides
            if all(int(l) == IGNORE_INDEX for l in e["labels"]):
                none.append(pos)
        elif not has_targets(e["labels"]):
            none.append(pos)
        elif max_length is not None and len(e["input_ids"]) > max_length and not has_targets(e["labels"][:max_length]):
            cut.append(pos)
        if max_length is not None and not seq2seq:
            for k in TOKEN_KEYS:
                e[k] = e[k][:max_length]
        out.append(compact_record(e) if compact else e)
        if progress is not None:
            progress(pos + 1 - offset)

    def some(p: List[int]) -> str:
        return ", ".join(map(str, p[:5])) + (", ..." if len(p) > 5 else "")

    if none:
        log.warning("%d of %d records have no target token (all labels -100, an empty text or response, or a single "
                    "token): their loss and norm are 0 (records %s)", len(none), len(out), some(none))
    if cut:
        log.warning("%d of %d records lost every target token to truncation at %s tokens: their loss and norm are 0 "
                    "(records %s); raise --max-length or shorten their prompts", len(cut), len(out), max_length, some(cut))
    return out


# -- models -----------------------------------------------------------------------------------------


def tiny_model(seed: int = 0):
    """The built-in TinyGPT for ``--model tiny``: byte vocab (259), d_model 64, 2 layers, 512 positions,
    initialised from ``seed`` without touching the global RNG."""
    from .models import TinyGPT, TinyGPTConfig

    cfg = TinyGPTConfig(
        vocab_size=ByteTokenizer.vocab_size, d_model=64, n_layer=2, n_head=4, max_seq_len=512,
        pad_token_id=ByteTokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyGPT(cfg)


from .sources import HUB_ID_RE, is_hub_id  # noqa: E402,F401  (torch-free, shared with --data Hub dataset ids)


def check_device(device: Any, arg: str = "--device") -> Any:
    """``device`` (a string or ``torch.device``; ``None`` passes) when this torch build can use it;
    ``UsageError`` naming ``arg`` for a malformed string, CUDA/MPS that is not there, or a GPU index beyond
    the visible ones. Checked before any loading."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UsageError(f"{arg} {device}: not a device ({str(e).splitlines()[0]}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UsageError(f"{arg} {device}: {why}; use {arg} cpu (or leave {arg} out)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{arg} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"{arg} {device}: MPS is not available here; use {arg} cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "meta") and not hasattr(torch, dev.type):
        raise UsageError(f"{arg} {device}: device type {dev.type!r} is not available in this torch build")
    return device


def _load_error(spec: str, e: BaseException, hub: bool) -> UsageError:
    """A loading failure as one line naming ``--model``: a missing hub id (offline, not cached), weights that
    do not match the config, a truncated or corrupted weights file."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if len(first) > 300:
        first = first[:300] + "..."
    if hub and isinstance(e, OSError):
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        return UsageError(
            f"--model {spec}: not a local directory, and the Hub id could not be resolved ({first})"
            + ("; HF_HUB_OFFLINE=1 is set: put the model in the HF cache first (or unset it to download)" if offline
               else "; check the id, --revision, your network or HF_TOKEN for gated models"))
    text = str(e)
    if "mismatch" in text or ("shape" in text and "checkpoint" in text):
        return UsageError(f"--model {spec}: the weights do not match config.json ({first}); "
                          "use the config the weights were saved with")
    return UsageError(f"--model {spec}: cannot load the model ({type(e).__name__}: {first}); is the checkpoint "
                      "complete (a truncated model.safetensors?) and config.json the one it was saved with?")


def load_model_and_tokenizer(spec: str, dtype: Optional[str] = None, device: Optional[Any] = None,
                             revision: Optional[str] = None, trust_remote_code: bool = False):
    """``(model, tokenizer)`` for ``"tiny"`` (TinyGPT + :class:`ByteTokenizer`), a local directory or a
    Hugging Face Hub id: an HF causal-LM (``AutoModelForCausalLM``/``AutoTokenizer``; ``AutoModelForSeq2SeqLM``
    when its config says ``is_encoder_decoder``), or a PEFT adapter
    (``adapter_config.json``: the base is loaded from its ``base_model_name_or_path``, a local path (a
    relative one taken from the adapter's folder first, :func:`adapter_base_path`) or a Hub id, then the
    adapter with its LoRA weights trainable, so ``params="trainable"`` selects them).

    A Hub id (``org/name``) resolves as ``from_pretrained`` does: from the local HF cache (``HF_HUB_CACHE``,
    ``HF_HOME``), offline with ``HF_HUB_OFFLINE=1``, downloading otherwise. ``revision`` (a branch, tag or
    commit) and ``trust_remote_code`` (run the repository's own modelling code) are opt-in.

    ``dtype``: ``None``/``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"``, ``"float16"``.
    Errors a user can fix are ``UsageError``s naming ``--model``/``--device``.
    """
    torch_dtype = None
    if dtype not in (None, "auto"):
        if dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"dtype={dtype!r}: use auto, float32, bfloat16, float16 or float64")
        torch_dtype = getattr(torch, dtype)
    check_device(device)
    if spec == "tiny":
        model, tok = tiny_model(), ByteTokenizer()
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    else:
        local = os.path.isdir(spec)
        if not local and (os.path.exists(spec) or not is_hub_id(spec)):
            raise FileNotFoundError(f"--model {spec!r}: not 'tiny', not a local model directory and not a Hub id "
                                    "(org/name)")
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        def auto_class(path: str, kw_: Dict[str, Any]):  # an encoder-decoder config (BART, T5) loads as a seq2seq LM
            return AutoModelForSeq2SeqLM if getattr(AutoConfig.from_pretrained(path, **kw_), "is_encoder_decoder",
                                                    False) else AutoModelForCausalLM

        kw: Dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}
        hub_kw: Dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if revision is not None:
            hub_kw["revision"] = revision
        try:
            base_path = _adapter_config(spec, hub_kw)
            if base_path is not None:  # a PEFT adapter: its base (a folder or a Hub id), then the adapter
                from peft import PeftModel

                base_kw = {"trust_remote_code": trust_remote_code}
                base = _from_pretrained(auto_class(base_path, base_kw), base_path, kw, base_kw)
                model = PeftModel.from_pretrained(base, spec, is_trainable=True, **({"revision": revision} if revision else {}))
                if local and not _has_tokenizer(spec):
                    tok = AutoTokenizer.from_pretrained(base_path, **base_kw)
                else:
                    try:
                        tok = AutoTokenizer.from_pretrained(spec, **hub_kw)
                    except OSError:  # an adapter repository without tokenizer files: the base's
                        tok = AutoTokenizer.from_pretrained(base_path, **base_kw)
            else:
                model = _from_pretrained(auto_class(spec, hub_kw), spec, kw, hub_kw)
                tok = AutoTokenizer.from_pretrained(spec, **hub_kw)
        except Exception as e:  # noqa: BLE001 - a checkpoint that does not load is the user's to fix
            if isinstance(e, UsageError) or "adapter_config.json" in str(e):
                raise
            raise _load_error(spec, e, hub=not local) from e
    if device is not None:
        model = model.to(device)
    return model, tok


def _from_pretrained(cls: Any, where: str, kw: Mapping[str, Any], hub_kw: Mapping[str, Any]) -> Any:
    """``cls.from_pretrained`` that refuses weights that do not fit the config (missing, unexpected or
    mismatched tensors: transformers would initialise them at random and carry on)."""
    model, info = cls.from_pretrained(where, **kw, **hub_kw, output_loading_info=True)
    bad = {k: list(v) for k, v in (info or {}).items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        what = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:3]))}{', ...' if len(v) > 3 else ''}"
                         for k, v in bad.items())
        raise UsageError(f"--model {where}: the weights do not match config.json ({what}); use the config the "
                         "weights were saved with")
    return model


def _adapter_config(spec: str, hub_kw: Mapping[str, Any]) -> Optional[str]:
    """The ``base_model_name_or_path`` of the PEFT adapter at ``spec`` (a local folder or a Hub id; fetched
    like any Hub file), ``None`` when ``spec`` is not an adapter."""
    if os.path.isdir(spec):
        return adapter_base_path(spec) if os.path.exists(os.path.join(spec, "adapter_config.json")) else None
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(spec, "adapter_config.json", revision=hub_kw.get("revision"))
    except Exception:  # noqa: BLE001 - no adapter_config.json (a plain model) or not resolvable: from_pretrained says
        return None
    with open(path, "r", encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UsageError(f"--model {spec}: its adapter_config.json has no base_model_name_or_path")
    return base


def adapter_base_path(adapter_dir: str) -> str:
    """The base model of the PEFT adapter in ``adapter_dir``: its ``adapter_config.json``
    ``base_model_name_or_path``, a relative path resolved against the adapter's folder first, then
    against the working directory; a Hub id (``org/name``) that is no local folder is returned as is.
    ``FileNotFoundError`` naming the file and the paths tried otherwise."""
    adapter_cfg = os.path.join(adapter_dir, "adapter_config.json")
    try:
        with open(adapter_cfg, "r", encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{adapter_cfg}: not valid JSON ({e.msg}, line {e.lineno})") from None
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not isinstance(base, str) or not base:
        raise FileNotFoundError(f"{adapter_cfg}: no base_model_name_or_path; set it to the base model's directory")
    base = os.path.expanduser(base)
    tried = [base] if os.path.isabs(base) else [os.path.join(adapter_dir, base), base]
    for cand in tried:
        if os.path.isdir(cand):
            return cand
    if not os.path.isabs(base) and is_hub_id(base) and "/" in base:
        return base  # a Hub id: from_pretrained resolves it (cache, offline, download)
    where = " or ".join(repr(os.path.abspath(c)) for c in tried)
    raise FileNotFoundError(
        f"{adapter_cfg}: base_model_name_or_path={base!r} is not a local directory (looked for {where}); "
        "edit it to point at the base model's directory (a relative path is taken from the adapter's folder)"
    )


def _has_tokenizer(d: str) -> bool:
    return any(os.path.exists(os.path.join(d, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def model_max_length(model: Any, default: int = DEFAULT_MAX_LENGTH) -> int:
    """The model's maximum number of positions (TinyGPT ``max_seq_len``, HF ``max_position_embeddings``/
    ``n_positions``), else ``default``."""
    cfg = getattr(model, "config", None)
    for attr in ("max_seq_len", "max_position_embeddings", "n_positions"):
        v = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(v, int) and v > 0:
            return v
    return default


def model_pad_id(model: Any) -> int:
    """The model config's ``pad_token_id`` when it is an int, else 0."""
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "pad_token_id", None) if cfg is not None else None
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 else 0


# -- collation --------------------------------------------------------------------------------------


def as_int_array(x: Any, what: str) -> np.ndarray:
    """``x`` (list, numpy array or tensor) as a 1-D int64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(f"{what} must hold ints, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def collate(records: Sequence[Mapping[str, Any]], pad_id: int = 0, max_len: Optional[int] = None,
            seq2seq: bool = False) -> Dict[str, torch.Tensor]:
    """Right-pad records into ``{"input_ids", "attention_mask", "labels"}`` int64 tensors [B, T].

    Padding: ``input_ids = pad_id``, ``attention_mask = 0``, ``labels = -100``. A record without labels
    gets the engine's default labels (its ids, -100 where it or its predecessor is masked). ``max_len``:
    refuse a record longer than that (``UsageError``) instead of building a longer batch. ``seq2seq``: the
    labels are the decoder's targets, padded to their own length [B, T_dec] (required on every record).
    """
    if seq2seq:
        return _collate_seq2seq(records, pad_id, max_len)
    B = len(records)
    ids_l = [as_int_array(r["input_ids"], "input_ids") for r in records]
    T = max((len(a) for a in ids_l), default=0)
    if max_len is not None and T > max_len:
        raise UsageError(f"a record has {T} tokens > max_len={max_len}")
    ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    given = np.zeros(B, dtype=bool)
    for i, (r, a) in enumerate(zip(records, ids_l)):
        n = len(a)
        ids[i, :n] = a
        m = r.get("attention_mask")
        mask[i, :n] = 1 if m is None else as_int_array(m, "attention_mask")
        lab = r.get("labels")
        if lab is not None:
            labels[i, :n] = as_int_array(lab, "labels")
            given[i] = True
    ids_t, mask_t, labels_t = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)
    if not given.all():
        dflt = default_labels(ids_t, mask_t)
        keep = torch.from_numpy(given)[:, None]
        labels_t = torch.where(keep, labels_t, dflt)
    return {"input_ids": ids_t, "attention_mask": mask_t, "labels": labels_t}


def _collate_seq2seq(records: Sequence[Mapping[str, Any]], pad_id: int, max_len: Optional[int]) -> Dict[str, torch.Tensor]:
    enc = collate([{k: r[k] for k in ("input_ids", "attention_mask") if r.get(k) is not None} for r in records],
                  pad_id, max_len)
    labs = []
    for i, r in enumerate(records):
        if r.get("labels") is None:
            raise UsageError(f"record {i} of the batch has no 'labels': an encoder-decoder model is scored on its "
                             "decoder's targets")
        labs.append(as_int_array(r["labels"], "labels"))
    T = max((len(a) for a in labs), default=0)
    if max_len is not None and T > max_len:
        raise UsageError(f"a record has {T} target tokens > max_len={max_len}")
    labels = np.full((len(records), T), IGNORE_INDEX, dtype=np.int64)
    for i, a in enumerate(labs):
        labels[i, :len(a)] = a
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.from_numpy(labels)}


# -- bucketing planner ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedShard:
    """One unit of work and of storage: the dataset positions ``[start, stop)``, split into batches."""

    index: int
    start: int
    stop: int
    batches: Tuple[Tuple[int, ...], ...]  # dataset positions, each batch longest first

    @property
    def size(self) -> int:
        return self.stop - self.start


# The default token budget of scoring (padded tokens B * T_max per batch, no record cap), measured by
# benchmarks/bench_batching.py on the tiny model: see the README's batching row for the figures.
DEFAULT_MAX_TOKENS = 4096


def plan_batches(
    lengths: Sequence[int],
    batch_size: Optional[int] = 16,
    max_tokens: Optional[int] = None,
    window: Optional[int] = None,
    warn: bool = True,
    offset: int = 0,
    first_index: int = 0,
) -> List[PlannedShard]:
    """A deterministic batch plan: the data is cut into consecutive windows of ``window`` records
    (default ``64 * batch_size``); within a window records are sorted by length (longest first, ties by
    position) and packed greedily into batches of at most ``batch_size`` records and at most
    ``max_tokens`` padded tokens (``B * T_max``). A record longer than ``max_tokens`` gets a batch of
    its own (with a warning). Each window is one :class:`PlannedShard`. ``offset`` / ``first_index``: the
    position of ``lengths[0]`` and the index of the first window (a window of a stream, planned on its own).
    """
    if batch_size is None and max_tokens is None:
        raise ValueError("give batch_size, max_tokens or both")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    if window is None:
        window = 64 * batch_size if batch_size is not None else 4096
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window (shard_size) must be a positive int, got {window!r}")
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    shards: List[PlannedShard] = []
    too_long: List[int] = []
    for s, start in enumerate(range(0, n, window), first_index):
        stop = min(n, start + window)
        pos = np.arange(start, stop)
        order = pos[np.lexsort((pos, -lengths[start:stop]))] + offset  # longest first, ties by position
        batches: List[Tuple[int, ...]] = []
        cur: List[int] = []
        cur_t = 0
        for p in order.tolist():
            L = int(lengths[p - offset])
            if cur:
                full = batch_size is not None and len(cur) >= batch_size
                over = max_tokens is not None and (len(cur) + 1) * cur_t > max_tokens
                if full or over:
                    batches.append(tuple(cur))
                    cur = []
            if not cur:
                cur_t = L  # the first record of a batch is its longest
                if max_tokens is not None and L > max_tokens:
                    too_long.append(p)
            cur.append(p)
        if cur:
            batches.append(tuple(cur))
        shards.append(PlannedShard(index=s, start=start + offset, stop=stop + offset, batches=tuple(batches)))
    if too_long and warn:
        log.warning(
            "%d record(s) are longer than max_tokens=%d and are scored in batches of their own "
            "(positions %s%s)", len(too_long), max_tokens, sorted(too_long)[:5], ", ..." if len(too_long) > 5 else "",
        )
    return shards


def bucket_batches(
    lengths: Sequence[int], batch_size: Optional[int] = 16, max_tokens: Optional[int] = None,
    window: Optional[int] = None,
) -> List[Tuple[int, ...]]:
    """The batches of :func:`plan_batches`, flattened (for a trainer or any other consumer)."""
    return [b for sh in plan_batches(lengths, batch_size, max_tokens, window) for b in sh.batches]
