"""Cross-entropy (mean nats per predicted token) and perplexity of a model, on three kinds of data:

* ``text``: general text (``.txt`` / ``.raw`` file, or a hub dataset's text column), read up to ``max_tokens``
  tokens and cut into sequences of ``seq_len`` tokens. With a BOS token, each sequence is BOS + ``seq_len - 1``
  text tokens and every text token is predicted; without one, the first token of each sequence is context only.
* ``response``: instruction/response pairs; the instruction is formatted with the tokenizer's chat template
  (:func:`refusal.templates.format_prompts`), the response appended, and only response tokens are scored.
* ``completion``: the model's own completions ``{instruction, completion}``, scored the same way.

Sources: a path (``.txt`` / ``.raw`` for text; ``.json`` / ``.jsonl`` / ``.csv`` for pairs), a list of records, or
``hf:ORG/NAME[:SPLIT]`` / ``hf:ORG/NAME:CONFIG:SPLIT`` (needs the optional ``datasets`` package). Columns are found
by name, case-insensitively (instruction: instruction, prompt, question...; response: response, output, answer,
best answer...), or mapped explicitly, e.g. ``columns={"instruction": "Question", "response": "Best Answer"}`` for
TruthfulQA's CSV.

Everything that can go wrong with the data (missing file or columns, a text shorter than the tokens asked for, no
tokens to score) raises a :class:`RefusalError` in :func:`prepare`, before any forward pass. :func:`evaluate` only
runs forwards, so it measures the model under whatever intervention is active around the call::

    seqs = prepare(tokenizer, "wiki.test.raw", mode="text", seq_len=512, max_tokens=65536)
    with ablate(model, direction):
        print(evaluate(model, seqs, batch_size=8))   # {"loss", "perplexity", "tokens", "sequences"}
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RefusalError

MODES = ("text", "response", "completion")
TEXT_SUFFIXES = (".txt", ".raw")
PAIR_SUFFIXES = (".json", ".jsonl", ".csv")
CANDIDATES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "prompt", "question", "input", "query", "goal", "behavior"),
    "response": ("response", "output", "answer", "best answer", "best_answer", "target", "chosen"),
    "completion": ("completion",),
    "text": ("text", "content", "document"),
}


@dataclass
class Sequences:
    """Token sequences and, per position, whether that token is predicted (counted in the loss)."""

    ids: list[list[int]]
    scored: list[list[bool]]
    pad_id: int
    skipped: int = 0  # records dropped (empty response, or a prompt that fills seq_len)

    @property
    def tokens(self) -> int:
        return sum(sum(s) for s in self.scored)

    def __len__(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------------------------------------------
# Reading sources


def _hub_rows(spec: str) -> list[dict]:
    parts = spec[3:].split(":")
    name, config, split = parts[0], None, "train"
    if len(parts) == 2:
        split = parts[1] or "train"
    elif len(parts) == 3:
        config, split = parts[1] or None, parts[2] or "train"
    elif len(parts) > 3:
        raise RefusalError(f"'{spec}' is not a hub source.", "Use hf:ORG/NAME[:SPLIT] or hf:ORG/NAME:CONFIG:SPLIT.")
    try:
        import datasets  # optional dependency
    except ImportError:
        raise RefusalError(f"Loading '{spec}' needs the 'datasets' package.",
                           "pip install datasets, or download the data to a file and pass its path.") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "cannot get this dataset"
        raise RefusalError(f"Could not load the hub dataset '{name}' ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).",
                           "Check the name, config and split and your network, or pass a local file.") from None
    return [dict(r) for r in ds]


def _file_rows(p: Path, source: str) -> list[dict]:
    text = p.read_text("utf-8-sig")
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            rows = json.loads(text)
            if isinstance(rows, dict):
                rows = next((v for v in rows.values() if isinstance(v, list)), None)
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except json.JSONDecodeError as exc:
        raise RefusalError(f"'{source}' is not valid JSON ({exc}).", "Fix the file.") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RefusalError(f"'{source}' is not a list of records.",
                           "Use a JSON list of objects, JSON lines, or a CSV file with a header row.")
    return rows


def load_source(source: str | Path | Sequence[Mapping], mode: str | None = None) -> str | list[dict]:
    """The raw data of a source: a string (text) or a list of records. No tokenizer or model needed."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(r, Mapping) for r in source):
            raise RefusalError("The records to score are not all mappings.",
                               "Pass records such as {'instruction': ..., 'response': ...}.")
        return [dict(r) for r in source]
    spec = str(source)
    if spec.startswith("hf:"):
        return _hub_rows(spec)
    p = Path(spec).expanduser()
    if not p.is_file():
        raise RefusalError(f"The data file '{spec}' does not exist.", "Check the path.")
    suffix = p.suffix.lower()
    if mode == "text" or (mode is None and suffix in TEXT_SUFFIXES):
        if suffix in PAIR_SUFFIXES:
            return _file_rows(p, spec)  # records with a text column
        return p.read_text("utf-8-sig")
    if suffix in PAIR_SUFFIXES:
        return _file_rows(p, spec)
    if suffix in TEXT_SUFFIXES:
        raise RefusalError(f"'{spec}' is a text file, which holds no instruction/response pairs.",
                           f"Use mode 'text' for it, or give a {' / '.join(PAIR_SUFFIXES)} file for mode '{mode}'.")
    raise RefusalError(f"Unsupported data file type '{suffix}' ({spec}).",
                       f"Use {' / '.join(TEXT_SUFFIXES)} for text or {' / '.join(PAIR_SUFFIXES)} for pairs "
                       "(or set the mode to 'text' to read any file as plain text).")


