"""Plain decoding against prompt lookup and a draft model: generated tokens/s and acceptance.

    python scripts/bench_speculative.py [MODEL] [--lookup 15] [--draft PATH|self|none] [--draft-max 7]
           [--tokens 200] [--repeat 3] [--threads 2] [--temperature 0] [--tasks a,b] [--isa avx2]

Tasks (temperature 0 unless --temperature, seed 0; one request at a time, end-of-generation
ignored so every run generates --tokens tokens):
  rewrite   "Rewrite this code with type hints:" and a ~490-token Python function (input-grounded)
  repeat    a passage, then the same passage again with one word changed, then "Text:" (input-grounded)
  open-*    three open-ended prompts (nothing to copy: lookup must fall back to plain speed)
Speed is generated tokens over the time from the first token to the last; "x" is the median over
the rounds of each round's speculative / plain ratio (run back to back). Each run also checks
that the speculative tokens equal the plain ones (above temperature 0 too: prompt lookup draws
one random number per token, as plain decoding does). `--draft self` uses the model as its own draft
(every proposal right, at the price of a second model: an upper bound on acceptance, not a
speed-up); a real draft is a smaller GGUF with the same vocabulary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import llmx
from llmx.engine.model import Model
from llmx.quant.cpu.simd import ISA_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_structured import load_model  # noqa: E402  (the model, and an AVX2 laptop's code generation)

REPO = Path(__file__).resolve().parents[1]


# ~490 tokens of Python without type hints (llmx's tokenizer methods, hints taken out), fixed here so
# the figures do not move when the sources do
FUNCTION = """\
    def tokenize(self, text, add_bos = True, special = False):
        \"\"\"Token ids as llama.cpp's `llama_tokenize(text, add_special=add_bos, parse_special=special)`.\"\"\"
        ids = []
        if add_bos and self.vocab.add_bos and self.vocab.bos_id is not None:
            ids.append(self.vocab.bos_id)
        for fragment in self._partition(text, special):
            if isinstance(fragment, int):
                ids.append(fragment)
            else:
                ids.extend(self._backend.encode(fragment))
        if add_bos and self.vocab.add_eos and self.vocab.eos_id is not None:
            ids.append(self.vocab.eos_id)
        return ids

    def _partition(self, text, special):
        \"\"\"Split `text` on special-token texts, longest first, as llama.cpp does.\"\"\"
        fragments = [text] if text else []
        splitters = self._user_defined if not special else self._user_defined_and_control
        for token_text, token_id in splitters:
            if not any(isinstance(f, str) and token_text in f for f in fragments):
                continue
            fragments = _split_fragments(fragments, token_text, token_id)
        return fragments

    @cached_property
    def _user_defined(self):
        return self._splitters(TokenType.USER_DEFINED)

    @cached_property
    def _user_defined_and_control(self):
        return self._splitters(TokenType.USER_DEFINED, TokenType.CONTROL, TokenType.UNKNOWN)

    def _splitters(self, *types):
        ids = self.vocab.ids_of_type(*types).tolist()
        pairs = [(self.vocab.tokens[i], i) for i in ids if self.vocab.tokens[i]]
        return sorted(pairs, key=lambda p: -len(p[0]))  # stable: equal lengths keep id order

    # -- decoding ---------------------------------------------------------

"""


def tasks() -> dict[str, str]:
    passage = (REPO.parent / "shared" / "reference" / "gpl-3.txt")
    text = passage.read_text(encoding="utf-8")[2000:3400] if passage.is_file() else FUNCTION
    edited = text.replace("software", "program", 1)
    fence = "```python\n"
    return {
        "rewrite": "Rewrite this code with type hints:\n\n" + fence + FUNCTION + "```\n\n"
                   "The same code with type hints:\n\n" + fence,
        "repeat": "Text:\n" + text + "\n\nThe same text with one word changed:\n" + edited + "\n\nText:\n",
        "open-story": "Once upon a time, in a village by the sea,",
        "open-essay": "The most important invention of the twentieth century was",
        "open-recipe": "My grandmother's recipe for apple pie starts with",
    }


def run(model: Model, prompt: str, tokens: int, speculative, temperature: float = 0.0) -> tuple[float, dict, list[int]]:
    with llmx.Engine(model, max_seqs=1, kv_cache_tokens=4096, speculative=speculative) as engine:
        request = engine.submit(prompt, max_tokens=tokens, temperature=temperature, seed=0, ignore_eos=True)
        request.wait()
        stats = engine.stats()
    rate = (len(request.token_ids) - 1) / (request.finished_at - request.first_token_at)
    return rate, stats, request.token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--lookup", type=int, default=15)
    parser.add_argument("--draft", default="self")
    parser.add_argument("--draft-max", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--tasks", help="comma-separated task names (default: all)")
    parser.add_argument("--isa", choices=sorted(ISA_NAMES))
    args = parser.parse_args()
    model, kernels = load_model(args)
    methods = {"lookup": {"method": "ngram", "k": args.lookup}}
    if args.draft != "none":
        draft = model if args.draft == "self" else Model(Path(args.draft), threads=args.threads, isa=args.isa,
                                                         compute=model.compute)
        draft.warm_up()
        methods["draft"] = {"method": "draft", "model": draft, "k": args.draft_max}
    print(f"{model.path.name}, {args.threads} threads, {kernels} kernels, {args.tokens} tokens, "
          f"temperature {args.temperature}, median of {args.repeat}; "
          f"lookup k={args.lookup}, draft {args.draft} k={args.draft_max}")
    print(" | ".join([f"{'task':<12} {'plain t/s':>9}"] + [f"{m + ' t/s':>10} {'x':>5} {'accept':>6} {'tok/step':>8}"
                                                          for m in methods]))
    chosen = args.tasks.split(",") if args.tasks else list(tasks())
    for name, prompt in ((n, p) for n, p in tasks().items() if n in chosen):
        rates = {"plain": []} | {m: [] for m in methods}
        figures = {}
        for _ in range(args.repeat):  # interleaved: drift hits every method alike
            rate, _, plain_ids = run(model, prompt, args.tokens, None, args.temperature)
            rates["plain"].append(rate)
            for method, spec in methods.items():
                rate, stats, ids = run(model, prompt, args.tokens, spec, args.temperature)
                if args.temperature == 0 or method == "lookup":
                    assert ids == plain_ids, f"{method} changed the tokens of {name}"
                rates[method].append(rate)
                figures[method] = stats
        plain = statistics.median(rates["plain"])
        cells = [f"{name:<12} {plain:>9.1f}"]
        for method in methods:
            rate, s = statistics.median(rates[method]), figures[method]
            # the ratio of each round's pair (run back to back), then the median: drift cancels
            ratio = statistics.median(r / p for r, p in zip(rates[method], rates["plain"], strict=True))
            cells.append(f"{rate:>9.1f} {ratio:>5.2f} {100 * s['acceptance_rate']:>5.0f}% "
                         f"{s['tokens_per_step']:>8.2f}")
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
