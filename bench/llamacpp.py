"""llama.cpp beside moetrt: build it from the llama-cpp-python sdist, convert a checkpoint to GGUF, run its tools.

`python -m moetrt.bench.llamacpp build` (`make llamacpp`) downloads the llama-cpp-python sdist (which vendors
llama.cpp), moves the vendored tree out of the sdist with its `.git` set aside (left in place, git finds the
sdist's own `.git` and the configure step rewrites an index ninja watches: cmake then re-runs forever), and
builds the tools the benchmark needs, Release, CPU only, at low priority. Everything lives under
`$MOETRT_CACHE_DIR/llama.cpp` (or `--dir`), never in the repository. Never part of CI.

Conversion (`convert`) stages the checkpoint for llama.cpp's `convert_hf_to_gguf.py` with the three fixes a
DeepSeek-V3 checkpoint written by transformers 5 needs: `scoring_func` written into config.json (transformers 5
drops it, and the converter then records softmax routing), a byte-level BPE tokenizer of exactly `vocab_size`
entries, and the GPT-2 pre-tokenizer label the converter cannot infer for a tokenizer it has never seen. Then
`llama-quantize` makes the other types; the f32 GGUF's metadata is checked for the routing and vocabulary it must
hold, and `greedy_check` compares llama.cpp's greedy continuation with transformers'.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from moetrt.errors import MoetrtError

SDIST = "llama-cpp-python"
SDIST_VERSION = "0.3.36"  # vendors llama.cpp 0c1e570; pinned so that a benchmark names what it compared against
TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize", "llama-completion")
# Without AMX: on a CPU with AMX, GGML_NATIVE compiles in the AMX weight buffer type, and llama-bench then aborts on
# ds-mini's Q4_0 and Q8_0 GGUFs (ggml-backend.cpp: GGML_ASSERT(*cur_backend_id != -1), an op on weights no backend
# takes; the same abort as llama.cpp issue #19184 on AMX). `--repack 0` avoids it but also drops the AVX-512
# repacked Q4_0/Q8_0 layouts llama.cpp uses on every other x86 CPU; with AMX compiled out the repack stays on. GCC
# and clang apply an explicit -mno-* over -march=native whatever their order; on x86 CPUs without AMX these change
# nothing (other architectures have no such flags).
NO_AMX = ("-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine().lower() in ("x86_64", "amd64") else "")
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DGGML_CUDA=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_EXAMPLES=ON",
                 "-DLLAMA_BUILD_TOOLS=ON", f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")
# llama.cpp's name for each type the benchmark compares -> llama-quantize's argument (f32: the converter's own)
GGUF_TYPES = {"f32": None, "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name (src/llama-vocab.cpp) for GPT-2's pre-tokenizer regex
SPECIAL_PIECES = ("<|bos|>", "<|eos|>")  # the byte-level tokenizer's BOS and EOS
TIE_MARGIN = 1e-3  # logits closer than this may be ordered either way by two float32 implementations
SIGMOID = 2  # gguf.ExpertGatingFuncType.SIGMOID, the value `{arch}.expert_gating_func` must hold


def default_dir() -> Path:
    """`$MOETRT_CACHE_DIR/llama.cpp` (moetrt/settings.py `cache_dir`)."""
    from moetrt.settings import cache_dir

    return cache_dir() / "llama.cpp"


@dataclasses.dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp build: `root/src` (the vendored sources), `root/build/bin` (the tools)."""

    root: Path

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    def tool(self, name: str) -> Path:
        """The path of tool `name` (e.g. "llama-bench"); raises MoetrtError when it was not built."""
        path = self.build_dir / "bin" / name
        if not path.is_file():
            raise MoetrtError(f"llama.cpp's {name} is not built under {self.root}: run `make llamacpp` "
                              f"(or python -m moetrt.bench.llamacpp build --dir {self.root})")
        return path

    def commit(self) -> str:
        marker = self.root / "COMMIT"
        return marker.read_text().strip() if marker.is_file() else "unknown"


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([str(c) for c in command], check=True, **kwargs)
    except subprocess.CalledProcessError as error:
        stderr = error.stderr or ""
        tail = (stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr)[-2000:]
        raise MoetrtError(f"{Path(str(command[0])).name} failed (exit {error.returncode}): "
                          f"{' '.join(map(str, command))}\n{tail}") from None


