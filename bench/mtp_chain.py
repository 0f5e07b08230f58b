"""Would more than one draft token per step pay? The acceptance of DeepSeek-V3's MTP module chained on itself.

moetrt drafts one token per step (`--draft-tokens 1`): the MTP module reads the main model's hidden state h_i and
the next token t_{i+1} and proposes t_{i+2} (export/model.py MultiTokenPrediction). A checkpoint with one MTP
module can propose a second token only by running the module again on its own output, as vLLM does for
`num_speculative_tokens` > 1 with DeepSeek's single module: link j reads the previous link's output state and draft,
at RoPE position i + j, attending to the module's cached rows up to i and the earlier links' rows, and proposes
t_{i+j+2}. The module was trained for the first link only (DeepSeek-V3 report, section 2.2: a depth-k module
reads depth k-1's state at the same position, and V3/R1 ship one), so whether the later links are right is
an empirical question, which this answers for a checkpoint, in torch, before any engine is built for it:

- greedy continuations of the prompts with the reference model (export/model.py, the checkpoint's MTP module);
- teacher-forced over each continuation, for every position whose first draft is right, the chain's later links,
  each scored only when the ones before it were right (a step's drafts are accepted up to the first miss).

It prints, per link, the conditional acceptance, and per K the expected tokens per step with K drafts (1 + the
sum over j <= K of the product of the first j acceptances, greedy). With a drafting step's cost c_K relative to a
plain step (`moetrt bench speculative` measures c_1), K drafts pay when tokens(K) / c_K exceeds tokens(1) / c_1.

    python -m moetrt.bench.mtp_chain [CHECKPOINT] [--links 3] [--prompts 24] [--new-tokens 96]

CHECKPOINT defaults to the embedded tiny-r1 (held-out arithmetic problems in its chat template); a checkpoint
without moetrt_task gets random prompts of 16 tokens. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def prompts_for(checkpoint: Path, config, count: int) -> list[list[int]]:
    """Held-out arithmetic questions in the chat template for a tiny-r1-style checkpoint (config.json moetrt_task
    "arithmetic" and a tokenizer), else `count` random prompts of 16 token ids."""
    task = json.loads((checkpoint / "config.json").read_text()).get("moetrt_task")
    if task == "arithmetic" and (checkpoint / "tokenizer.json").is_file():
        from moetrt.runtime.text import ChatEncoder
        from moetrt.tasks import arithmetic
        from moetrt.tasks.chat import ChatTokenizer

        encoder = ChatEncoder(ChatTokenizer.load(checkpoint))
        problems = arithmetic.draw_problems(count, seed=1, split="eval")
        return [encoder.encode([{"role": "user", "content": p.question}]) for p in problems]
    from moetrt.bench.systems import prompts_for as random_prompts

    return random_prompts(config.vocab_size, count, 16, seed=1)


def chain_acceptance(model, sequence: list[int], first: int, links: int) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced over `sequence` (prompt + greedy continuation, the continuation from index `first`): per
    link j (0 = the module's own draft), how often its draft was scored and right. Link j > 0 is scored only where
    links 0..j-1 were right. Returns (right `[links]`, scored `[links]`)."""
    ids = torch.tensor([sequence])
    n = len(sequence)
    x, _, (cos, sin, causal, scale) = model._run_layers(ids, None, None, None)
    hidden = model.model.norm(x, scale)
    module = model.mtp[0]
    following = torch.cat([ids[:, 1:], ids[:, -1:]], 1)
    state = module.combine(model.model.embed_tokens(following), hidden, scale)
    empty = torch.zeros(0, 1, model.config.latent_dim, dtype=hidden.dtype)
    out, rows = module(state, cos, sin, causal[None], empty, scale)
    drafts = model.lm_head(module.shared_head.norm(out, scale)).argmax(-1)[0]  # drafts[i] proposes t_{i+2}
    right, scored = np.zeros(links), np.zeros(links)
    for i in range(first - 1, n - 2):
        scored[0] += 1
        if int(drafts[i]) != sequence[i + 2]:
            continue
        right[0] += 1
        previous, draft, chain_rows = out[:, i : i + 1], drafts[i], []
        for j in range(1, links):
            if i + j + 2 >= n:
                break
            position = i + j
            linked = module.combine(model.model.embed_tokens(draft.view(1, 1)), previous, scale)
            past = torch.cat([rows[: i + 1], *chain_rows], 0)
            allowed = torch.ones(1, 1, past.shape[0] + 1, dtype=torch.bool)
            previous, row = module(linked, cos[:, position : position + 1], sin[:, position : position + 1], allowed,
                                   past, scale)
            draft = model.lm_head(module.shared_head.norm(previous, scale)).argmax(-1)[0, 0]
            scored[j] += 1
            if int(draft) != sequence[i + j + 2]:
                break
            right[j] += 1
            chain_rows.append(row)
    return right, scored


