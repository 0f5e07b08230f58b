"""Train `models/tiny-r1`: a small DeepSeek-V3-architecture model that answers arithmetic R1-style.

It writes a Hugging Face checkpoint (config.json, model.safetensors with the real DeepSeek key names, a
byte-level tokenizer with one token per digit, DeepSeek-R1's chat template, generation_config.json).
The model is moetrt's own reference model, trained on generated problems of the train split
(`moetrt.tasks.arithmetic`) with DeepSeek-V3's auxiliary-loss-free load balancing. Reproducible from
`--seed` on the CPU; `make train-tiny` runs it.

    python models/train_tiny_r1.py --out models/tiny-r1 [--seed 0] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Spinning OpenMP threads collapse throughput when other processes share the cores; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from moetrt.config import parse_config
from moetrt.export.reference_session import evaluate_checkpoint
from moetrt.export.model import MoE, DeepseekForCausalLM, checkpoint_key
from moetrt.progress import note, stage
from moetrt.tasks import arithmetic
from moetrt.tasks.chat import ChatTokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT_TOKENS = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")

# DeepSeek-R1's chat template (tokenizer_config.json of deepseek-ai/DeepSeek-R1 after its <think> update):
# earlier assistant turns keep only what follows </think>; the generation prompt opens the thinking.
CHAT_TEMPLATE = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}"
    r"{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    r"{{bos_token}}{{ns.system_prompt}}"
    r"{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    r"{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    r"tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + "
    r"'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    r"{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + "
    r"'\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    r"{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    r"{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    r"{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    r"{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}{%- else %}"
    r"{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    r"{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %}"
)

# Loss weight of computed tokens; in a 1200-step trial (5-digit operands) it lifted held-out accuracy from 60% to 84%.
VALUE_WEIGHT = 3.0
DECAY_SHARE = 0.3
VOCAB_SIZE = 264  # 2 + 256 bytes + 4 chat tokens = 262 used, rounded up to a multiple of 8

# DeepSeek-V3's architecture at toy size: MLA with q-LoRA, a dense first layer, then MoE layers with
# sigmoid group-limited routing (4 groups of 2 experts, tokens pick from the best 2 groups) and a shared expert.
CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 96,
    "intermediate_size": 288,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 64,
    "kv_lora_rank": 48,
    "qk_nope_head_dim": 24,
    "qk_rope_head_dim": 16,
    "v_head_dim": 24,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,  # DeepSeek-V3's multi-token-prediction module, a speculative decoder
    "bos_token_id": 0,
    "eos_token_id": 1,
    "use_cache": True,
    "torch_dtype": "float32",
    "moetrt_task": "arithmetic",  # what `moetrt verify` checks task accuracy on
}

# DeepSeek-R1's recommended sampling; eval and the acceptance numbers use greedy decoding.
GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}


def _special(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": _special(BOS),
    "eos_token": _special(EOS),
    "pad_token": _special(EOS),
    "unk_token": None,
    "clean_up_tokenization_spaces": False,
    "legacy": True,
    "model_max_length": CONFIG["max_position_embeddings"],
    "tokenizer_class": "PreTrainedTokenizerFast",
    "chat_template": CHAT_TEMPLATE,
}


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255, in byte order (what ByteLevel pre-tokenises to)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    codes, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            codes[byte] = byte
        else:
            codes[byte] = 256 + extra
            extra += 1
    return [chr(codes[byte]) for byte in range(256)]


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: every byte, so every digit, is one token; chat markers are added tokens."""
    vocab = {BOS: 0, EOS: 1}
    for symbol in [*byte_alphabet(), *CHAT_TOKENS]:
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 0)]
            ),
        ]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (BOS, EOS)])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in CHAT_TOKENS])
    return tokenizer


def write_tokenizer(directory: Path) -> None:
    build_tokenizer().save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", TOKENIZER_CONFIG)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ---- data