def fetch_sources(root: Path, version: str = SDIST_VERSION) -> Path:
    """Download and unpack the sdist into `root/sdist`, move its vendored llama.cpp to `root/src` with the `.git`
    link set aside (as `.git.sdist`), and write the vendored commit to `root/COMMIT`. Idempotent."""
    llama = LlamaCpp(root)
    if (llama.src / "CMakeLists.txt").is_file():
        return llama.src
    sdist = root / "sdist"
    sdist.mkdir(parents=True, exist_ok=True)
    archive = sdist / f"{SDIST.replace('-', '_')}-{version}.tar.gz"
    if not archive.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", "-d",
              sdist, f"{SDIST}=={version}"])
    with tarfile.open(archive) as tar:
        tar.extractall(sdist, filter="data")
    unpacked = sdist / archive.name.removesuffix(".tar.gz")
    vendored = unpacked / "vendor" / "llama.cpp"
    head = unpacked / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    (root / "COMMIT").write_text((head.read_text().strip()[:7] if head.is_file() else "unknown") + "\n")
    if (vendored / ".git").exists():
        (vendored / ".git").rename(vendored / ".git.sdist")
    shutil.rmtree(llama.src, ignore_errors=True)
    shutil.move(vendored, llama.src)
    shutil.rmtree(unpacked)
    return llama.src


def build_llamacpp(root: Path | None = None, jobs: int = 2, version: str = SDIST_VERSION) -> LlamaCpp:
    """Fetch the sources (fetch_sources) and build TARGETS with cmake + ninja at `nice -n 10` (10-15 minutes on
    2 cores). Raises MoetrtError when cmake, a compiler or the download fails."""
    root = Path(root or default_dir()).resolve()  # cmake's cache records absolute paths: keep them one spelling
    if shutil.which("cmake") is None:
        raise MoetrtError("building llama.cpp needs cmake (and a C++ compiler): install them first")
    src = fetch_sources(root, version)
    llama = LlamaCpp(root)
    # git must not find a repository above the sources (a stray index change loops cmake's configure)
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(root.resolve())}
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", src, "-B", llama.build_dir, *generator, *CMAKE_OPTIONS,
          f"-DLLAMA_BUILD_COMMIT={llama.commit()}", "-DLLAMA_BUILD_NUMBER=0"], env=env)
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    _run([*nice, "cmake", "--build", llama.build_dir, "-j", str(jobs), "--target", *TARGETS], env=env)
    for name in TARGETS:
        llama.tool(name)
    return llama


# -- conversion ----------------------------------------------------------------------------------------------

def llama_config(config: dict) -> dict:
    """config.json as llama.cpp's converter must read it: DeepSeek-V3's sigmoid scoring written out (transformers 5
    omits `scoring_func`; the converter would record softmax). Raises MoetrtError for a routing it cannot carry."""
    config = dict(config)
    if config.get("model_type") == "deepseek_v3":
        config.setdefault("scoring_func", "sigmoid")
        config.setdefault("topk_method", "noaux_tc")
    if config.get("topk_method", "noaux_tc") != "noaux_tc" or config.get("scoring_func") not in (None, "sigmoid"):
        raise MoetrtError(f"routing {config.get('topk_method')}/{config.get('scoring_func')} is not the DeepSeek-V3 "
                          "routing moetrt and this comparison assume")
    for key in ("n_group", "topk_group"):
        if key not in config:
            raise MoetrtError(f"config.json has no {key}: llama.cpp would route without expert groups")
    return config


