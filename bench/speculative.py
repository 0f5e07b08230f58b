"""`moetrt bench speculative` (`make bench-spec`): decode with and without DeepSeek-V3's MTP module drafting.

Per model, two engines from one checkpoint: a plain one and one built with `--mtp`. Measured side by side in one
run, in alternating rounds (the order reversed every other round, so slow drifts fall on both sides of a ratio):

- `plain`: the plain engine, one token per step (moetrt's decoding without speculation);
- `mtp`: the --mtp engine with `--speculative mtp` (its draft policy on, as a user gets it);
- `mtp always` (ds-mini only): the --mtp engine drafting at every step whatever the acceptance, which prices a
  speculative step: with acceptance near zero (random weights) its rate over plain's gives the break-even
  acceptance rate, rate_plain / rate_always - 1 (a step then yields one token, and a speculative step yields
  1 + acceptance).

Decode tokens/s counts the tokens after each row's first over the time from the first token to the last, summed over
a round's prompts (each prompt goes through every system in turn), at batch 1 and batch 8, greedy. tiny-r1 answers held-out arithmetic problems (its chat template; the scratchpad its MTP
module learned to predict); ds-mini continues random prompts of 16 tokens for 64 tokens. Before timing, each
speculative run's tokens must equal the plain run's (greedy decoding may differ only where the top-2 logit margin
is below 1e-3, which tiny-r1's trained and ds-mini's random logits do not reach here; a difference is reported).
Writes bench/results/speculative.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results"


def checkpoint(name: str) -> Path:
    """The model's checkpoint with an MTP layer: tiny-r1 (embedded), or ds-mini-mtp (written on first use)."""
    if name == "tiny-r1":
        return REPO / "models" / "tiny-r1"
    if name == "ds-mini":
        path = ROOT / "checkpoints" / "ds-mini-mtp"
        if not (path / "config.json").is_file():
            from moetrt.bench.ds_mini import write_ds_mini

            print("writing the ds-mini-mtp checkpoint (random, 3.6 GB fp32)...", file=sys.stderr)
            write_ds_mini(path, mtp=True)
        return path
    raise SystemExit(f"unknown model {name!r}: tiny-r1 or ds-mini")


def engine(source: Path, name: str, mtp: bool, rebuild: bool) -> Path:
    """bench/engines/<name>[-mtp]-spec, built once (ONNX Runtime, float32, the backend's default expert kernel)."""
    import shutil

    from moetrt.export.engine import build_engine

    out = ROOT / "engines" / f"{name}{'-mtp' if mtp else ''}-spec"
    if rebuild or not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        build_engine(source, out, backend="ort", mtp=mtp)
    return out


def prompts(name: str, loaded, count: int) -> list[list[int]]:
    """Prompt token ids: held-out arithmetic questions in the chat template (tiny-r1), random ids (ds-mini)."""
    if name == "tiny-r1":
        from moetrt.tasks import arithmetic

        problems = arithmetic.draw_problems(count, seed=1, split="eval")
        return [loaded.chat_prompt([{"role": "user", "content": p.question}]) for p in problems]
    from moetrt.bench.systems import prompts_for

    return prompts_for(loaded.session.vocab_size, count, 16, seed=1)


def decode(loaded, batch_prompts: list[list[int]], options, policy=None) -> dict:
    """One batch through generate.py's loop (or the speculative one): decode tokens/s after each row's first token,
    the tokens, and for speculative runs the drafts proposed/accepted and steps."""
    from moetrt.runtime.generate import _start_rows, _stream_batch, stream_speculative
    from moetrt.runtime.speculative import StepCounts

    rows = _start_rows(loaded.session, batch_prompts, options, loaded.tokenizer, loaded.max_context, None)
    counts = StepCounts()
    events = (stream_speculative(loaded.session, rows, options, counts, policy) if options.speculative
              else _stream_batch(loaded.session, rows, options))
    first = last = None
    tokens: list[list[int]] = [[] for _ in batch_prompts]
    started = 0
    for event in events:
        now = time.perf_counter()
        started += not tokens[event.row]
        tokens[event.row].extend(event.token_ids)
        if first is None and started == len(batch_prompts):
            first = now  # every row has its first token: the prefill is over
        last = now
    decoded = sum(len(t) - 1 for t in tokens)
    return {"seconds": (last - first) if first is not None and last is not None else 0.0, "decoded": decoded,
            "tokens": tokens, "proposed": counts.proposed, "accepted": counts.accepted, "steps": counts.row_steps}


