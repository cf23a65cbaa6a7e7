"""Constrained decoding with xgrammar: a request's `Constraint` compiled once per tokenizer, and
one matcher per sample that masks its row's logits before sampling.

Each sample (batch row) has its own `GrammarMatcher`: before sampling, the tokens its grammar
(`serving.engines.common.grammar`) does not allow next are set to -inf in that row only; the
chosen token then advances the matcher. Once the grammar is complete only end-of-sequence is
allowed, so the row ends as any row does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
import xgrammar as xgr

from ensemble.errors import RequestRejected
from ensemble.structured import Constraint
from serving.engines.common.grammar import grammar_of


class Grammars:
    """The compiled grammars of one tokenizer, the most recent `size` kept (compiling a schema
    takes milliseconds to seconds; a tool loop asks for the same one again and again)."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int], size: int = 64
    ) -> None:
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids)
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        """Thread-safe; runs off the event loop and off the engine's worker."""
        with self._lock:
            if constraint.key in self._cache:
                self._cache.move_to_end(constraint.key)
                return self._cache[constraint.key]
        try:
            compiled = self._compiler.compile_grammar(grammar_of(constraint))
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's errors for a bad schema
            param = "tools" if constraint.kind == "tool_call" else "response_format"
            raise RequestRejected(f"the JSON schema cannot be used: {exc}", param=param) from None
        with self._lock:
            self._cache[constraint.key] = compiled
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return compiled


class RowMasks:
    """One request's matchers, one per sample: mask the live rows' logits, then advance."""

    def __init__(self, compiled: xgr.CompiledGrammar, samples: int, vocab_size: int) -> None:
        self.matchers = [xgr.GrammarMatcher(compiled) for _ in range(samples)]
        self.vocab_size = vocab_size

    def mask(self, logits: torch.Tensor, samples: list[int]) -> torch.Tensor:
        """`logits` (one row per live sample in `samples`) with disallowed tokens at -inf, as
        a new float32 tensor (the model's own logits stay for logprobs)."""
        masked = logits.float().clone()
        bitmask = xgr.allocate_token_bitmask(len(samples), self.vocab_size)
        for row, index in enumerate(samples):
            self.matchers[index].fill_next_token_bitmask(bitmask, row)
        width = masked.shape[-1]
        if width > self.vocab_size:  # the model's logits may be wider than the tokenizer
            masked[:, self.vocab_size :] = float("-inf")
            xgr.apply_token_bitmask_inplace(masked[:, : self.vocab_size], bitmask)
        else:
            xgr.apply_token_bitmask_inplace(masked, bitmask)
        return masked

    def accept(self, index: int, token: int) -> None:
        self.matchers[index].accept_token(token)