def find_column(rows: Sequence[Mapping], want: str, columns: Mapping[str, str] | None, where: str) -> str:
    """The source column holding ``want`` (``instruction``, ``response``, ``completion`` or ``text``)."""
    found: list[str] = []
    for r in rows[:100]:
        found += [k for k in r if k not in found]
    explicit = (columns or {}).get(want)
    if explicit is not None:
        if explicit in found:
            return explicit
        raise RefusalError(f"{where} has no column '{explicit}' (mapped to {want}); columns found: "
                           f"{', '.join(map(str, found)) or 'none'}.",
                           "Fix the column mapping.")
    lower = {str(k).strip().lower(): k for k in found}
    for cand in CANDIDATES[want]:
        if cand in lower:
            return lower[cand]
    raise RefusalError(f"{where} has no {want} column; columns found: {', '.join(map(str, found)) or 'none'}.",
                       f"Name one of them with a column mapping, e.g. columns={{'{want}': '<column>'}} (looked for "
                       f"{', '.join(CANDIDATES[want])}).")


def _describe(source: str | Path | Sequence[Mapping]) -> str:
    return "the records" if isinstance(source, (list, tuple)) else f"'{source}'"


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing


def _pad_id(tokenizer: Any) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return t
    return 0


def text_sequences(tokenizer: Any, text: str, *, seq_len: int = 512, max_tokens: int | None = None,
                   allow_fewer: bool = False, add_bos: bool = True, where: str = "the text") -> Sequences:
    """Cut ``text`` (its first ``max_tokens`` tokens) into sequences of ``seq_len`` tokens (BOS included)."""
    if seq_len < 2:
        raise RefusalError(f"seq_len is {seq_len}.", "Use a sequence length of at least 2 tokens.")
    if max_tokens is not None and max_tokens < 1:
        raise RefusalError(f"max_tokens is {max_tokens}.", "Ask for at least 1 token.")
    ids = _tokenize_prefix(tokenizer, text, max_tokens)
    if not ids:
        raise RefusalError(f"{where} holds no text.", "Point to a non-empty text.")
    if max_tokens is not None:
        if len(ids) < max_tokens and not allow_fewer:
            raise RefusalError(f"{where} has {len(ids)} tokens, fewer than the {max_tokens} asked for.",
                               f"Lower max_tokens to at most {len(ids)}, give a longer text, or allow fewer tokens.")
        ids = ids[:max_tokens]
    bos = tokenizer.bos_token_id if add_bos else None
    step = seq_len - 1 if bos is not None else seq_len
    seqs, scored = [], []
    for i in range(0, len(ids), step):
        chunk = ids[i:i + step]
        if bos is not None:
            seqs.append([bos] + chunk)
            scored.append([False] + [True] * len(chunk))
        elif len(chunk) >= 2:
            seqs.append(chunk)
            scored.append([False] + [True] * (len(chunk) - 1))
    if not seqs:
        raise RefusalError(f"{where} has too few tokens ({len(ids)}) to predict any.", "Give a longer text.")
    return Sequences(seqs, scored, _pad_id(tokenizer))


