"""The arithmetic task: scratchpad targets, answers, the train/held-out split, and no torch import."""

import subprocess
import sys

import pytest

from moetrt.tasks import arithmetic
from moetrt.tasks.arithmetic import Problem, completion, draw_problems, iter_problems, parse_answer, split_of


def test_addition_scratchpad_has_one_line_per_padded_column_then_the_result():
    assert completion(Problem(4827, "+", 593)) == (
        "4827+0593\n"
        "7+3+0=10\n"
        "2+9+1=12\n"
        "8+5+1=14\n"
        "4+0+1=05\n"
        "05420\n"
        "</think>\n\n4827 + 593 = 5420"
    )


def test_final_carry_leads_the_result():
    assert arithmetic.thinking(Problem(9999, "+", 1)).splitlines()[-1] == "10000"


def test_subtraction_scratchpad_borrows_ten_up_front():
    assert arithmetic.thinking(Problem(100, "-", 99)) == (
        "0100-0099\n10-9-0=01\n10-9-1=00\n11-0-1=10\n10-0-0=10\n00001\n"
    )


def test_every_scratchpad_of_an_operator_has_one_layout():
    for problem in draw_problems(500, seed=2, split="train"):
        lengths = [len(line) for line in arithmetic.thinking(problem).splitlines()]
        step = 8 if problem.op == "+" else 9
        assert lengths == [9, step, step, step, step, 5], problem


def test_every_target_states_the_right_answer():
    for problem in draw_problems(3000, seed=1, split="train"):
        text = completion(problem)
        assert parse_answer(text) == problem.answer, problem
        assert int(text.split("</think>")[0].split()[-1]) == problem.answer, problem  # the scratchpad's result


@pytest.mark.parametrize(
    "text, answer",
    [("00005\n</think>\n\n1 + 4 = 5", 5), ("x</think>\n\n7 - 9 = -2", -2), ("no thinking end 5", None), ("</think> none", None)],
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


def test_problems_cover_both_operators_and_subtraction_stays_non_negative():
    problems = draw_problems(2000, seed=0, split="train")
    assert {p.op for p in problems} == {"+", "-"}
    assert all(p.answer >= 0 for p in problems)
    assert max(len(str(p.a)) for p in problems) == arithmetic.MAX_DIGITS == 4


def test_task_modules_import_without_torch():
    code = (
        "import sys, moetrt.tasks.arithmetic, moetrt.tasks.evaluate, moetrt.tasks.chat; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