def run_model(name: str, options) -> dict:
    from moetrt.runtime.engine import Engine
    from moetrt.runtime.speculative import DraftPolicy

    source = checkpoint(name)
    plain = Engine.load(engine(source, name, False, options.rebuild), threads=options.threads)
    drafting = Engine.load(engine(source, name, True, options.rebuild), threads=options.threads)
    new_tokens = 200 if name == "tiny-r1" else options.new_tokens
    base = dict(greedy=True, max_new_tokens=new_tokens)
    systems = {"plain": (plain, plain.options(**base), None),
               "mtp": (drafting, drafting.options(**base, speculative="mtp"), None)}
    if name != "tiny-r1":
        systems["mtp always"] = (drafting, drafting.options(**base, speculative="mtp"), "always")
    batches = {1: [[p] for p in prompts(name, plain, options.prompts)],
               8: [prompts(name, plain, 8 * max(1, options.prompts // 8))[i: i + 8]
                   for i in range(0, 8 * max(1, options.prompts // 8), 8)]}
    results: dict = {system: {str(b): [] for b in batches} for system in systems}
    # per system and batch: drafts proposed, accepted, row-steps (rows summed over steps), tokens after the first
    counts = {system: {str(b): [0, 0, 0, 0] for b in batches} for system in systems}
    mismatches = []
    for round_index in range(options.repeats):
        order = list(systems) if round_index % 2 == 0 else list(reversed(systems))
        for batch, groups in batches.items():
            seconds = {system: 0.0 for system in systems}
            decoded = {system: 0 for system in systems}
            for index, group in enumerate(groups):  # each group through every system in turn: drifts hit all
                outputs = {}
                for system in order:
                    loaded, opts, mode = systems[system]
                    policy = DraftPolicy(min_acceptance=0.0) if mode == "always" else None
                    got = decode(loaded, group, opts, policy)
                    seconds[system] += got["seconds"]
                    decoded[system] += got["decoded"]
                    c = counts[system][str(batch)]
                    c[0] += got["proposed"]
                    c[1] += got["accepted"]
                    c[2] += got["steps"]
                    c[3] += got["decoded"]
                    outputs[system] = got["tokens"]
                mismatches += [f"{name} batch {batch} {system} group {index}" for system in systems
                               if outputs[system] != outputs["plain"]]
            for system in systems:
                results[system][str(batch)].append(decoded[system] / seconds[system])
            print(f"{name} round {round_index + 1} batch {batch}: " + ", ".join(
                f"{s} {results[s][str(batch)][-1]:.1f} tok/s" for s in systems), file=sys.stderr)
    return {"model": name, "new_tokens": new_tokens, "rates": results, "counts": counts, "mismatches": mismatches}


def render(report: dict) -> str:
    lines = ["| model | batch | plain tok/s | mtp tok/s | mtp / plain | acceptance | tokens per row-step | "
             "always-draft tok/s | break-even acceptance |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for model in report["models"]:
        for batch in ("1", "8"):
            plain = statistics.median(model["rates"]["plain"][batch])
            mtp = statistics.median(model["rates"]["mtp"][batch])
            ratios = [m / p for m, p in zip(model["rates"]["mtp"][batch], model["rates"]["plain"][batch])]
            proposed, accepted, steps, tokens = model["counts"]["mtp"][batch]
            acceptance = f"{accepted / proposed:.1%}" if proposed else "n/a"
            per_step = f"{tokens / steps:.2f}" if steps else "n/a"
            always = breakeven = ""
            if "mtp always" in model["rates"]:
                rate = statistics.median(model["rates"]["mtp always"][batch])
                p_always, a_always = model["counts"]["mtp always"][batch][:2]
                always = f"{rate:.1f} (acceptance {a_always / max(1, p_always):.1%})"
                breakeven = f"{plain / rate - 1:.1%}"
            lines.append(f"| {model['model']} | {batch} | {plain:.1f} | {mtp:.1f} | {statistics.median(ratios):.2f} "
                         f"({min(ratios):.2f}-{max(ratios):.2f}) | {acceptance} | {per_step} | {always} | "
                         f"{breakeven} |")
        if model["mismatches"]:
            notes.append(f"{model['model']}: speculative tokens differ from plain ones in " +
                         "; ".join(model["mismatches"]))
    head = (f"Decode with and without MTP drafting ({report['threads']} threads, {report['repeats']} alternating "
            "rounds; medians, ratio ranges over rounds). `moetrt bench speculative`; see bench/speculative.py.\n\n")
    return head + "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else
                                             "\nGreedy tokens with MTP equal plain decoding's in every run.\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moetrt bench speculative", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny-r1,ds-mini")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    parser.add_argument("--prompts", type=int, default=8, help="batch-1 prompts per round (and batch-8 groups / 8)")
    parser.add_argument("--new-tokens", type=int, default=64, help="ds-mini tokens per prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the engines")
    parser.add_argument("--out", type=Path, default=RESULTS / "speculative.md")
    options = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    report = {"threads": options.threads, "repeats": options.repeats,
              "models": [run_model(name, options) for name in options.models.split(",")]}
    text = render(report)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(text)
    options.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
