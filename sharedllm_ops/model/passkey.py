"""Passkey retrieval, the second half of ``sharedllm-ops eval-long``: can the model read back a
5-digit key hidden far back in its context? (The test of Mohtashami and Jaggi, arXiv 2305.16300.)

A prompt of exactly ``length`` tokens is, in order::

    INTRO | filler | KEY_SENTENCE (the key, twice) | filler | QUESTION

and the first number in the model's greedy continuation must be the key. The decoder window is the prompt's
last ``window`` tokens, so the question ends it; the **context** is everything before the window,
``length - window`` tokens. ``depth`` places the key sentence inside the context's filler: its
first token is at ``len(INTRO) + round(depth * (context - len(INTRO) - len(KEY_SENTENCE)))``, so
depth 0 puts it right after the introduction and depth 1 ends it on the context's last token: the
key is always in the context, never in the window, and the window alone can only guess.

A length too short to hold the introduction and the key sentence before a window is skipped for that
window (its cells stay empty), so that ``--window 512 4096`` can share ``--lengths 4096 ...``.

Methods: full attention (the whole prompt, where it fits the base model's positions), the window
alone, and each SharedLLM config (the context compressed, the whole window as retrieval query).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

import torch

from .long_context import max_positions, wrapped

__all__ = ["ANSWER_TOKENS", "PasskeyItem", "PasskeyPrompt", "PasskeyResult", "PromptTooShort", "build_passkey_prompt",
           "passkey_grid", "passkey_items", "passkey_key", "passkey_steps", "score_passkey"]

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER_TOKENS = 8  # greedy tokens generated: a space and 5 digits, with room for a stray token
FULL_ATTENTION = "full attention"


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_key(seed: int, length: int, depth: float, index: int) -> str:
    """The 5-digit key of one prompt: a function of the seed and the prompt's place in the grid only,
    so a smaller grid asks the same keys."""
    return str(random.Random(f"{seed}/{length}/{depth}/{index}").randint(10000, 99999))


@dataclass
class PasskeyPrompt:
    """A prompt of :func:`build_passkey_prompt` and where its parts are."""

    ids: torch.Tensor  # int64 [length]
    key: str
    key_start: int  # index of the key sentence's first token
    key_tokens: int  # tokens of the key sentence
    context_tokens: int  # length - window: the tokens before the decoder window

    @property
    def context(self) -> torch.Tensor:
        return self.ids[:self.context_tokens]

    @property
    def window(self) -> torch.Tensor:
        return self.ids[self.context_tokens:]


def _filler(unit: list[int], n: int) -> list[int]:
    """``n`` tokens of the filler, repeated from the start of a sentence."""
    return (unit * (n // len(unit) + 1))[:n]


class PromptTooShort(ValueError):
    """The prompt length leaves the context before the window no room for the introduction and the key."""


def build_passkey_prompt(tokenizer, length: int, window: int, depth: float, key: str) -> PasskeyPrompt:
    """The prompt of the module docstring: ``length`` tokens, the key at ``depth`` of the context
    (the ``length - window`` tokens before the decoder window)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"--depths must lie in [0, 1], got {depth}")
    if not re.fullmatch(r"\d{5}", key):
        raise ValueError(f"the pass key must be 5 digits, got {key!r}")
    intro, unit = _ids(tokenizer, INTRO), _ids(tokenizer, FILLER)
    sentence, question = _ids(tokenizer, KEY_SENTENCE.format(key=key)), _ids(tokenizer, QUESTION)
    if window <= len(question):
        raise ValueError(f"--window {window} cannot hold the question ({len(question)} tokens)")
    context = length - window
    room = context - len(intro) - len(sentence)  # filler tokens of the context
    if room < 0:
        raise PromptTooShort(f"--lengths {length} is too short for --window {window}: the context before the window "
                         f"({context} tokens) must hold the introduction and the key sentence "
                         f"({len(intro) + len(sentence)} tokens); use lengths >= {window + len(intro) + len(sentence)}")
    before = round(depth * room)
    after = length - len(intro) - before - len(sentence) - len(question)
    ids = intro + _filler(unit, before) + sentence + _filler(unit, after) + question
    return PasskeyPrompt(torch.tensor(ids, dtype=torch.long), key, len(intro) + before, len(sentence), context)


def score_passkey(continuation: str, key: str) -> bool:
    """True when the first run of digits in ``continuation`` is exactly ``key``: no digit missing,
    none added, none split off by other text."""
    digits = re.search(r"\d+", continuation)
    return digits is not None and digits.group(0) == key