def _tokenize_prefix(tokenizer: Any, text: str, max_tokens: int | None) -> list[int]:
    """Tokens of ``text``, or of a prefix long enough for ``max_tokens`` (a long corpus is not tokenized whole)."""
    if max_tokens is None:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    chars = max_tokens * 8 + 1024
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if chars >= len(text):
            return ids
        if len(ids) > max_tokens + 16:  # margin: tokens near the cut may merge differently in the whole text
            return ids[:max_tokens]
        chars *= 2


def pair_sequences(tokenizer: Any, records: Sequence[Mapping], *, field: str = "response", seq_len: int = 2048,
                   max_tokens: int | None = None, allow_fewer: bool = False, system: str | None = None,
                   columns: Mapping[str, str] | None = None, where: str = "the records") -> Sequences:
    """Chat-formatted instruction + ``field`` (the response or completion); only the latter's tokens are scored.

    A pair longer than ``seq_len`` keeps its first ``seq_len`` tokens; with ``max_tokens``, records are taken in
    order until that many response tokens are reached (the last one cut to fit).
    """
    from ..templates import format_prompts

    if not records:
        raise RefusalError(f"{where} holds no records.", "Give at least one instruction/response pair.")
    ins_col = find_column(records, "instruction", columns, where)
    out_col = find_column(records, field, columns, where)
    raw = [(r.get(ins_col), r.get(out_col)) for r in records]
    skipped = sum(not (isinstance(a, str) and a.strip() and isinstance(b, str) and b.strip()) for a, b in raw)
    pairs = [(a, b) for a, b in raw if isinstance(a, str) and a.strip() and isinstance(b, str) and b.strip()]
    if not pairs:
        raise RefusalError(f"{where} has no record with both a non-empty '{ins_col}' and '{out_col}'.",
                           "Check the columns (or the column mapping).")
    prompts = format_prompts(tokenizer, [a for a, _ in pairs], system)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([b for _, b in pairs], add_special_tokens=False)["input_ids"]
    seqs, scored, total = [], [], 0
    for p, r in zip(p_ids, r_ids):
        if max_tokens is not None and total >= max_tokens:
            break
        r = r[: max(0, seq_len - len(p))]
        if max_tokens is not None:
            r = r[: max_tokens - total]
        if not r:
            skipped += 1
            continue
        seqs.append(p + r)
        scored.append([False] * len(p) + [True] * len(r))
        total += len(r)
    if not seqs:
        raise RefusalError(f"{where}: no response token fits in seq_len={seq_len} after the prompt.",
                           "Raise seq_len.")
    if max_tokens is not None and total < max_tokens and not allow_fewer:
        raise RefusalError(f"{where} has {total} response tokens, fewer than the {max_tokens} asked for.",
                           f"Lower max_tokens to at most {total}, give more records, or allow fewer tokens.")
    return Sequences(seqs, scored, _pad_id(tokenizer), skipped)


