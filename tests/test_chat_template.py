"""Chat templates: the sandbox, the built-in fallbacks, and gemma's format against llama.cpp's ids."""

from __future__ import annotations

import time

import pytest

from llmx.errors import ChatTemplateError
from llmx.formats.chat_template import ChatTemplate, chat_template_for
from llmx.formats.gguf_file import GGUFFile
from llmx.formats.tokenizer import Tokenizer

HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{% set x = messages.append(1) %}",  # immutable sandbox: no mutating the caller's data
])
def test_sandbox_refuses_python_internals(source):
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        ChatTemplate(source, "file").render(HI)


# A template is code from whoever made the file: rendering is bounded in time, output and size.
HOSTILE = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
    "loops over a string": "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "repetition": "{{ 'x' * 1000000000 }}",
    "list repetition": "{{ ([1] * 1000000000)|length }}",
    "doubling with ~": "{% set ns = namespace(s='xx') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "doubling with +": "{% set ns = namespace(s='xx') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "a huge filter argument": "{{ 'x'|center(1000000000) }}",
    "a huge method argument": "{{ 'x'.ljust(1000000000) }}",
    "a huge power": "{{ 10 ** 100000000 }}",
    "too much output": "{% for i in range(100000) %}{{ 'abcdefghijklmnopqrstuvwxyz' }}{% endfor %}",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_templates_end_in_one_error_within_about_a_second(name):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="refusing it") as error:
        ChatTemplate(HOSTILE[name], "file").render(HI)
    assert time.perf_counter() - start < 1.5
    assert "\n" not in str(error.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: no gigabyte strings


def test_bounds_leave_real_templates_alone():
    long_turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 2000} for i in range(50)]
    text = chat_template_for({}, "gemma3", []).render(long_turns)
    assert text.count("<start_of_turn>") == 51 and len(text) > 500_000


def test_raise_exception_and_syntax_errors():
    with pytest.raises(ChatTemplateError, match="no system"):
        ChatTemplate("{{ raise_exception('no system') }}", "file").render(HI)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}", "file").render(HI)


def test_strftime_now_and_tokens():
    source = "{{ bos_token }}{{ strftime_now('%Y') }}{{ eos_token }}"
    out = ChatTemplate(source, "file", "<s>", "</s>").render(HI)
    assert out.startswith("<s>20") and out.endswith("</s>")


def test_file_template_wins_over_builtin():
    template = chat_template_for({"tokenizer.chat_template": "{{ messages[0]['content'] }}!"}, "gemma3", [])
    assert template.origin == "file"
    assert template.render(HI) == "Hi!"


def test_gemma_builtin_format():
    template = chat_template_for({}, "gemma3", [], bos_token="<bos>")
    assert template.origin == "built-in (gemma)"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    assert template.render(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    with pytest.raises(ChatTemplateError, match="alternate"):
        template.render([{"role": "assistant", "content": "x"}])


def test_gemma_chat_tokenizes_like_llama_cpp(gemma_path, reference):
    gguf = GGUFFile.open(gemma_path)
    assert "tokenizer.chat_template" not in gguf.metadata  # the default file ships none
    tokenizer = Tokenizer.from_gguf(gguf)
    template = chat_template_for(gguf.metadata, gguf.architecture, tokenizer.vocab.tokens, "<bos>", "<eos>")
    prompt = template.render(HI, add_generation_prompt=True)
    expected = reference["gemma"]["tokenize"]["<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"]
    assert tokenizer.tokenize(prompt, add_bos=False, special=True) == expected["special"]


@pytest.mark.parametrize(("arch", "tokens", "name", "start"), [
    ("llama", ["<|start_header_id|>"], "llama3", "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"),
    ("qwen2", [], "chatml", "<|im_start|>user\nHi<|im_end|>\n"),
    ("llama", [], "chatml", "<|im_start|>user\nHi<|im_end|>\n"),
])
def test_other_builtins(arch, tokens, name, start):
    template = chat_template_for({}, arch, tokens)
    assert template.origin == f"built-in ({name})"
    assert template.render(HI).startswith(start)
    assert template.render(HI, add_generation_prompt=False) == start
