"""A Moonlight-16B-A3B-shaped checkpoint with random weights in DeepSeek's FP8 layout, written shard by shard.

The shape is `../shared/reference/moonlight-16b-a3b-config.json` (kept here as MOONLIGHT: DeepSeek-V3 architecture,
27 layers, the first dense, 64 routed experts of 1408 with 6 active, 2 shared, MLA with kv-LoRA 512 and no q-LoRA,
vocab 163840; 15.96B parameters). Weights are stored as DeepSeek-V3's released checkpoint stores them: every linear
weight of the decoder layers (attention projections, dense and shared MLPs, routed experts) is float8 e4m3 with a
float32 `weight_scale_inv` per 128x128 block, the rest (embedding, head, norms, router) bfloat16, the routers'
correction bias float32; `quantization_config` says so in config.json (quant_method fp8, fmt e4m3,
weight_block_size [128, 128]). About 16.6 GB.

Random weights at the model's initializer scale (std 0.02): the values are N(0, 1) drawn once into a pool and read
from a random offset per tensor, stored in e4m3, with scale 0.02 per block. Nothing is ever held beyond one tensor:
each shard's safetensors header is computed from the shapes first and the tensors are then written in order.

A byte-level tokenizer comes with it (256 byte tokens, `[BOS]` 163584 and `[EOS]` 163585, Moonlight's ids, and a
ChatML-style template), so tokenizer-driven commands run; it is not Moonlight's tokenizer.

    python -m moetrt.bench.moonlight DIR        (`make moonlight`; MOONLIGHT_DIR sets DIR)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

MOONLIGHT = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 163840,
    "hidden_size": 2048, "intermediate_size": 11264, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "num_experts_per_tok": 6, "routed_scaling_factor": 2.446, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rope_theta": 50000.0, "rope_scaling": None,
    "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 163584,
    "eos_token_id": 163585, "torch_dtype": "bfloat16", "num_nextn_predict_layers": 0,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}
BLOCK = 128
STD = 0.02
POOL_ELEMENTS = 1 << 26  # 64 MiB of e4m3 values, read at a random offset per tensor
SHARD_BYTES = 4 << 30
BOS, EOS = "[BOS]", "[EOS]"
CHAT_TOKENS = ("<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|im_system|>system<|im_middle|>{{ m['content'] }}<|im_end|>"
    "{% elif m['role'] == 'user' %}<|im_user|>user<|im_middle|>{{ m['content'] }}<|im_end|>"
    "{% else %}<|im_assistant|>assistant<|im_middle|>{{ m['content'] }}<|im_end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
)


def tensor_specs(config: dict) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor of the checkpoint, layer by layer, FP8 weights followed by
    their `weight_scale_inv`."""
    h, vocab = config["hidden_size"], config["vocab_size"]
    heads, nope, rope, v = (config["num_attention_heads"], config["qk_nope_head_dim"], config["qk_rope_head_dim"],
                            config["v_head_dim"])
    kv_rank, inter, moe_inter = config["kv_lora_rank"], config["intermediate_size"], config["moe_intermediate_size"]

    def fp8(name: str, out: int, inputs: int):
        yield name + ".weight", "F8_E4M3", (out, inputs)
        yield name + ".weight_scale_inv", "F32", (math.ceil(out / BLOCK), math.ceil(inputs / BLOCK))

    def mlp(prefix: str, width: int):
        yield from fp8(prefix + ".gate_proj", width, h)
        yield from fp8(prefix + ".up_proj", width, h)
        yield from fp8(prefix + ".down_proj", h, width)

    yield "model.embed_tokens.weight", "BF16", (vocab, h)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", "BF16", (h,)
        yield p + "post_attention_layernorm.weight", "BF16", (h,)
        yield from fp8(p + "self_attn.q_proj", heads * (nope + rope), h)
        yield from fp8(p + "self_attn.kv_a_proj_with_mqa", kv_rank + rope, h)
        yield p + "self_attn.kv_a_layernorm.weight", "BF16", (kv_rank,)
        yield from fp8(p + "self_attn.kv_b_proj", heads * (nope + v), kv_rank)
        yield from fp8(p + "self_attn.o_proj", h, heads * v)
        if layer < config["first_k_dense_replace"]:
            yield from mlp(p + "mlp", inter)
            continue
        yield p + "mlp.gate.weight", "BF16", (config["n_routed_experts"], h)
        yield p + "mlp.gate.e_score_correction_bias", "F32", (config["n_routed_experts"],)
        yield from mlp(p + "mlp.shared_experts", moe_inter * config["n_shared_experts"])
        for expert in range(config["n_routed_experts"]):
            yield from mlp(f"{p}mlp.experts.{expert}", moe_inter)
    yield "model.norm.weight", "BF16", (h,)
    yield "lm_head.weight", "BF16", (vocab, h)


