"""The sampler: the next token from the logits, kept apart from the model (as llama2.c's run.c does).

The steps, in llama.cpp's order (common/common.h: penalties, top-k, top-p, min-p, temperature), on the
logits l (one per token id; ids from vocab_limit on are dropped first). R is the set of ids among the
last repeat_last_n tokens (the prompt's count, as llama.cpp's main feeds them to its sampler), K the
set of ids still kept:

    repeat penalty ρ   l_i = l_i / ρ if l_i > 0 else l_i · ρ          for i in R (once, however often)
    temperature 0      token = argmax_i l_i                               greedy: only the penalty acts
    top-k k            K = {i : l_i >= the k-th largest l}                (ties with the k-th stay)
    top-p π            q = softmax(l over K); keep the most likely ids until their q first sums to >= π
    min-p m            K = {i in K : l_i >= max_K l + log m}              i.e. q_i >= m · max q
    temperature τ > 0  p_i = exp(l_i / τ) / Σ_{j in K} exp(l_j / τ) on K, 0 elsewhere; token ~ p

top-p and min-p act on the probabilities at temperature 1, before the temperature (llama.cpp; HF
transformers divides by the temperature first). A setting of None, top-k 0, top-p 1, min-p 0 or a
repeat penalty of 1 turns its step off. The draw is from a seeded NumPy generator: the same seed and
logits give the same tokens.
"""
import secrets

import numpy as np

from . import backend
from .errors import UserError
from .ops.cross_entropy import softmax

# llama.cpp's defaults (common_params_sampling in common/common.h): the command line's, and the library's
# when it samples. The library's temperature is 0 (greedy, exact and repeatable, as transformers'
# generate); the command line's is llama.cpp's 0.8.
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0,
            "repeat_last_n": 64}
# The settings that only choose among the kept tokens by chance: greedy decoding (argmax) ignores them.
# The repeat penalty changes the logits themselves, so it acts at temperature 0 too (as in llama.cpp).
GREEDY_IGNORES = ("top_k", "top_p", "min_p", "seed")


class GenerationError(UserError):
    """Arguments generation cannot run with: sampling settings here, the rest in generation.py."""


def random_seed():
    """A seed for a run that was given none (printed, so that the run can be repeated)."""
    return secrets.randbelow(2 ** 32)


class Sampler:
    """Picks the next token from logits (module docstring): argmax when temperature == 0, else a seeded
    draw. The seed, when None, is chosen at random and kept in .seed. Every step is off by default."""

    def __init__(self, temperature=0.0, top_k=None, top_p=None, seed=None, vocab_limit=None, min_p=None,
                 repeat_penalty=1.0, repeat_last_n=DEFAULTS["repeat_last_n"]):
        if not temperature >= 0:
            raise GenerationError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 0):
            raise GenerationError(f"top-k must be a non-negative integer (0: off), got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise GenerationError(f"top-p must lie in (0, 1], got {top_p}")
        if min_p is not None and not 0 <= min_p <= 1:
            raise GenerationError(f"min-p must lie in [0, 1], got {min_p}")
        if not 0 < repeat_penalty < np.inf:
            raise GenerationError(f"the repeat penalty must be a positive number (1: off), got {repeat_penalty}")
        if not isinstance(repeat_last_n, (int, np.integer)) or repeat_last_n < 0:
            raise GenerationError(f"repeat-last-n must be a non-negative integer (0: off), got {repeat_last_n}")
        if seed is not None and seed < 0:
            raise GenerationError(f"the seed must not be negative, got {seed}")
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.repeat_penalty, self.repeat_last_n = repeat_penalty, repeat_last_n
        self.vocab_limit = vocab_limit  # ids from here on are never picked (rows past the tokenizer's)
        self.seed = random_seed() if seed is None else int(seed)
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits, previous=()):
        """The token that follows `previous` (the ids so far, prompt included: the repeat penalty's)."""
        logits = self._prepared(logits, previous)
        if self.temperature == 0:
            return int(np.argmax(logits))
        ids, probs = self._kept(logits)
        # side="right": a draw of exactly 0 cannot pick an id whose probability underflowed to 0
        return int(ids[min(np.searchsorted(np.cumsum(probs), self.rng.random(), side="right"), ids.size - 1)])

    def penalised(self, logits, previous):
        """The logits (changed in place) with the repeat penalty on the ids among the last repeat_last_n
        of previous."""
        if self.repeat_penalty == 1 or self.repeat_last_n == 0 or len(previous) == 0:
            return logits
        recent = np.unique(np.asarray(previous[-self.repeat_last_n:]))
        recent = recent[recent < logits.size]
        chosen = logits[recent]
        logits[recent] = np.where(chosen > 0, chosen / self.repeat_penalty, chosen * self.repeat_penalty)
        return logits

    def _prepared(self, logits, previous):
        """float64 host logits, cut to vocab_limit, with the repeat penalty."""
        return self.penalised(np.array(backend.to_host(logits), dtype=np.float64)[:self.vocab_limit], previous)

    def probabilities(self, logits, previous=()):
        """p (module docstring) over the ids below vocab_limit: 0 for those cut. Temperature must be > 0."""
        logits = self._prepared(logits, previous)
        ids, kept = self._kept(logits)
        probs = np.zeros(len(logits))
        probs[ids] = kept
        return probs

    def _kept(self, z):
        """The ids top-k, top-p and min-p keep (ascending) and their p. After top-k only its few dozen
        ids are worked on, not the vocabulary."""
        ids = np.arange(z.size)
        if self.top_k and self.top_k < z.size:
            ids = np.flatnonzero(z >= np.partition(z, -self.top_k)[-self.top_k])
        z = z[ids]
        if self.top_p is not None and self.top_p < 1:
            kept = _nucleus(softmax(z.copy()), self.top_p)
            ids, z = ids[kept], z[kept]
        if self.min_p:
            kept = z >= z.max() + np.log(self.min_p)
            ids, z = ids[kept], z[kept]
        return ids, softmax(z / self.temperature)


def _nucleus(probs, mass):
    """The most likely, in order, up to the first whose running sum reaches mass (that one too)."""
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    kept = np.zeros(probs.size, dtype=bool)
    kept[order[mass_before < mass]] = True  # the most likely always stays
    return kept
