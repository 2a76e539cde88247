"""Structured output through llguidance: JSON schemas, JSON, GBNF, Lark and regexes constrain what
gemma writes; invalid ones are one clear error."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from conftest import run_llmx

import llmx
from llmx.engine.grammar import GrammarError, compile_format, tokenizer_view
from llmx.engine.model import Model

pytestmark = pytest.mark.slow

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
# Numbers carry a precision (multipleOf, a power of two so jsonschema checks it exactly): a plain "number"
# lets a base model at temperature 0.8 write digits until max_tokens, which no grammar forbids (the same
# holds with llama.cpp's grammars).
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": NAME, "country": NAME, "population": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 10**9}},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}},
     "required": ["score"], "additionalProperties": False},
    {"type": "object", "properties": {"author": {"type": "object", "properties": {"first": NAME, "last": NAME},
                                                 "required": ["first", "last"], "additionalProperties": False},
                                      "year": {"type": "integer", "minimum": 1900, "maximum": 2030}},
     "required": ["author", "year"], "additionalProperties": False},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"],
     "additionalProperties": False},
    {"type": "object", "properties": {"done": {"type": "boolean"}, "note": {"type": ["string", "null"],
                                                                             "maxLength": 30}},
     "required": ["done", "note"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999},
                                                       {"type": "string", "pattern": "^[A-Z]{3}$"}]}},
     "required": ["id"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 2, "maxItems": 5},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}},
     "required": ["points"], "additionalProperties": False},
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
     "required": ["email"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}, "label": {"const": "fixed"}},
     "required": ["level", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -40, "maximum": 50,
                                                      "multipleOf": 0.5},
                                      "unit": {"enum": ["C", "F"]}}, "required": ["temperature", "unit"],
     "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
     "required": ["date"], "additionalProperties": False},
    {"type": "object", "properties": {"pet": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 1,
                                                                             "maximum": 9}},
         "required": ["kind", "lives"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
         "required": ["kind", "good"], "additionalProperties": False}]}}, "required": ["pet"],
     "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"name": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                                         "price": {"type": "number", "minimum": 0, "maximum": 1000,
                                                   "multipleOf": 0.25}},
        "required": ["name", "qty"], "additionalProperties": False}}, "paid": {"type": "boolean"}},
     "required": ["items", "paid"], "additionalProperties": False},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
]


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return Model(gemma_path, threads=2)


def test_twenty_schemas_five_seeds_each_always_give_valid_json(gemma):
    assert len(SCHEMAS) == 20
    with llmx.Engine(gemma, kv_cache_tokens=16384) as engine:
        jobs = [(schema, engine.submit("Here is one example as JSON:\n", max_tokens=200, temperature=0.8, seed=seed,
                                       response_format={"type": "json_schema", "json_schema": {"name": f"s{i}",
                                                                                               "schema": schema}}))
                for i, schema in enumerate(SCHEMAS) for seed in range(5)]
        for _, request in jobs:
            assert request.wait(600)
    unfinished = [(schema, r.text) for schema, r in jobs if r.finish_reason != "stop"]  # the grammar completed
    assert not unfinished
    for schema, request in jobs:
        jsonschema.validate(json.loads(request.text), schema)


PHONE = r"\(\d{3}\) \d{3}-\d{4}"


def test_json_object_gbnf_lark_and_regex_constrain_the_text(gemma):
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    lark = 'start: "x=" NUMBER ";"\nNUMBER: /[0-9]{1,3}/'
    cases = [({"type": "json_object"}, lambda t: isinstance(json.loads(t), dict)),
             ({"type": "gbnf", "grammar": gbnf}, lambda t: re.fullmatch(r"The answer is (yes|no)\.", t)),
             ({"type": "lark", "grammar": lark}, lambda t: re.fullmatch(r"x=[0-9]{1,3};", t)),
             ({"type": "regex", "regex": PHONE}, lambda t: re.fullmatch(PHONE, t))]
    for fmt, valid in cases:
        for seed in range(3):
            text = "".join(gemma.generate("Write something:", max_tokens=120, temperature=0.8, seed=seed,
                                          response_format=fmt))
            assert valid(text), (fmt, text)


def test_greedy_constrained_decoding_takes_the_best_allowed_token(gemma):
    """At temperature 0 each token is the argmax of the raw logits over the tokens llguidance
    allows at that step (its mask recomputed here, independently of the engine)."""
    import llguidance
    import llguidance.numpy

    fmt = {"type": "regex", "regex": "(cat|dog|bird)s? and (cat|dog|bird)s?"}
    with llmx.Engine(gemma) as engine:
        request = engine.submit("My favourite animals are", max_tokens=20, temperature=0.0, keep_logits=True,
                                response_format=fmt)
        assert request.wait(120)
    assert re.fullmatch("(cat|dog|bird)s? and (cat|dog|bird)s?", request.text.strip())
    assert request.finish_reason == "stop"
    matcher = llguidance.LLMatcher(tokenizer_view(gemma.tokenizer), compile_format(fmt))
    mask = llguidance.numpy.allocate_token_bitmask(1, gemma.config.n_vocab)
    constrained = 0
    for logits, token in zip(request.step_logits, request.token_ids, strict=True):
        llguidance.numpy.fill_next_token_bitmask(matcher, mask)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[: len(logits)].astype(bool)
        assert token == np.flatnonzero(allowed)[np.argmax(logits[allowed])]
        constrained += int(token != int(np.argmax(logits)))
        assert matcher.consume_token(token)
    assert constrained > 0  # the grammar did overrule the model somewhere


@pytest.mark.parametrize("fmt, message", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}, "invalid json schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(("}}}, "invalid json schema"),
    ({"type": "json_schema"}, "needs json_schema.schema"),
    ({"type": "gbnf", "grammar": "root ::= missing"}, "invalid grammar"),
    ({"type": "lark", "grammar": "start: nothing"}, "invalid lark"),
    ({"type": "regex", "regex": "[0-9"}, "invalid regex"),
    ({"type": "xml"}, "unknown"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object", "x-guidance": 5}}}, "x-guidance"),
    ("json", "must be an object"),
])
def test_invalid_formats_are_one_line_errors(fmt, message):
    with pytest.raises(GrammarError, match=message) as info:
        compile_format(fmt)
    assert "\n" not in str(info.value)


def test_the_tokenizer_view_has_every_token_and_marks_control_tokens(gemma):
    view = tokenizer_view(gemma.tokenizer)
    assert view.vocab_size == gemma.config.n_vocab
    assert tokenizer_view(gemma.tokenizer) is view  # built once
    ids = gemma.tokenize("Hello, world! 123", add_bos=False)
    assert view.decode_str(ids) == gemma.detokenize(ids)
    assert view.is_special_token(gemma.tokenizer.vocab.bos_id)


def test_llmx_run_flags_constrain_the_output_and_bad_ones_are_one_line(gemma_path, tmp_path):
    schema = SCHEMAS[0]
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(schema))
    grammar_file = tmp_path / "yesno.gbnf"
    grammar_file.write_text('root ::= ("yes" | "no") "."\n')
    common = [str(gemma_path), "A person:", "-n", "80", "--seed", "1", "--no-server"]
    for flags, valid in [(["--json-schema", str(schema_file)], lambda t: jsonschema.validate(json.loads(t), schema)),
                         (["--json-schema", json.dumps(schema)], lambda t: jsonschema.validate(json.loads(t), schema)),
                         (["--format", "json"], lambda t: json.loads(t).keys()),
                         (["--json-object"], lambda t: json.loads(t).keys()),
                         (["--grammar-file", str(grammar_file)], lambda t: re.fullmatch(r"(yes|no)\.", t).group()),
                         (["--regex", PHONE], lambda t: re.fullmatch(PHONE, t).group())]:
        result = run_llmx("run", *common, *flags)
        assert result.returncode == 0, result.stderr
        valid(result.stdout.decode())
    for flags, message in [(["--json-schema", '{"type": "frob"}'], b"invalid json schema"),
                           (["--json-schema", "{oops"], b"neither a file nor valid JSON"),
                           (["--regex", "[0-9"], b"invalid regex"),
                           (["--grammar", "root ::= missing"], b"invalid grammar"),
                           (["--regex", "a", "--json-object"], b"give one")]:
        result = run_llmx("run", *common, *flags)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and b"Traceback" not in result.stderr


def test_the_tokenizer_view_goes_with_its_tokenizer():
    """A server unloading models must not keep their vocabularies' views."""
    import gc

    from conftest import MODELS_DIR, require_reference

    from llmx.engine.grammar import _views
    from llmx.formats.gguf_file import GGUFFile
    from llmx.formats.tokenizer import Tokenizer

    require_reference()
    tokenizer = Tokenizer.from_gguf(GGUFFile.open(MODELS_DIR / "tiny-llama-f16.gguf"))
    view = tokenizer_view(tokenizer)
    assert view.tokenize_str("hello") == tokenizer.tokenize("hello", add_bos=False)
    before = len(_views)
    del tokenizer, view
    gc.collect()
    assert len(_views) == before - 1
