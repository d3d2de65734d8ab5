"""The sampler: the next token from the logits, kept apart from the model (as llama2.c's run.c does).

    temperature 0      token = argmax(logits)                                 greedy
    temperature τ > 0  p = softmax(logits / τ), cut to the top-k tokens and then to the smallest set
                       whose probability reaches top-p (renormalised); token ~ p, from a seeded generator
"""
import numpy as np

from . import backend
from .errors import UserError
from .ops.cross_entropy import softmax


class GenerationError(UserError):
    """Arguments generation cannot run with: sampling settings here, the rest in generation.py."""


class Sampler:
    """Picks the next token from logits: argmax when temperature == 0, else a seeded draw."""

    def __init__(self, temperature=0.0, top_k=None, top_p=None, seed=None, vocab_limit=None):
        if not temperature >= 0:
            raise GenerationError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise GenerationError(f"top-k must be a positive integer, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise GenerationError(f"top-p must lie in (0, 1], got {top_p}")
        if seed is not None and seed < 0:
            raise GenerationError(f"the seed must not be negative, got {seed}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.vocab_limit = vocab_limit  # ids from here on are never picked (rows past the tokenizer's)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits):
        logits = np.asarray(backend.to_host(logits), dtype=np.float64)[:self.vocab_limit]
        if self.temperature == 0:
            return int(np.argmax(logits))
        probs = self.probabilities(logits)
        return int(min(np.searchsorted(np.cumsum(probs), self.rng.random()), probs.size - 1))

    def probabilities(self, logits):
        """p = softmax(logits / temperature) over the kept tokens (top-k, then top-p), 0 elsewhere."""
        z = logits / self.temperature
        if self.top_k is not None and self.top_k < z.size:
            z[z < np.partition(z, -self.top_k)[-self.top_k]] = -np.inf
        probs = softmax(z)
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            mass_before = np.cumsum(probs[order]) - probs[order]
            probs[order[mass_before >= self.top_p]] = 0  # the most likely token always stays
            probs /= probs.sum()
        return probs
