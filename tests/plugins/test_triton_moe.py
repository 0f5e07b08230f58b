"""The Triton routed experts against routed_experts_reference under Triton's CPU interpreter, on awkward random shapes.

The cases run in two worker processes (tests/plugins/interpret_worker.py): TRITON_INTERPRET must be set before
triton is imported, which this pytest process may already have done without it.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from moetrt.plugins.moe_launch import GemmTile, TileConfig

ROOT = Path(__file__).resolve().parents[2]
# fp32 and fp32-compute cases must meet 1e-5. The interpreter rounds fp32 -> bf16 by truncation (a GPU rounds
# to nearest), so bf16 gets twice the error it has on a GPU.
TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}


def awkward_size(rng: random.Random) -> int:
    """3..192, never a multiple of 16, so every block size leaves a ragged tail."""
    return rng.choice([n for n in range(3, 193) if n % 16])


def block_config(rng: random.Random, rows: int) -> dict:
    # Big tiles for big cases: the interpreter pays per program, not per element.
    block_m = 64 if rows > 1000 else rng.choice([16, 32, 64])
    tile = lambda: GemmTile(rng.choice([32, 64, 128]), rng.choice([32, 64, 128]))  # noqa: E731
    return TileConfig(block_m, tile(), tile(), group_m=rng.choice([1, 4, 8])).to_dict()


def shape_fields(tokens, hidden, inter, experts, top_k, dtype) -> dict:
    return dict(num_tokens=tokens, hidden=hidden, inter=inter, num_experts=experts, top_k=top_k, act_dtype=dtype,
                weight_dtype=dtype)


def make_case(index, rng, tokens, experts, top_k, act_dtype="float32", weight_dtype=None, auto_config=False):
    shape = dict(
        num_tokens=tokens,
        hidden=awkward_size(rng),
        inter=awkward_size(rng),
        num_experts=experts,
        top_k=top_k,
        act_dtype=act_dtype,
        weight_dtype=weight_dtype or act_dtype,
    )
    config = None if auto_config else block_config(rng, tokens * top_k)
    skew = rng.choice([0.0, 0.0, 3.0])  # skew leaves experts empty and gives others long runs
    name = f"{index:02d}-T{tokens}-E{experts}-k{top_k}-H{shape['hidden']}-I{shape['inter']}-{act_dtype}"
    if weight_dtype:
        name += f"-w{weight_dtype}"
    return dict(id=name, shape=shape, config=config, seed=index, skew=skew)


def cases() -> list[dict]:
    rng = random.Random(2024)
    corners = [(1, 4, 1), (1, 64, 8), (300, 64, 8), (300, 4, 4), (2, 64, 8), (129, 13, 1), (7, 5, 5), (64, 32, 8)]
    specs = corners + [(rng.randint(1, 300), e, rng.randint(1, min(8, e))) for e in rng.choices(range(4, 65), k=14)]
    listed = [make_case(i, rng, *spec) for i, spec in enumerate(specs)]
    listed.append(make_case(len(listed), rng, 40, 16, 6, auto_config=True))  # the shipped default table
    listed.append(make_case(len(listed), rng, 200, 8, 2, auto_config=True))
    listed[-1]["form"] = "public"
    extra = [("float16", None), ("float16", None), ("bfloat16", None), ("bfloat16", None)]
    extra += [("float32", "bfloat16"), ("bfloat16", "float32")]  # mixed: computed in fp32, as the reference does
    for act_dtype, weight_dtype in extra:
        spec = (rng.randint(1, 120), rng.randint(4, 32), rng.randint(1, 4))
        listed.append(make_case(len(listed), rng, *spec, act_dtype=act_dtype, weight_dtype=weight_dtype))
    return listed


CASES = cases()
# The GPU tests' checks (tests/plugins/gpu) at tiny shapes: two runs from poisoned buffers bitwise equal, the four
# stage nodes chained as an engine runs them, and each stage kernel on garbage.
TWICE_CASES = [
    dict(id=f"twice-{dtype}-T{tokens}", shape=shape_fields(tokens, hidden, inter, experts, top_k, dtype), config=None,
         seed=seed, skew=0.0, form="twice")
    for seed, (tokens, hidden, inter, experts, top_k, dtype) in enumerate(
        [(1, 40, 24, 4, 2, "float32"), (37, 72, 40, 8, 3, "bfloat16")]
    )
]
# The stage nodes with the attribute the `trt` lowering writes (decode tiles of 16 rows, prefill tiles of 64, one
# layout of 64-row blocks): below and above the switch to the prefill tiles (T=86 here), each also with one GEMM
# stage on the other tactic.
STAGE_NODE_CASES = [
    dict(id=f"stage-nodes-T{tokens}", shape=shape_fields(tokens, 40, 24, 8, 3, "float32"), config=None,
         seed=7 + tokens, skew=3.0, form="stage_nodes")
    for tokens in (1, 9, 100)
]
# Each stage kernel alone on arbitrary alignment buffers and ids (TensorRT's autotuner), in guarded buffers; run in
# a process of its own, since an access far outside a buffer kills the interpreter.
GARBAGE_CASES = [
    dict(id=f"garbage-{dtype}", shape=shape_fields(5, 40, 24, 8, 3, dtype), config=None, seed=0, skew=0.0,
         form="garbage")
    for dtype in ("float32", "bfloat16")
]


@pytest.fixture(scope="module")
def results() -> dict:
    """Runs every case in two interpreter processes at once (one per core on CI)."""
    every = CASES + TWICE_CASES + STAGE_NODE_CASES
    halves = [every[0::2], every[1::2]]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.plugins.interpret_worker"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in halves
    ]
    merged = {}
    for worker, half in zip(workers, halves):
        out, err = worker.communicate(json.dumps(half), timeout=600)
        assert worker.returncode == 0, f"interpreter worker failed:\n{err[-4000:]}"
        merged.update(json.loads(out))
    return merged


def tolerance(case: dict) -> float:
    shape = case["shape"]
    if shape["act_dtype"] != shape["weight_dtype"]:  # computed in fp32; only the output rounding remains
        return TOLERANCE["float32"] if shape["act_dtype"] == "float32" else 1e-2
    return TOLERANCE[shape["act_dtype"]]


def test_cases_cover_the_required_ranges():
    shapes = [case["shape"] for case in CASES]
    assert {1, 300} <= {s["num_tokens"] for s in shapes}
    assert {4, 64} <= {s["num_experts"] for s in shapes}
    assert {1, 8} <= {s["top_k"] for s in shapes}
    assert all(s["hidden"] % 16 and s["inter"] % 16 and max(s["hidden"], s["inter"]) <= 192 for s in shapes)
    assert len(CASES) <= 32


def assert_passed(case: dict, results: dict) -> None:
    result = results[case["id"]]
    assert result["problems"] == []
    assert result["error"] <= tolerance(case), f"relative error {result['error']:.3g}"


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_triton_routed_experts_match_reference(case, results):
    assert_passed(case, results)


@pytest.mark.parametrize("case", TWICE_CASES, ids=[case["id"] for case in TWICE_CASES])
def test_two_runs_from_poisoned_buffers_write_every_row_and_are_bitwise_equal(case, results):
    assert_passed(case, results)


@pytest.mark.parametrize("case", STAGE_NODE_CASES, ids=[case["id"] for case in STAGE_NODE_CASES])
def test_stage_nodes_chained_as_an_engine_runs_them_match_reference(case, results):
    assert_passed(case, results)


@pytest.mark.parametrize("case", GARBAGE_CASES, ids=[case["id"] for case in GARBAGE_CASES])
def test_stage_kernels_on_arbitrary_alignment_buffers_touch_nothing_outside_them(case):
    done = subprocess.run([sys.executable, "-m", "tests.plugins.interpret_worker"], cwd=ROOT, input=json.dumps([case]),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"the interpreter died (status {done.returncode}): a kernel dereferenced an address "
                                  f"far outside its buffers\n{done.stderr[-3000:]}")
    assert json.loads(done.stdout)[case["id"]]["problems"] == []


def test_routed_experts_module_imports_without_triton():
    """The model's call site (and so every export) works where Triton is missing."""
    script = ("import sys; sys.modules['triton'] = None; "
              "import moetrt.plugins.routed_experts as m; m.routed_experts; import moetrt.export.model")
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True)
