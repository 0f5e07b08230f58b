"""The arithmetic task: scratchpad targets, answers, the train/held-out split, and no torch import."""

import subprocess
import sys

import pytest

from moetrt.tasks import arithmetic
from moetrt.tasks.arithmetic import Problem, completion, draw_problems, iter_problems, parse_answer, split_of


def test_addition_scratchpad_works_column_by_column_with_carries():
    assert completion(Problem(4827, "+", 593)) == (
        "4827+593\n"
        "7+3+0=10\n482+59 c1 0\n"
        "2+9+1=12\n48+5 c1 20\n"
        "8+5+1=14\n4+ c1 420\n"
        "4+0+1=05\n+ c0 5420\n"
        "</think>\n\n4827 + 593 = 5420"
    )


def test_subtraction_scratchpad_borrows_ten_up_front():
    assert arithmetic.thinking(Problem(100, "-", 99)) == (
        "100-99\n10-9-0=01\n10-9 c1 1\n10-9-1=00\n1- c1 01\n11-0-1=10\n- c0 001\n"
    )


def test_multiplication_scratchpad_ends_with_the_last_carry():
    assert arithmetic.thinking(Problem(95, "*", 7)) == "95*7\n5*7+0=35\n9*7 c3 5\n9*7+3=66\n*7 c6 65\n0*7+6=06\n*7 c0 665\n"


def test_every_target_states_the_right_answer():
    for problem in draw_problems(3000, seed=1, split="train"):
        text = completion(problem)
        assert parse_answer(text) == problem.answer, problem
        assert int(text.split("</think>")[0].split()[-1]) == problem.answer, problem  # the scratchpad's result


@pytest.mark.parametrize(
    "text, answer",
    [("4+ c0 5\n</think>\n\n1 + 4 = 5", 5), ("x</think>\n\n7 - 9 = -2", -2), ("no thinking end 5", None), ("</think> none", None)],
)
def test_parse_answer_reads_the_last_number_after_the_thinking(text, answer):
    assert parse_answer(text) == answer


def test_held_out_problems_are_never_drawn_for_training():
    train = [p for p, _ in zip(iter_problems(0, "train"), range(50_000))]
    held_out = draw_problems(5_000, seed=0, split="eval") + draw_problems(5_000, seed=7, split="eval")
    assert all(split_of(p) == "train" for p in train)
    assert all(split_of(p) == "eval" for p in held_out)
    assert not {p.key for p in train} & {p.key for p in held_out}


def test_held_out_share_is_about_ten_percent():
    problems = [arithmetic.draw_problem(__import__("random").Random(i)) for i in range(20_000)]
    share = sum(split_of(p) == "eval" for p in problems) / len(problems)
    assert 0.08 < share < 0.12


def test_draws_are_reproducible_and_seeds_differ():
    assert draw_problems(50, seed=3, split="eval") == draw_problems(50, seed=3, split="eval")
    assert draw_problems(50, seed=3, split="eval") != draw_problems(50, seed=4, split="eval")
    assert len({p.key for p in draw_problems(500, seed=0, split="eval")}) == 500


def test_problems_cover_every_operator_and_subtraction_stays_non_negative():
    problems = draw_problems(2000, seed=0, split="train")
    assert {p.op for p in problems} == set(arithmetic.OPERATORS)
    assert all(p.answer >= 0 for p in problems)
    assert all(p.b < 10 for p in problems if p.op == "*")
    assert max(len(str(p.a)) for p in problems) == arithmetic.MAX_DIGITS


def test_task_modules_import_without_torch():
    code = (
        "import sys, moetrt.tasks.arithmetic, moetrt.tasks.evaluate, moetrt.tasks.chat; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