def measure(checkpoint: Path, links: int, prompts: int, new_tokens: int) -> dict:
    """Per-link acceptance and expected tokens per step for K = 1..links drafts (module docstring)."""
    from moetrt.export.checkpoint import load_reference
    from moetrt.export.reference_session import ReferenceSession
    from moetrt.progress import stage
    from moetrt.runtime.generate import GenerationOptions, generate

    model = load_reference(checkpoint, mtp=True)
    config = model.config
    greedy = GenerationOptions(max_new_tokens=new_tokens, stop_token_ids=tuple(config.eos_token_ids))  # greedy
    session = ReferenceSession(model)
    right, scored = np.zeros(links), np.zeros(links)
    with torch.no_grad(), stage("scoring chained drafts", total=prompts) as advance:
        for prompt in prompts_for(checkpoint, config, prompts):
            [continuation] = generate(session, [prompt], greedy)  # the reference model's greedy continuation
            r, s = chain_acceptance(model, prompt + continuation.token_ids, len(prompt), links)
            right, scored = right + r, scored + s
            advance()
    # None where nothing was scored (continuations too short, or ending early): not a measured 0%
    acceptance = [float(r / s) if s else None for r, s in zip(right, scored)]
    tokens = [1 + float(np.sum(np.cumprod(acceptance[:k]))) if None not in acceptance[:k] else None
              for k in range(1, links + 1)]
    return {"checkpoint": str(checkpoint), "links": links, "acceptance": acceptance,
            "scored": [int(s) for s in scored], "tokens_per_step": {str(k): t for k, t in enumerate(tokens, 1)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=str(REPO / "models" / "tiny-r1"),
                        help="Hugging Face checkpoint directory with an MTP module (default: the embedded tiny-r1).")
    parser.add_argument("--links", type=int, default=3, help="Drafts per step to score (the chain's length; 3).")
    parser.add_argument("--prompts", type=int, default=24, help="Prompts to continue (24).")
    parser.add_argument("--new-tokens", type=int, default=96, help="Greedy tokens per continuation (96).")
    args = parser.parse_args(argv)
    for name, value, least in (("--links", args.links, 1), ("--prompts", args.prompts, 1),
                               ("--new-tokens", args.new_tokens, 2)):
        if value < least:
            parser.error(f"{name} must be at least {least}, got {value}")
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").is_file():
        parser.error(f"{checkpoint} is not a checkpoint directory (no config.json)")
    if not json.loads((checkpoint / "config.json").read_text()).get("num_nextn_predict_layers"):
        parser.error(f"{checkpoint} has no MTP module (num_nextn_predict_layers is 0)")
    from moetrt.errors import MoetrtError

    try:
        result = measure(checkpoint, args.links, args.prompts, args.new_tokens)
    except MoetrtError as error:
        reason = str(error).removesuffix("; build without --mtp")  # the build's advice: no engine is built here
        parser.exit(2, f"{parser.prog}: cannot score {checkpoint}'s MTP module: {reason}\n")
    for j, (rate, count) in enumerate(zip(result["acceptance"], result["scored"]), 1):
        given = "the module's own" if j == 1 else ("given draft 1 was accepted" if j == 2 else
                                                   f"given drafts 1-{j - 1} were accepted")
        shown = "n/a" if rate is None else f"{rate:.1%}"
        print(f"draft {j}: accepted {shown} of {count} ({given})")
    for k, tokens in result["tokens_per_step"].items():
        print(f"K = {k}: {'n/a' if tokens is None else f'{tokens:.2f}'} tokens per step")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