ITEMSIZE = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def _values(name: str, dtype: str, shape: tuple[int, ...], pool: torch.Tensor, rng: np.random.Generator) -> bytes:
    """The bytes of one tensor: e4m3 values from the pool, scales of 0.02, norms of 1, bf16 weights N(0, 0.02^2)."""
    count = math.prod(shape)
    if dtype == "F8_E4M3":
        start, parts, left = int(rng.integers(0, POOL_ELEMENTS)), [], count
        while left:
            piece = pool[start : start + left]
            parts.append(piece.view(torch.uint8).numpy().tobytes())
            left -= piece.numel()
            start = 0
        return b"".join(parts)
    if name.endswith("weight_scale_inv"):
        return np.full(count, STD, np.float32).tobytes()
    if name.endswith("e_score_correction_bias"):
        return (rng.standard_normal(count, np.float32) * 1e-3).tobytes()
    if "norm" in name:
        return torch.ones(count, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    values = torch.from_numpy(rng.standard_normal(count, np.float32)).mul_(STD).to(torch.bfloat16)
    return values.view(torch.int16).numpy().tobytes()


def write_moonlight(directory: str | Path, seed: int = 0, config: dict | None = None,
                    shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the checkpoint into `directory` (staged beside it and renamed when complete); returns it. `config`
    replaces MOONLIGHT (a smaller model of the same layout, for tests); shards of about `shard_bytes`."""
    from moetrt.atomic import staging_dir
    from moetrt.progress import byte_progress

    config = config or MOONLIGHT
    if config.get("q_lora_rank") or config.get("tie_word_embeddings") or not config.get("n_shared_experts"):
        raise ValueError("write_moonlight writes Moonlight's layout: no q-LoRA, an untied head, shared experts")
    directory = Path(directory)
    specs = list(tensor_specs(config))
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * ITEMSIZE[spec[1]]
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    total = sum(math.prod(shape) * ITEMSIZE[dtype] for _, dtype, shape in specs)
    rng = np.random.default_rng(seed)
    pool = torch.from_numpy(rng.standard_normal(POOL_ELEMENTS, np.float32)).to(torch.float8_e4m3fn)
    weight_map = {}
    with staging_dir(directory) as work, byte_progress(total, "writing checkpoint") as advance:
        for index, shard in enumerate(shards):
            file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, dtype, shape in shard:
                nbytes = math.prod(shape) * ITEMSIZE[dtype]
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
                weight_map[name] = file
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)
            with open(work / file, "wb") as out:
                out.write(struct.pack("<Q", len(encoded)) + encoded)
                for name, dtype, shape in shard:
                    data = _values(name, dtype, shape, pool, rng)
                    out.write(data)
                    advance(len(data))
        (work / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (work / "config.json").write_text(json.dumps(config, indent=2))
        _write_tokenizer(work, config)
    return directory


def _write_tokenizer(directory: Path, config: dict) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = [BOS, EOS, *CHAT_TOKENS]
    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({token: config["bos_token_id"] + index for index, token in enumerate(specials)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": EOS, "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config["max_position_embeddings"],
    }, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2))


def bench_engine(engine_dir: str | Path, new_tokens: int = 16, rounds: int = 2, threads: int = 2) -> dict:
    """Decode tok/s at batch 1 and 8, time to first token of a 512-token prompt, and the batch-1 roofline: weight
    bytes an int4/int8/fp32 decode step reads (export/info.py decode_weight_bytes) over this machine's copy bandwidth
    and over its read bandwidth (bench/bandwidth.py, both sampled beside every round). Medians over `rounds`."""
    import statistics

    from moetrt.bench.bandwidth import CopyProbe
    from moetrt.bench.systems import moetrt_engine, prompts_for
    from moetrt.export.info import decode_weight_bytes
    from moetrt.runtime.manifest import load_manifest

    manifest = load_manifest(engine_dir)
    config = manifest.model_config
    run = moetrt_engine("", str(engine_dir), threads)
    probe = CopyProbe(threads)
    samples: dict[str, list[float]] = {"b1": [], "b8": [], "ttft512": [], "bandwidth": [], "read_bandwidth": []}
    for _ in range(rounds):
        samples["bandwidth"].append(probe.sample())
        samples["read_bandwidth"].append(probe.sample_read())
        samples["b1"].append(run(prompts_for(config.vocab_size, 1, 32), new_tokens).decode_rate(1))
        samples["b8"].append(run(prompts_for(config.vocab_size, 8, 32), new_tokens).decode_rate(8))
        samples["ttft512"].append(run(prompts_for(config.vocab_size, 1, 512), 1).ttft())
    result = {key: statistics.median(values) for key, values in samples.items()}
    read = sum(decode_weight_bytes(config, manifest.dtype, manifest.quantization).values())
    result["bytes_per_token"] = read
    result["roofline_b1"] = result["bandwidth"] / read
    result["roofline_fraction_b1"] = result["b1"] / result["roofline_b1"]
    result["read_roofline_fraction_b1"] = result["b1"] * read / result["read_bandwidth"]
    return result


def kl_sources(engine_dir: str | Path, checkpoint_dir: str | Path, sequences: int = 6,
               schemes: tuple[str, ...] = ()) -> dict:
    """Where a quantized engine's KL divergence comes from, over the first `sequences` of verify's prompt set:
    KL(reference || engine) split into KL(reference || rounded) -- the float32 reference against the same model with
    the weights rounded as the engine's scheme rounds them (export/streaming_reference.py `rounded`): the
    quantization's own error -- and KL(rounded || engine): what the engine's arithmetic adds (int8 activations in
    its integer dot products, kernels, graph rewrites). `schemes` ("int8", "int4"): also KL(reference || the
    reference rounded by each), what a build of that scheme would lose on this checkpoint, without building it.
    The references are streamed layer by layer, each a pass over the checkpoint per group of sequences. Returns
    each pair's NextTokenStats as a dict. Raises MoetrtError for an engine or checkpoint that cannot be read, or a
    checkpoint of another config than the engine's."""
    import dataclasses

    from moetrt.config import load_config
    from moetrt.errors import MoetrtError

    from moetrt.export.checkpoint import CheckpointWeights
    from moetrt.export.reference_session import ReferenceSession
    from moetrt.export.streaming import allocate_large_buffers_by_mmap
    from moetrt.export.streaming_reference import streamed_model
    from moetrt.export.verify import _aggregate, _position_stats, _scoring_group, fidelity_sequences
    from moetrt.quantization import scheme_for
    from moetrt.runtime.engine import Engine
    from moetrt.runtime.generate import continuation_logits

    allocate_large_buffers_by_mmap()  # as load_reference_session does for a streamed reference
    engine = Engine.load(engine_dir)
    quantization = engine.manifest.quantization
    if quantization is None:
        raise SystemExit(f"{engine_dir} is not a quantized engine: nothing to split")
    scheme = scheme_for(quantization.scheme, quantization.group_size)
    if not (Path(checkpoint_dir) / "config.json").is_file():
        raise MoetrtError(f"{checkpoint_dir} is not a checkpoint directory (no config.json)")
    if load_config(checkpoint_dir) != engine.config:
        raise MoetrtError(f"{checkpoint_dir} is not the checkpoint {engine_dir} was built from (configs differ)")
    rows, _ = fidelity_sequences(engine, checkpoint_dir, None)
    rows = rows[:sequences]
    group = _scoring_group(engine, max(len(row.tokens) for row in rows))
    pairs: dict[str, list] = {"reference-engine": [], "reference-rounded": [], "rounded-engine": []}
    rounding = {"reference": None, "rounded": scheme}
    for name in schemes:
        rounding[f"rounded_{name}"] = scheme_for(name, quantization.group_size)
        pairs[f"reference-rounded_{name}"] = []
    with CheckpointWeights(checkpoint_dir) as weights:
        references = {name: ReferenceSession(streamed_model(weights, rounded)) for name, rounded in rounding.items()}
        for start in range(0, len(rows), group):
            chunk = rows[start : start + group]
            prompts = [row.tokens[: row.first_target] for row in chunk]
            continuations = [row.tokens[row.first_target :] for row in chunk]
            logits = {name: np.concatenate(continuation_logits(session, prompts, continuations))
                      for name, session in references.items()}
            logits["engine"] = np.concatenate([
                engine.logits(np.array([row.tokens], dtype=np.int64))[0, row.first_target - 1 : -1] for row in chunk])
            targets = np.concatenate(continuations)
            for pair in pairs:
                first, second = pair.split("-")
                pairs[pair].append(_position_stats(logits[first], logits[second], targets))
            print(f"  {start + len(chunk)}/{len(rows)} sequences scored", file=sys.stderr, flush=True)
    return {pair: dataclasses.asdict(_aggregate(parts)) for pair, parts in pairs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", nargs="?", default=os.environ.get("MOONLIGHT_DIR", "bench/checkpoints/moonlight"),
                        help="The checkpoint: written there when missing (16.6 GB), read with --kl-source (default "
                        "$MOONLIGHT_DIR, else bench/checkpoints/moonlight).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights written (0).")
    parser.add_argument("--bench", metavar="ENGINE", help="Measure this engine instead (decode b1/b8, TTFT of 512 "
                        "tokens, roofline); prints one JSON object.")
    parser.add_argument("--kl-source", metavar="ENGINE", help="Split this quantized engine's KL divergence from the "
                        "checkpoint (DIRECTORY) into the weights' rounding and the engine's arithmetic; one JSON object.")
    parser.add_argument("--sequences", type=int, help="With --kl-source: sequences of verify's prompt set (6).")
    parser.add_argument("--also", nargs="*", default=(), choices=("int8", "int4"), help="With --kl-source: the KL "
                        "a build of these schemes would have from its rounding alone.")
    args = parser.parse_args(argv)
    if (args.also or args.sequences is not None) and not args.kl_source:
        parser.error("--also and --sequences go with --kl-source ENGINE")
    args.sequences = 6 if args.sequences is None else args.sequences
    if args.sequences < 1:
        parser.error(f"--sequences must be at least 1, got {args.sequences}")
    if args.kl_source:
        from moetrt.errors import MoetrtError

        try:
            split = kl_sources(args.kl_source, args.directory, args.sequences, tuple(args.also))
        except MoetrtError as error:
            parser.exit(2, f"{parser.prog}: {error}\n")
        print(json.dumps(split, indent=1))
        return 0
    if args.bench:
        print(json.dumps(bench_engine(args.bench), indent=1))
        return 0
    if (Path(args.directory) / "config.json").is_file():
        print(f"{args.directory} is already there")
        return 0
    write_moonlight(args.directory, seed=args.seed)
    print(f"wrote {args.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
