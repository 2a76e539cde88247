"""Chat templates: `tokenizer.chat_template` rendered in a Jinja sandbox, or a built-in fallback.

A template comes from a downloaded file, so it is untrusted code: it runs in jinja2's
ImmutableSandboxedEnvironment, and any reach for Python internals is an error, not empty text.
The sandbox stops escapes, not work, so rendering is also bounded (see `bounded.py`): time,
output size, and the size of every string or list the template builds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from llmx.errors import ChatTemplateError
from llmx.formats.bounded import bounded_environment, render_bounded

CHAT_TEMPLATE_KEY = "tokenizer.chat_template"

# Built-in templates for files that carry none (written for llmx; the formats are the models').
GEMMA_TEMPLATE = """{{ bos_token }}
{%- set first_prefix = '' -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set first_prefix = messages[0]['content'] | trim + '\\n\\n' -%}
  {%- set messages = messages[1:] -%}
{%- endif -%}
{%- for message in messages -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception('conversation roles must alternate user/assistant/user/...') }}
  {%- endif -%}
  {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
  {{ '<start_of_turn>' + role + '\\n' + (first_prefix if loop.first else '') }}
  {{- message['content'] | trim }}{{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}
"""

LLAMA3_TEMPLATE = """{{ bos_token }}
{%- for message in messages -%}
  {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
  {{- message['content'] | trim }}{{ '<|eot_id|>' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}
"""

CHATML_TEMPLATE = """{%- for message in messages -%}
  {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}
"""

BUILTIN_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE}


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    origin: str  # "file", or "built-in (<name>)"
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt text for `messages` (OpenAI-style dicts with `role` and `content`)."""
        from jinja2 import TemplateError
        from jinja2.sandbox import SecurityError

        try:
            return render_bounded(self._compiled, self.origin, dict(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            ))
        except SecurityError as e:
            raise ChatTemplateError(
                f"the chat template ({self.origin}) tried something the sandbox forbids ({e}); "
                "refusing to run it: use a model file from a source you trust"
            ) from e
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template ({self.origin}) failed to render: {e}") from e

    @cached_property
    def _compiled(self):
        from jinja2 import TemplateError

        env = bounded_environment()
        env.globals["raise_exception"] = _raise_from_template
        env.globals["strftime_now"] = _strftime_now
        try:
            return env.from_string(self.source)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template ({self.origin}) does not parse: {e}") from e


def _raise_from_template(message: str) -> None:
    raise ChatTemplateError(f"the chat template rejected the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def builtin_template_name(architecture: str, tokens: Sequence[str]) -> str:
    """Which built-in template fits a model that ships none: by architecture, then by vocabulary."""
    if architecture.startswith("gemma"):
        return "gemma"
    if "<|start_header_id|>" in tokens:
        return "llama3"
    return "chatml"


def chat_template_for(metadata: Mapping[str, Any], architecture: str, tokens: Sequence[str],
                      bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """The file's own template when it has one, else the built-in one for its family."""
    source = metadata.get(CHAT_TEMPLATE_KEY)
    if isinstance(source, str) and source.strip():
        return ChatTemplate(source, "file", bos_token, eos_token)
    name = builtin_template_name(architecture, tokens)
    return ChatTemplate(BUILTIN_TEMPLATES[name], f"built-in ({name})", bos_token, eos_token)