@dataclass
class PasskeyResult:
    """One prompt answered by one method; ``answer`` and ``correct`` are None where the method does not
    apply: full attention past the base model's positions, or a length too short for this window."""

    method: str
    window: int
    length: int
    depth: float
    key: str | None
    answer: str | None
    correct: bool | None
    seconds: float = 0.0


@dataclass
class PasskeyItem:
    """One cell of the grid: its prompt, or None where ``length`` cannot hold a context for ``window``."""

    window: int
    length: int
    depth: float
    prompt: PasskeyPrompt | None


def passkey_items(tokenizer, windows, lengths, depths, keys: int = 1, seed: int = 0) -> list[PasskeyItem]:
    """Every (window, length, depth, key) prompt. A length too short for a larger window is skipped
    there (its cells stay empty); one too short for every window is an error, as is a bad depth, a
    window that cannot hold the question or fewer than one key."""
    if isinstance(keys, bool) or not isinstance(keys, int) or keys < 1:
        raise ValueError(f"--keys must be a positive integer, got {keys!r}")
    items, too_short = [], {}
    for w in windows:
        for n in lengths:
            for d in depths:
                for i in range(keys):
                    try:
                        prompt = build_passkey_prompt(tokenizer, n, w, d, passkey_key(seed, n, d, i))
                    except PromptTooShort as e:
                        too_short.setdefault(n, {})[w] = str(e)
                        prompt = None
                    items.append(PasskeyItem(w, n, d, prompt))
    for n, reasons in too_short.items():
        if len(reasons) == len(set(windows)):
            raise PromptTooShort(reasons[min(windows)])
    return items


def passkey_steps(items: list[PasskeyItem], num_configs: int, positions: int | None) -> int:
    """How many times :func:`passkey_grid` calls ``progress``: one per answer computed."""
    return sum(1 + num_configs + (positions is None or it.length <= positions) for it in items if it.prompt)


@torch.no_grad()
def _answer(generate, ids: torch.Tensor, tokenizer, device, **kwargs) -> str:
    """The greedy continuation of ``ids [L]``, decoded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = generate(ids.to(device)[None], max_new_tokens=ANSWER_TOKENS, do_sample=False, pad_token_id=pad, **kwargs)
    return tokenizer.decode(out[0, ids.numel():], skip_special_tokens=True)


def passkey_grid(base, tokenizer, configs: dict, items: list[PasskeyItem], progress=None) -> list[PasskeyResult]:
    """Every prompt of ``items`` (:func:`passkey_items`) answered by full attention (where it fits the
    base model), the window alone and each SharedLLM config (row name -> SharedLLMConfig or injector
    folder). ``progress(label)`` is called before each answer."""
    progress = progress or (lambda label: None)
    positions = max_positions(base)
    device = next(base.parameters()).device
    methods = lambda w: [FULL_ATTENTION, f"window {w} alone", *configs]  # noqa: E731
    results = [PasskeyResult(m, it.window, it.length, it.depth, None, None, None)
               for it in items if it.prompt is None for m in methods(it.window)]
    asked = [it for it in items if it.prompt is not None]

    def answer(method, item, run):
        progress(f"W={item.window} {item.length} tokens depth {item.depth} {method}")
        start = time.perf_counter()
        text = run()
        key = item.prompt.key
        results.append(PasskeyResult(method, item.window, item.length, item.depth, key, text,
                                     score_passkey(text, key), time.perf_counter() - start))

    for it in asked:
        if positions is None or it.length <= positions:
            answer(FULL_ATTENTION, it, lambda: _answer(base.generate, it.prompt.ids, tokenizer, device))
        else:
            results.append(PasskeyResult(FULL_ATTENTION, it.window, it.length, it.depth, it.prompt.key, None, None))
        answer(f"window {it.window} alone", it, lambda: _answer(base.generate, it.prompt.window, tokenizer, device))
    for name, config in configs.items():
        with wrapped(base, config) as model:
            for it in asked:

                def compressed_answer():
                    # the whole window is the retrieval query: no token of it is scored
                    ctx = model.compress_context(it.prompt.context.to(device)[None], None,
                                                 query_input_ids=it.prompt.window.to(device)[None])
                    return _answer(model.generate, it.prompt.window, tokenizer, device, compressed_context=ctx)

                answer(name, it, compressed_answer)
    return results