def weighted_segments(completion: str) -> list[tuple[str, float]]:
    """The completion cut into pieces with their loss weight. What follows an `=` (a column's value, the final
    answer) is computed; the rest is copied from the line above, which the model learns quickly."""
    segments = []
    for line in completion.splitlines(keepends=True):
        head, equals, value = line.partition("=")
        segments += [(head + equals, 1.0), (value, VALUE_WEIGHT)] if equals else [(line, 1.0)]
    return segments


def encode_example(chat: ChatTokenizer, problem: arithmetic.Problem) -> tuple[list[int], int, list[float]]:
    """Token ids of prompt + R1-style completion + EOS, the prompt length (no loss there) and the completion's
    per-token loss weights."""
    prompt = chat.prompt_ids(problem.question)
    target, weights = [], []
    for text, weight in weighted_segments(arithmetic.completion(problem)):
        ids = chat.encode(text)
        target += ids
        weights += [weight] * len(ids)
    return prompt + target + [CONFIG["eos_token_id"]], len(prompt), weights + [1.0]


def training_batches(chat: ChatTokenizer, seed: int, batch_size: int, pool: int = 32) -> Iterator[dict]:
    """Endless batches of train-split problems; a pool of `pool` batches is sorted by length to cut padding."""
    problems = arithmetic.iter_problems(seed, "train")
    rng = random.Random(seed)
    while True:
        examples = sorted((encode_example(chat, next(problems)) for _ in range(pool * batch_size)), key=lambda e: len(e[0]))
        batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
        rng.shuffle(batches)
        yield from (collate(batch) for batch in batches)


def collate(examples: list[tuple[list[int], int, list[float]]]) -> dict:
    """Right-padded input ids `[B, L]`, next-token labels and their loss weights (0 outside completions),
    and the real-token mask."""
    width = max(len(tokens) for tokens, _, _ in examples)
    ids = torch.full((len(examples), width), CONFIG["eos_token_id"], dtype=torch.long)
    labels = torch.zeros((len(examples), width), dtype=torch.long)
    weights = torch.zeros((len(examples), width))
    real = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, (tokens, prompt_len, target_weights) in enumerate(examples):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, prompt_len - 1 : len(tokens) - 1] = torch.tensor(tokens[prompt_len:])
        weights[row, prompt_len - 1 : len(tokens) - 1] = torch.tensor(target_weights)
        real[row, : len(tokens)] = True
    return {"ids": ids, "labels": labels, "weights": weights, "real": real}


# ---- model and training


def init_model(seed: int) -> DeepseekForCausalLM:
    torch.manual_seed(seed)
    config = parse_config(CONFIG)
    model = DeepseekForCausalLM(config, mtp_layers=config.num_nextn_predict_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, CONFIG["initializer_range"])
    return model.train()


class BiasBalancer:
    """DeepSeek-V3's auxiliary-loss-free balancing of each MoE layer's expert load.

    Forward hooks count the experts each real token selects; after the optimiser step the selection bias
    `e_score_correction_bias` moves by `gamma * sign(mean load - load)`: up for under-loaded experts.
    """

    def __init__(self, model: DeepseekForCausalLM, gamma: float):
        self.gamma = gamma
        layers = [*model.model.layers, *model.mtp]
        self.routers = [layer.mlp.gate for layer in layers if isinstance(layer.mlp, MoE)]
        experts = model.config.n_routed_experts
        self.loads = [torch.zeros(experts) for _ in self.routers]
        self.real: torch.Tensor | None = None  # flat `[B*L]` mask of the batch being run
        for index, router in enumerate(self.routers):
            router.register_forward_hook(self._counter(index))

    def _counter(self, index: int):
        def count(module, inputs, output) -> None:
            if self.real is not None:
                topk_ids = output[0][self.real]  # [T_real, k]
                self.loads[index] += torch.bincount(topk_ids.flatten(), minlength=len(self.loads[index]))

        return count

    @torch.no_grad()
    def update(self) -> float:
        """Nudge the biases from this step's loads; returns the worst layer's max/mean load."""
        worst = 0.0
        for router, load in zip(self.routers, self.loads):
            router.e_score_correction_bias += self.gamma * torch.sign(load.mean() - load)
            worst = max(worst, float(load.max() / load.mean()))
            load.zero_()
        return worst