def byte_level_tokenizer(vocab_size: int, bos_id: int = 0, eos_id: int = 1):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer) with exactly `vocab_size` entries, for checkpoints that
    ship none (ds-mini): the two special tokens at `bos_id`/`eos_id`, the 256 bytes, then two-byte merges, the
    printable ones first. Returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    # GPT-2's byte -> character table orders the printable bytes first; keep its order for stable ids
    printable = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    characters = printable + sorted(set(alphabet) - set(printable))
    specials = dict(zip((bos_id, eos_id), SPECIAL_PIECES))
    if len(characters) + len(specials) > vocab_size:
        raise MoetrtError(f"vocab_size {vocab_size} is smaller than the 258 entries a byte-level vocabulary needs")
    pieces = iter(characters + [a + b for a in characters for b in characters])
    vocab, merges = {}, []
    for index in range(vocab_size):
        piece = specials.get(index) or next(pieces)
        vocab[piece] = index
        if len(piece) == 2 and index not in specials:
            merges.append((piece[0], piece[1]))
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([specials[bos_id], specials[eos_id]])
    return tokenizer


def stage_checkpoint(checkpoint: Path, stage: Path) -> Path:
    """A directory the converter reads: the checkpoint's weights linked, config.json fixed (llama_config), and
    the byte-level tokenizer with its tokenizer_config.json (BOS added, as DeepSeek's tokenizer does)."""
    config = json.loads((checkpoint / "config.json").read_text())
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for path in checkpoint.iterdir():
        if path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
            (stage / path.name).symlink_to(path.resolve())
    (stage / "config.json").write_text(json.dumps(llama_config(config), indent=2))
    bos, eos = config.get("bos_token_id", 0), config.get("eos_token_id", 1)
    eos = eos[0] if isinstance(eos, list) else eos
    byte_level_tokenizer(config["vocab_size"], bos, eos).save(str(stage / "tokenizer.json"))
    (stage / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": True, "add_eos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.get("max_position_embeddings", 4096),
    }, indent=2))
    return stage


