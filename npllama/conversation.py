"""Chat: a conversation with a model, rendered by its own chat template, kept in one KV cache.

Each turn the whole conversation is rendered again (the template alone knows its layout) and its ids
compared with the ids whose keys and values the cache already holds: only the ids after the common
prefix are run. A template that renders a conversation as the prefix of its continuation (all the
usual ones) so costs one prefill of the new turn; one that does not is still exact, only slower. The
reply is sampled until one of the model's end-of-turn ids (tokenizer.eos_ids), the reply's token
limit, or the end of the cache.

A full cache ends the conversation (/reset starts a new one) rather than sliding a window over it as
generate does: a window of the latest tokens would cut the system message and a turn's markup in the
middle, and the next turn, rendered whole by the template, would no longer share its ids with the cache.
"""
import time

from . import generation
from .generation import GenerationError, GenerationStats
from .io.tokenizer import check_text
from .sampling import DEFAULTS, Sampler

DEFAULT_CONTEXT = 4096  # the cache's positions when the model's context is longer (Llama 3.2: 131,072)


class ChatError(GenerationError):
    """A conversation that cannot go on (no template, a full context)."""


class ChatSession:
    """A multi-turn conversation. reply(text) streams the model's answer and records it."""

    def __init__(self, params, config, tokenizer, system=None, context=None, temperature=0.0,
                 top_k=DEFAULTS["top_k"], top_p=DEFAULTS["top_p"], seed=None, dtype=None, min_p=DEFAULTS["min_p"],
                 repeat_penalty=DEFAULTS["repeat_penalty"], repeat_last_n=DEFAULTS["repeat_last_n"]):
        if tokenizer is None or tokenizer.chat_template is None:
            raise ChatError("this model has no chat template: it is a base model (use generate), or give a "
                            "tokenizer that has one")
        self.tokenizer = tokenizer
        self.context = min(context or DEFAULT_CONTEXT, config.max_position_embeddings)
        self.sampler = Sampler(temperature, top_k, top_p, seed, tokenizer.vocab_size, min_p, repeat_penalty,
                               repeat_last_n)
        self.decoder = generation.Decoder(params, config, self.context, dtype)
        self.system = system
        self.reset()

    def reset(self):
        """Start the conversation again (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cached = []  # the ids whose keys and values the cache holds, in order

    def reply(self, text, max_new_tokens=512):
        """(pieces, stats): an iterator over the reply's text as it is produced, and its GenerationStats.
        The user's message and the reply (as far as it got, should the caller stop early) are added
        to the conversation when the iterator ends; stopped before the prompt was run, neither is."""
        check_text(text)  # (here, where an offset is one into the message)
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if len(ids) > self.context:
            fresh = len(self.tokenizer.apply_chat_template(messages[-1:] if not self.system else
                                                           [self.messages[0], messages[-1]]))
            if fresh > self.context:
                raise ChatError(f"the message makes a prompt of {fresh} tokens, more than the context of "
                                f"{self.context} tokens (--context)")
            raise ChatError(f"the conversation ({len(ids)} tokens) no longer fits the context of "
                            f"{self.context} tokens: /reset to start a new one")
        stats = GenerationStats(prompt_tokens=len(ids))
        return self._pieces(messages, ids, max_new_tokens, stats), stats

    def _pieces(self, messages, ids, max_new_tokens, stats):
        reply, text = [], self.tokenizer.stream_decoder()
        started = time.perf_counter()
        logits, stats.cached_tokens = self._prefill(ids)  # stopped here, the turn is not had at all
        stats.prefill_seconds = time.perf_counter() - started
        try:
            started = time.perf_counter()
            while stats.new_tokens < max_new_tokens:
                token = self.sampler(logits, self.cached)  # the conversation so far: the repeat penalty's
                stats.new_tokens += 1
                if token in self.tokenizer.eos_ids:
                    stats.stop_reason = "eos"
                    break
                reply.append(token)
                yield text.push(token)
                if self.decoder.cache.length == self.context:
                    stats.stop_reason = "context"
                    break
                logits = self._advance([token])
                stats.decode_seconds = time.perf_counter() - started
            else:
                stats.stop_reason = "length"
            yield text.flush()
        finally:  # also when the caller stops early (Ctrl-C): what was said so far is the reply
            self.messages = messages + [{"role": "assistant", "content": self.tokenizer.decode(reply)}]

    def _prefill(self, ids):
        """Run the ids after those the cache shares with them (at least the last, for its logits).
        Returns the last one's logits and how many ids the cache already held."""
        shared = 0
        while shared < min(len(ids) - 1, len(self.cached)) and ids[shared] == self.cached[shared]:
            shared += 1
        self.decoder.rewind(shared)
        self.cached = self.cached[:shared]
        return self._advance(ids[shared:]), shared

    def _advance(self, ids):
        logits = self.decoder.advance(ids)
        self.cached += ids  # only once the cache holds them (an interrupted step adds nothing)
        return logits


def chat(params, config, tokenizer, messages, max_new_tokens=512, **settings):
    """The model's reply (text) to a conversation [{"role", "content"}, ...] ending with the user's turn.
    settings: ChatSession's (temperature, top_k, top_p, seed, dtype, min_p, repeat_penalty, repeat_last_n)."""
    if not messages or messages[-1].get("role") != "user":
        raise ChatError("a conversation to reply to ends with a message whose role is 'user'")
    session = ChatSession(params, config, tokenizer, **settings)
    session.messages = list(messages[:-1])
    pieces, _ = session.reply(messages[-1]["content"], max_new_tokens)
    return "".join(pieces)