def forward(model: DeepseekForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits `[B, L, vocab]` of the main model and, when it has an MTP module, the module's `[B, L, vocab]`
    (position i reads h_i and token i+1; the last position reads a padding token and is not scored)."""
    if not len(model.mtp):
        return model(ids), None
    batch, width = ids.shape
    following = torch.cat([ids[:, 1:], torch.full((batch, 1), CONFIG["eos_token_id"], dtype=ids.dtype)], dim=1)
    positions = torch.arange(width).expand(batch, width)
    mask = torch.ones(batch, width, dtype=torch.int64)
    logits, _, _, mtp_logits = model.speculative_step(
        ids, positions, mask, model.empty_cache(batch), positions, following, mask, model.empty_cache(batch)[0],
        positions)
    return logits, mtp_logits


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits `[B, L, vocab]` against labels `[B, L]`, averaged with per-token `weights`."""
    token_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return (token_loss * weights.flatten()).sum() / weights.sum()


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, constant, then a linear decay to a tenth over the last DECAY_SHARE of the steps: the
    model learns in jumps (copying, then each table), and a long stretch at the peak rate reaches them sooner."""
    decay_start = int(steps * (1 - DECAY_SHARE))
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < decay_start:
        return peak
    return peak * (1 - 0.9 * (step - decay_start) / max(1, steps - decay_start))


def train(model: DeepseekForCausalLM, chat: ChatTokenizer, args: argparse.Namespace) -> dict:
    """Run `args.steps` AdamW steps; returns a summary (final loss, tokens, seconds)."""
    balancer = BiasBalancer(model, args.gamma)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    batches = training_batches(chat, args.seed, args.batch_size)
    start, tokens, recent = time.perf_counter(), 0, []
    with stage("training tiny-r1", total=args.steps) as advance:
        for step in range(args.steps):
            batch = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
            balancer.real = batch["real"].flatten()
            logits, mtp_logits = forward(model, batch["ids"])  # [B, L, vocab] each
            balancer.real = None
            loss = weighted_loss(logits, batch["labels"], batch["weights"])
            if mtp_logits is not None:
                # DeepSeek-V3's MTP loss (arXiv:2412.19437 eq. 24-25): the MTP module at position i predicts
                # t_{i+2}, i.e. the next position's label; its mean cross-entropy joins the loss times lambda.
                labels, weights = batch["labels"][:, 1:], batch["weights"][:, 1:]
                loss = loss + args.mtp_lambda * weighted_loss(mtp_logits[:, :-1], labels, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            imbalance = balancer.update()
            tokens += int(batch["real"].sum())
            recent = (recent + [loss.item()])[-50:]
            advance(1, f"training tiny-r1: loss {sum(recent) / len(recent):.4f}")
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                elapsed = time.perf_counter() - start
                note(
                    f"step {step + 1}/{args.steps}  loss {sum(recent) / len(recent):.4f}  "
                    f"max/mean expert load {imbalance:.2f}  {tokens / elapsed:,.0f} tok/s  {elapsed / 60:.1f} min"
                )
    return {"loss": sum(recent) / len(recent), "tokens": tokens, "seconds": time.perf_counter() - start}


# ---- checkpoint


def hf_state_dict(model: DeepseekForCausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face DeepSeek names: stacked experts split into per-expert keys."""
    tensors = {}
    inter = model.config.moe_intermediate_size
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for expert, weight in enumerate(tensor):
                tensors[f"{prefix}{expert}.gate_proj.weight"] = weight[:inter]
                tensors[f"{prefix}{expert}.up_proj.weight"] = weight[inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for expert, weight in enumerate(tensor):
                tensors[f"{prefix}{expert}.down_proj.weight"] = weight
        else:
            tensors[name] = tensor
    for depth in range(len(model.mtp)):  # DeepSeek-V3 stores copies of the shared embedding and head per MTP layer
        prefix = f"model.layers.{model.config.num_hidden_layers + depth}."
        tensors[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight
        tensors[prefix + "shared_head.head.weight"] = model.lm_head.weight
    return {checkpoint_key(model.config, name): tensor.detach().float().contiguous().clone()
            for name, tensor in tensors.items()}


def write_model_card(directory: Path, args: argparse.Namespace, summary: dict) -> None:
    c = CONFIG
    card = f"""# tiny-r1

A {c['num_hidden_layers']}-layer DeepSeek-V3-architecture model ({c['n_routed_experts']} routed experts +
{c['n_shared_experts']} shared per MoE layer, MLA with q-LoRA, sigmoid group-limited routing) trained by
`models/train_tiny_r1.py` to answer arithmetic (`+` and `-`, operands up to {arithmetic.MAX_DIGITS} digits) in
DeepSeek-R1's format: a digit-by-digit scratchpad inside `<think>...</think>`, then the answer.

- DeepSeek-V3's multi-token-prediction module (`model.layers.{c['num_hidden_layers']}`: enorm, hnorm, eh_proj, one
  MoE decoder block, shared_head), trained with the model (MTP loss weight {args.mtp_lambda}); `moetrt build-engine
  --mtp` keeps it for `--speculative mtp` (docs/speculative-decoding.md)
- trained: `python models/train_tiny_r1.py --seed {args.seed} --steps {args.steps} --batch-size {args.batch_size}`,
  {summary['tokens']:,} tokens, final loss {summary['loss']:.4f}, {summary['seconds'] / 60:.1f} min on {args.threads} CPU threads
- held-out greedy accuracy at the end of training: {summary['accuracy']:.1%} on {summary['eval_n']} problems
  (`moetrt eval models/tiny-r1 --task arithmetic --num-problems 500` measures it)
- problems whose sha256 falls in the held-out {arithmetic.HELD_OUT_PERCENT}% are never trained on

Limits: it knows only the training format, a user turn "What is A + B?" or "What is A - B?" with A >= B (no
negative answers), spaces around the operator, no system prompt, one turn; other inputs (`1+1`, `3 - 7`, a system
prompt, a second turn, an assistant prefill) get confident wrong answers. Accuracy is not even across kinds: the
headline figure averages over operand sizes, and 4-digit minus 4-digit problems with borrows are the weakest.
"""
    (directory / "README.md").write_text(card)


def write_checkpoint(model: DeepseekForCausalLM, directory: Path) -> None:
    save_file(hf_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(directory / "model.safetensors", 0o644)  # safetensors writes 0600; the checkpoint is for sharing
    _write_json(directory / "config.json", CONFIG)
    _write_json(directory / "generation_config.json", GENERATION_CONFIG)


def replace_directory(temp: Path, out: Path) -> None:
    """Move the finished checkpoint into place; an old one is removed only after the new one is complete."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    temp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/tiny-r1"), help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--gamma", type=float, default=1e-3, help="bias update speed of the load balancing")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed for reproducibility)")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out problems to check after training")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--mtp-lambda", type=float, default=0.3,
                        help="weight of the MTP loss (DeepSeek-V3 used 0.3, then 0.1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        write_tokenizer(temp)
        chat = ChatTokenizer.load(temp)
        model = init_model(args.seed)
        summary = train(model, chat, args)
        write_checkpoint(model.eval(), temp)
        report = evaluate_checkpoint(temp, "arithmetic", n=args.eval_n, seed=args.seed)
        summary.update(accuracy=report.accuracy, eval_n=report.n)
        write_model_card(temp, args, summary)
        replace_directory(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    print(
        f"wrote {out}: {summary['seconds'] / 60:.1f} min training, final loss {summary['loss']:.4f}, "
        f"held-out accuracy {report.accuracy:.1%} on {report.n} problems ({summary['tokens']:,} tokens)"
    )


if __name__ == "__main__":
    sys.exit(main())