# Runs llama.cpp's converter with the byte-level tokenizer labelled as GPT-2's pre-tokenizer (it splits the same
# way; the converter only knows tokenizers by the hash of their output on a test string). argv: src, the label,
# then the converter's own arguments.
CONVERT_SCRIPT = """
import runpy, sys
src, label = sys.argv.pop(1), sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: label
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def gguf_metadata(path: Path, src: Path) -> dict:
    """The scalar metadata of a GGUF (gguf-py from llama.cpp's sources, in a subprocess), plus `vocab_entries`."""
    script = ("import json, sys; sys.path.insert(0, sys.argv[1] + '/gguf-py'); import gguf\n"
              "r = gguf.GGUFReader(sys.argv[2]); out = {}\n"
              "for f in r.fields.values():\n"
              "    if f.name == 'tokenizer.ggml.tokens': out['vocab_entries'] = len(f.data)\n"
              "    elif len(f.data) == 1 and f.types and f.types[0] != gguf.GGUFValueType.ARRAY:\n"
              "        v = f.contents(); out[f.name] = v if isinstance(v, (int, float, str, bool)) else str(v)\n"
              "print(json.dumps(out))")
    out = _run([sys.executable, "-c", script, src, path], capture_output=True, text=True)
    return json.loads(out.stdout)


def check_gguf(metadata: dict, config: dict) -> None:
    """Raises MoetrtError when a GGUF would run a different model: softmax routing, no expert groups, a
    pre-tokenizer llama.cpp does not know, or a vocabulary of another size."""
    arch = metadata.get("general.architecture", "")
    problems = []
    if metadata.get(f"{arch}.expert_gating_func") != SIGMOID:
        problems.append(f"expert_gating_func {metadata.get(f'{arch}.expert_gating_func')} (sigmoid is {SIGMOID})")
    if metadata.get(f"{arch}.expert_group_count") != config["n_group"]:
        problems.append(f"expert_group_count {metadata.get(f'{arch}.expert_group_count')} != n_group")
    if metadata.get(f"{arch}.expert_group_used_count") != config["topk_group"]:
        problems.append("expert_group_used_count != topk_group")
    if metadata.get("tokenizer.ggml.pre") != PRE_TOKENIZER:
        problems.append(f"pre-tokenizer {metadata.get('tokenizer.ggml.pre')!r} (want {PRE_TOKENIZER!r})")
    if metadata.get("vocab_entries") != config["vocab_size"]:
        problems.append(f"{metadata.get('vocab_entries')} vocabulary entries != vocab_size {config['vocab_size']}")
    if problems:
        raise MoetrtError("the GGUF does not hold the checkpoint's model: " + "; ".join(problems))


def convert(checkpoint: str | Path, llama: LlamaCpp, types: tuple[str, ...] = ("f32", "q8_0", "q4_0"),
            out_dir: Path | None = None) -> dict[str, Path]:
    """GGUF files of `checkpoint` at each of `types` (keys of GGUF_TYPES) under `out_dir` (default
    `llama.root/models/<checkpoint name>`); reused while newer than the checkpoint's config.json. Returns
    {type: path}. Raises MoetrtError on an unknown type or a failed conversion."""
    checkpoint = Path(checkpoint).resolve()
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown:
        raise MoetrtError(f"unknown GGUF type {unknown[0]!r}: one of {', '.join(GGUF_TYPES)}")
    out_dir = Path(out_dir or llama.root / "models" / checkpoint.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text())
    stamp = (checkpoint / "config.json").stat().st_mtime
    paths = {t: out_dir / f"{checkpoint.name}-{t}.gguf" for t in ("f32", *types)}
    if not (paths["f32"].is_file() and paths["f32"].stat().st_mtime > stamp):
        stage = stage_checkpoint(checkpoint, out_dir / "stage")
        partial = paths["f32"].with_suffix(".partial")  # renamed once checked: a failed run leaves no GGUF
        env = {**os.environ, "NO_LOCAL_GGUF": "1"}
        _run([sys.executable, "-c", CONVERT_SCRIPT, llama.src, PRE_TOKENIZER, stage, "--outtype", "f32",
              "--outfile", partial, "--model-name", checkpoint.name], env=env, capture_output=True, text=True)
        check_gguf(gguf_metadata(partial, llama.src), config)
        partial.rename(paths["f32"])
    for gguf_type in types:
        path = paths[gguf_type]
        if GGUF_TYPES[gguf_type] and not (path.is_file() and path.stat().st_mtime > paths["f32"].stat().st_mtime):
            partial = path.with_suffix(".partial")
            _run([llama.tool("llama-quantize"), paths["f32"], partial, GGUF_TYPES[gguf_type], "2"],
                 capture_output=True, text=True)
            partial.rename(path)
    return {t: paths[t] for t in types}


# -- running llama.cpp's tools ---------------------------------------------------------------------------------

def parse_llama_bench(output: str) -> dict[str, list[float]]:
    """llama-bench's `-o json` output -> {"pp<N>": tokens/s per repetition, "tg<N>": ...} (a test with both a
    prompt and generated tokens is keyed "pp<N>+tg<M>"). Raises MoetrtError on output that is not that JSON."""
    try:
        tests = json.loads(output[output.index("["):])
    except (ValueError, json.JSONDecodeError):
        raise MoetrtError(f"llama-bench printed no JSON array: {output[-300:]!r}") from None
    results: dict[str, list[float]] = {}
    for test in tests:
        prompt, generated = int(test.get("n_prompt", 0)), int(test.get("n_gen", 0))
        key = "+".join(part for part in (f"pp{prompt}" * bool(prompt), f"tg{generated}" * bool(generated)) if part)
        results[key] = [float(x) for x in test.get("samples_ts") or [test["avg_ts"]]]
    return results


def parse_batched_bench(output: str) -> dict[int, dict[str, float]]:
    """llama-batched-bench's `--output-format jsonl` output -> {batch: {"speed_pp", "speed_tg", ...}}, one entry
    per `pl` (parallel sequences). Lines that are not JSON objects (logs) are skipped."""
    rows: dict[int, dict[str, float]] = {}
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if "pl" in row and "speed_tg" in row:
            rows[int(row["pl"])] = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
    return rows


def run_llama_bench(llama: LlamaCpp, model: Path, threads: int = 2, prompt: int = 64, generate: int = 64,
                    repetitions: int = 3) -> dict[str, list[float]]:
    """Prefill (`-p prompt`) and decode at batch 1 (`-n generate`, from an empty context) tokens/s per repetition,
    weights read into memory (`-lm none`, llama.cpp's no-mmap), after llama-bench's own warm-up run."""
    out = _run([llama.tool("llama-bench"), "-m", model, "-t", threads, "-p", prompt, "-n", generate,
                "-r", repetitions, "-lm", "none", "-o", "json"], capture_output=True, text=True)
    return parse_llama_bench(out.stdout)


def run_batched_bench(llama: LlamaCpp, model: Path, batch: int = 8, threads: int = 2, prompt: int = 16,
                      generate: int = 64) -> dict[str, float]:
    """Decode tokens/s of `batch` sequences together (each a `prompt`-token prompt, then `generate` tokens), as
    llama-batched-bench's `speed_tg` (all sequences' tokens over the generation time)."""
    out = _run([llama.tool("llama-batched-bench"), "-m", model, "-t", threads, "-tb", threads,
                "-c", batch * (prompt + generate) + 64, "-npp", prompt, "-ntg", generate, "-npl", batch,
                "-lm", "none", "--output-format", "jsonl"], capture_output=True, text=True)
    rows = parse_batched_bench(out.stdout)
    if batch not in rows:
        raise MoetrtError(f"llama-batched-bench reported no row for batch {batch}: {out.stdout[-300:]!r}")
    return rows[batch]


def greedy_text(llama: LlamaCpp, model: Path, prompt: str, new_tokens: int, threads: int = 2) -> bytes:
    """llama.cpp's greedy continuation of `prompt` (BOS added, then `new_tokens` argmax tokens, stopping at end of
    generation) as the bytes llama-completion printed for the new tokens, special tokens as their text. The KV cache
    is float32 and flash attention off: llama.cpp's default float16 cache perturbs ds-mini's logits enough to
    flip a routing choice within a few dozen tokens, and the check is of the model, not of that cache."""
    out = _run([llama.tool("llama-completion"), "-m", model, "-p", prompt, "-n", new_tokens, "--temp", "0",
                "-t", threads, "-c", 512, "-ctk", "f32", "-ctv", "f32", "-fa", "off", "-no-cnv",
                "--no-display-prompt", "--special", "--simple-io", "--no-warmup"], capture_output=True)
    return parse_completion(out.stdout)


def parse_completion(stdout: bytes) -> bytes:
    """The generated bytes from llama-completion's stdout: the text, then " [end of text]\n" where it stopped at
    end of generation, then the "\n\n" it prints on exit."""
    return stdout.removesuffix(b"\n\n").removesuffix(b" [end of text]\n")


def transformers_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation of prompt `ids` (no stop token): the new ids."""
    import torch

    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@functools.lru_cache(maxsize=1)
def _byte_table() -> dict[str, int]:
    """GPT-2's byte-level table inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


def token_bytes(tokenizer, ids: list[int]) -> bytes:
    """The bytes of `ids` as llama.cpp prints pieces: special tokens by their text, byte-level pieces mapped
    back to bytes."""
    table = _byte_table()
    out = bytearray()
    for index in ids:
        piece = tokenizer.id_to_token(index)
        out += piece.encode() if piece in SPECIAL_PIECES else bytes(table[c] for c in piece)
    return bytes(out)


def divergence(tokenizer, new: list[int], printed: bytes) -> tuple[int, list[int]] | None:
    """Where llama.cpp's printed continuation leaves the reference's `new` ids: None when `printed` is exactly
    the bytes of `new` up to its first EOS; else (k, candidates): new[k] is the first reference token it does not
    continue with, and `candidates` the ids whose bytes llama.cpp's output continues with there (the tokens it
    may have picked instead; EOS when its output ends there)."""
    eos = tokenizer.token_to_id(SPECIAL_PIECES[1])
    kept = new[:new.index(eos)] if eos in new else new
    if printed == token_bytes(tokenizer, kept):
        return None
    offset, k = 0, len(new)
    for index, token in enumerate(new):
        piece = token_bytes(tokenizer, [token])
        if token == eos or not printed.startswith(piece, offset):
            k = index
            break
        offset += len(piece)
    rest = printed[offset:]
    if not rest:  # llama.cpp stops at end of generation: it picked EOS here
        return k, [eos]
    candidates = [i for i in range(tokenizer.get_vocab_size())
                  if (piece := token_bytes(tokenizer, [i])) and rest.startswith(piece)]
    return k, candidates


def greedy_check(checkpoint: str | Path, llama: LlamaCpp, gguf: Path, prompt: str = "The quick brown fox",
                 new_tokens: int = 32, tie: float = TIE_MARGIN) -> dict:
    """llama.cpp's greedy continuation of `prompt` (the f32 GGUF, greedy_text) against transformers' on the
    checkpoint, compared as printed bytes. Where they part, transformers' logits at that step say whether its pick
    led llama.cpp's by no more than `tie` (two float32 implementations may order a near tie either way).
    Returns {"match", "near_tie", "agreed" (tokens equal before parting), "margin", "ids", "llama",
    "transformers"}; run before any timing."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    checkpoint = Path(checkpoint).resolve()
    stage = gguf.parent / "stage"
    if not (stage / "tokenizer.json").is_file():
        stage_checkpoint(checkpoint, stage)
    tokenizer = Tokenizer.from_file(str(stage / "tokenizer.json"))
    shown = [tokenizer.token_to_id(SPECIAL_PIECES[0]), *tokenizer.encode(prompt).ids]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    new = transformers_greedy(model, shown, new_tokens)
    printed = greedy_text(llama, gguf, prompt, new_tokens)
    result = {"match": True, "near_tie": False, "agreed": len(new), "margin": None, "ids": new,
              "llama": printed, "transformers": token_bytes(tokenizer, new)}
    parted = divergence(tokenizer, new, printed)
    if parted is not None:
        k, candidates = parted
        with torch.inference_mode():
            logits = model(torch.tensor([[*shown, *new[:k]]])).logits[0, -1]
        margin = float(logits[new[k]] - logits[candidates].max()) if candidates and k < len(new) else float("inf")
        result.update(match=False, near_tie=margin <= tie, agreed=k, margin=margin)
    return result


def describe_greedy(result: dict) -> str:
    """One line for a greedy_check result."""
    total = len(result["ids"])
    if result["match"]:
        return f"MATCH ({total} of {total} tokens)"
    where = f"the first {result['agreed']} of {total} tokens equal, then"
    if result["near_tie"]:
        return (f"MATCH up to a near tie: {where} transformers' pick leads llama.cpp's by {result['margin']:.2g} "
                f"in logit (tie below {TIE_MARGIN:g})")
    return f"DIFFERENT: {where} transformers' pick leads llama.cpp's by {result['margin']:.3g} in logit"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("build", "convert", "greedy-check"))
    parser.add_argument("--dir", default=None, help="llama.cpp's folder (default $MOETRT_CACHE_DIR/llama.cpp)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--checkpoint", default=None, help="for convert / greedy-check (default: ds-mini)")
    parser.add_argument("--types", default="f32,q8_0,q4_0")
    options = parser.parse_args(argv)
    root = Path(options.dir or default_dir())
    try:
        if options.command == "build":
            llama = build_llamacpp(root, options.jobs)
            print(f"llama.cpp {llama.commit()} built in {llama.build_dir / 'bin'}")
            return
        if options.checkpoint:
            checkpoint = Path(options.checkpoint)
        else:
            from moetrt.bench.run import model_dirs
            checkpoint = model_dirs(["ds-mini"])["ds-mini"]
        llama = LlamaCpp(root)
        paths = convert(checkpoint, llama, tuple(options.types.split(",")))
        for name, path in paths.items():
            print(f"{name}: {path} ({path.stat().st_size / 1e6:.0f} MB)")
        if options.command == "greedy-check":
            result = greedy_check(checkpoint, llama, convert(checkpoint, llama, ("f32",))["f32"])
            print(f"greedy continuation: {describe_greedy(result)}\n"
                  f"  llama.cpp:    {result['llama']!r}\n  transformers: {result['transformers']!r}")
            if not (result["match"] or result["near_tie"]):
                raise SystemExit(1)
    except MoetrtError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