def prepare(tokenizer: Any, source: str | Path | Sequence[Mapping], *, mode: str | None = None, seq_len: int = 512,
            max_tokens: int | None = None, allow_fewer: bool = False, columns: Mapping[str, str] | None = None,
            system: str | None = None, add_bos: bool = True) -> Sequences:
    """Read and tokenize a source (see the module docs). ``mode`` ``None``: ``text`` for a text file or a plain
    string source, else ``response`` if the records have a response column, else ``completion``."""
    if mode is not None and mode not in MODES:
        raise RefusalError(f"Unknown cross-entropy mode '{mode}'.", f"Use one of: {', '.join(MODES)}.")
    where = _describe(source)
    data = load_source(source, mode)
    if isinstance(data, str):
        if mode not in (None, "text"):
            raise RefusalError(f"{where} is plain text, which has no instruction/response pairs.",
                               f"Use mode 'text', or a {' / '.join(PAIR_SUFFIXES)} source for mode '{mode}'.")
        return text_sequences(tokenizer, data, seq_len=seq_len, max_tokens=max_tokens, allow_fewer=allow_fewer,
                              add_bos=add_bos, where=where)
    if mode is None:
        mode = _infer_mode(data, columns)
    if mode == "text":
        if not data:
            raise RefusalError(f"{where} holds no records.", "Give a source with text.")
        col = find_column(data, "text", columns, where)
        text = "\n\n".join(str(r[col]) for r in data if isinstance(r.get(col), str) and r[col].strip())
        return text_sequences(tokenizer, text, seq_len=seq_len, max_tokens=max_tokens, allow_fewer=allow_fewer,
                              add_bos=add_bos, where=where)
    return pair_sequences(tokenizer, data, field=mode, seq_len=seq_len, max_tokens=max_tokens,
                          allow_fewer=allow_fewer, system=system, columns=columns, where=where)


def _infer_mode(rows: list[dict], columns: Mapping[str, str] | None) -> str:
    for mode in ("response", "completion"):
        try:
            find_column(rows, mode, columns, "")
            return mode
        except RefusalError:
            pass
    try:
        find_column(rows, "instruction", columns, "")
    except RefusalError:
        if rows:
            try:
                find_column(rows, "text", columns, "")
                return "text"
            except RefusalError:
                pass
    return "response"  # let pair_sequences name the missing column


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def evaluate(model: Any, sequences: Sequences, *, batch_size: int = 8, description: str = "Cross-entropy") -> dict:
    """``{"loss", "perplexity", "tokens", "sequences"}``: mean nats per scored token, ``exp(loss)``, counts.

    Runs plain forwards (batched, right-padded; longest first, halving the batch on out-of-memory), so any
    intervention entered around the call applies.
    """
    import torch
    import torch.nn.functional as F

    from ..batching import in_batches
    from ..models.parts import model_device

    if batch_size < 1:
        raise RefusalError(f"batch_size is {batch_size}.", "Use a batch size of at least 1.")
    dev = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences.ids[i]))
    totals = {"nll": 0.0, "tokens": 0}

    @torch.no_grad()
    def run(chunk: Sequence[int]) -> None:
        width = max(len(sequences.ids[i]) for i in chunk)
        ids = torch.full((len(chunk), width), sequences.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, i in enumerate(chunk):
            n = len(sequences.ids[i])
            ids[row, :n] = torch.tensor(sequences.ids[i])
            mask[row, :n] = 1
            scored[row, :n] = torch.tensor(sequences.scored[i])
        ids, mask, scored = ids.to(dev), mask.to(dev), scored.to(dev)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        sel = scored[:, 1:]
        rows = logits[:, :-1][sel]  # (n, vocab): the positions that predict a scored token
        targets = ids[:, 1:][sel]
        nll = 0.0
        for s in range(0, len(rows), 4096):  # float32 log-softmax a slice at a time
            nll += F.cross_entropy(rows[s:s + 4096].float(), targets[s:s + 4096], reduction="sum").item()
        totals["nll"] += nll
        totals["tokens"] += int(sel.sum())

    in_batches(run, order, batch_size, description)
    tokens = totals["tokens"]
    loss = totals["nll"] / tokens if tokens else float("nan")
    out = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": tokens,
           "sequences": len(sequences)}
    if sequences.skipped:
        out["skipped"] = sequences.skipped
    return out


def cross_entropy(model: Any, tokenizer: Any, source: str | Path | Sequence[Mapping], *, mode: str | None = None,
                  seq_len: int = 512, max_tokens: int | None = None, batch_size: int = 8, allow_fewer: bool = False,
                  columns: Mapping[str, str] | None = None, system: str | None = None, add_bos: bool = True) -> dict:
    """:func:`prepare` then :func:`evaluate`: ``{"loss", "perplexity", "tokens", "sequences"}``."""
    seqs = prepare(tokenizer, source, mode=mode, seq_len=seq_len, max_tokens=max_tokens, allow_fewer=allow_fewer,
                   columns=columns, system=system, add_bos=add_bos)
    return evaluate(model, seqs, batch_size=batch_size)
