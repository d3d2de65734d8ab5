"""Chat templates: a model's own Jinja template turns a conversation into the text it was trained on.

A template is part of the model (HF `tokenizer_config.json`'s "chat_template", `chat_template.jinja`,
GGUF's `tokenizer.chat_template`) and is untrusted code from the internet. It is rendered as
transformers renders it, so that a prompt here is the prompt there, character for character:
    environment   jinja2's ImmutableSandboxedEnvironment (no attribute starting with '_', no mutating
                  the caller's lists and dicts), trim_blocks and lstrip_blocks, the loopcontrols
                  extension, and {% generation %} blocks (kept as they are)
    globals       raise_exception(message) (a template's own error), strftime_now(format), dict(...),
                  namespace(...) refusing '_'-names
    filter        tojson, without HTML escaping and with non-ASCII kept (json.dumps(ensure_ascii=False))
    variables     messages, add_generation_prompt, the special tokens' texts (bos_token, eos_token, ...)
                  and whatever else the caller passes (tools, documents, date_string, ...)
A template that fails, or touches what the sandbox forbids, gives a ChatTemplateError: one line.
"""
import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from ..errors import UserError


class ChatTemplateError(UserError):
    """A chat template that cannot be rendered, or a conversation it cannot take."""


def render(template, messages, add_generation_prompt=True, **variables):
    """The conversation as the template writes it. messages: [{"role": ..., "content": ...}, ...]."""
    _check_messages(messages)
    compiled = _compiled(template)
    try:
        return compiled.render(messages=[dict(message) for message in messages],
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as error:  # raise_exception, syntax, sandbox (SecurityError), undefined
        raise ChatTemplateError(f"the chat template failed: {_first_line(error)}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as error:
        raise ChatTemplateError(f"the chat template failed: {type(error).__name__}: {_first_line(error)}") \
            from None


def _check_messages(messages):
    for message in messages:  # (content may be absent: an assistant's tool_calls, for one)
        if not isinstance(message, dict) or "role" not in message:
            raise ChatTemplateError(f"a chat message is a dict with a 'role' (and its 'content'), got {message!r}")


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@functools.lru_cache(maxsize=8)
def _compiled(template):
    try:
        return _ENVIRONMENT.from_string(template)
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {_first_line(error)}") from None


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


class _Dict:
    """dict(...) and dict.fromkeys(...) for templates, without handing them the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace(), refusing '_'-names: a namespace's attributes must not reach Python's own."""

    def __init__(*args, **kwargs):  # jinja2's signature trick: `self` may be a keyword of the template's
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")


class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: marks the assistant's part for training masks
    (transformers' assistant-token tracking); rendering keeps the body as it is."""
    tags = {"generation"}

    def parse(self, parser):
        line = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(line)

    def _body(self, caller):
        return caller()


def _environment():
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                               extensions=[_Generation, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                               dict=_Dict(), namespace=_Namespace)
    return environment


_ENVIRONMENT = _environment()
