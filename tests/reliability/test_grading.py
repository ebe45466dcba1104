"""Grading stays bounded and hard to game: a policy under RL probes the grader for answers that
are slow to check (each one stalls a whole GRPO step) or lenient to accept (a free reward)."""

from __future__ import annotations

import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from components import grading
from components.addition import r1_completion
from components.rewards import accuracy_reward, format_reward, gold_parses, is_correct

BOUND_S = 0.5  # wall-clock seconds any refused answer may take to grade
THOUGHT = "12 + 30 = 42"


def _graded_fast_and_quietly(answer: str, capsys, caplog) -> None:
    """Grade answer every way it can arrive (bare, boxed, as a completion, as gold) and assert
    each is wrong, within BOUND_S, and never echoed to stdout, stderr or the logs."""
    completion = r1_completion("t", answer)
    with caplog.at_level(logging.DEBUG):
        for task in ("math", "gsm8k"):
            for grade, args in ((is_correct, (answer, "1", task)),
                                (is_correct, (f"\\boxed{{{answer}}}", "1", task)),
                                (accuracy_reward, ([completion], ["1"], [task])),
                                (gold_parses, (answer, task))):
                start = time.perf_counter()
                result = grade(*args)
                elapsed = time.perf_counter() - start
                assert result in (False, [0.0]) and elapsed <= BOUND_S, (grade, task, elapsed)
    out, err = capsys.readouterr()
    assert answer not in out and answer not in err and answer not in caplog.text


def test_tower_of_exponents_is_refused_fast(capsys, caplog):
    """A tower of exponents (9^9^9^9, braced or chained) grades wrong in 0.5 s, unparsed and unlogged."""
    _graded_fast_and_quietly("9^{9^{9^{9}}}", capsys, caplog)
    _graded_fast_and_quietly("2^2^2^2^2^2", capsys, caplog)


def test_3000_nested_parentheses_are_refused_fast(capsys, caplog):
    """An answer nested 3,000 parentheses deep grades wrong in 0.5 s, unparsed and unlogged."""
    _graded_fast_and_quietly("(" * 3000 + "1" + ")" * 3000, capsys, caplog)


def test_40000_character_sum_is_refused_fast(capsys, caplog):
    """A 40,000-character sum grades wrong in 0.5 s, unparsed and unlogged."""
    answer = "1+" * 19999 + "10"
    assert len(answer) == 40_000
    _graded_fast_and_quietly(answer, capsys, caplog)


def test_huge_factorial_and_power_are_refused_fast(capsys, caplog):
    """A factorial or power of a huge literal (1000000!, 99!!, 9^999999999) grades wrong in 0.5 s,
    unparsed and unlogged."""
    for answer in ("1000000!", "99!!", "9^{999999999}", "(x+y+z)^{99}"):
        _graded_fast_and_quietly(answer, capsys, caplog)


def test_deeply_nested_fractions_are_refused_fast(capsys, caplog):
    """A \\frac nested 12 deep (short enough to pass the length cap) or 200 deep grades wrong in
    0.5 s, unparsed and unlogged."""
    for depth in (12, 200):
        _graded_fast_and_quietly("\\frac{1}{" * depth + "2" + "}" * depth, capsys, caplog)


def test_main_thread_timer_cuts_a_slow_admitted_answer():
    """An answer that passes every cheap check but parses slowly is cut by the CPU timer on the
    main thread, which then restores the signal handler it borrowed."""
    answer = "(((" + "+".join(["(1)"] * 13) + ")))"  # 1.6 s of CPU to parse untimed
    assert not grading._too_costly(answer)
    handler = signal.getsignal(signal.SIGPROF)
    start = time.process_time()
    assert not is_correct(answer, "1", "math")
    assert time.process_time() - start <= grading.GRADE_SECONDS + 0.3
    assert signal.getsignal(signal.SIGPROF) is handler
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


def test_math_verify_log_lines_never_quote_the_answer(caplog):
    """math-verify's log lines keep their event but lose the answer they quote and its traceback."""
    answer = "7" * 5000
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("math_verify.parser").warning(f"Timeout during parsing: {answer}")
        try:
            raise ValueError(answer)
        except ValueError:
            logging.getLogger("math_verify.parser").debug(f"Error parsing: {answer}", exc_info=True)
        logging.getLogger("math_verify.grader").warning("Timeout is disabled as timeout_seconds is None")
    assert [r.getMessage() for r in caplog.records] == ["Timeout during parsing", "Error parsing"]
    assert answer not in caplog.text


def test_several_answer_tags_earn_no_accuracy():
    """Several <answer> tags (a hedge) earn accuracy 0 and format 0, while one tag earns both."""
    hedge = "<think>a</think><answer>41</answer><answer>42</answer>"
    single = "<think>a</think><answer>42</answer>"
    assert accuracy_reward([hedge, single], ["42"] * 2, ["gsm8k"] * 2) == [0.0, 1.0]
    assert format_reward([hedge, single]) == [0.0, 1.0]


def test_answer_outside_the_tags_earns_no_accuracy():
    """An answer without tags, or written after </answer>, earns accuracy 0 and format 0."""
    completions = ["The answer is 42.", "<think>a</think>\\boxed{42}",
                   "<think>a</think><answer>I am not sure</answer> The answer is 42.",
                   "<think>a</think><answer>42</answer> or maybe 41"]
    n = len(completions)
    assert accuracy_reward(completions, ["42"] * n, ["math"] * n) == [0.0] * n
    assert format_reward(completions) == [0.0] * n


def test_answer_tags_inside_think_earn_no_accuracy():
    """An <answer> inside <think> does not count: accuracy 0 and format 0."""
    completions = ["<think>so <answer>42</answer></think>",
                   "<think>so <answer>42</answer></think><answer>42</answer>",
                   "<think>so</think><think>more <answer>42</answer>"]
    n = len(completions)
    assert accuracy_reward(completions, ["42"] * n, ["gsm8k"] * n) == [0.0] * n
    assert format_reward(completions) == [0.0] * n


def test_two_different_boxed_values_earn_no_accuracy():
    """Two different \\boxed values in one answer earn accuracy 0 (format 1: R1's format holds),
    while the same value boxed twice still earns accuracy 1."""
    hedges = [r1_completion("t", "\\boxed{41}. Or rather \\boxed{42}"),  # math-verify takes the last
              r1_completion("t", "\\boxed{41} or \\boxed{42}"),
              r1_completion("t", "\\boxed{\\boxed{42}}")]
    repeat = r1_completion("t", "\\boxed{42} = \\boxed{ 42 }")
    assert accuracy_reward([*hedges, repeat], ["42"] * 4, ["math"] * 4) == [0.0, 0.0, 0.0, 1.0]
    assert format_reward([*hedges, repeat]) == [1.0] * 4
    assert not is_correct("\\boxed{41} or \\boxed{42}", "42", "math")  # a set, not 42


def test_boxes_differ_by_value_not_by_notation():
    """Boxes that the grader finds equal are one answer, whatever their notation; different
    values, a box inside a box, or more than MAX_BOXES forms stay a hedge, and costly boxes are
    refused as fast as one."""
    same = [("\\boxed{055}, that is \\boxed{\\textbf{(55)}}", "55"), ("\\boxed{1/2} = \\boxed{0.5}", "\\frac{1}{2}"),
            ("So $x = \\boxed{7}$.\n\nAnswer: \\boxed{7.0}", "7"), ("\\boxed{(B)} \\boxed{B}", "B")]
    different = [("\\boxed{1/3} or \\boxed{0.33}", "\\frac{1}{3}"), ("\\boxed{55} or \\boxed{\\textbf{(56)}}", "55"),
                 ("\\boxed{41 \\boxed{42}}", "42"),
                 ("".join(f"\\boxed{{{v}}}" for v in ("42", "042", "0042", "42.0", "\\textbf{42}")), "42")]
    for answer, gold in same:
        assert grading.committed(answer) and is_correct(answer, gold, "math"), answer
        assert accuracy_reward([r1_completion("t", answer)], [gold], ["math"]) == [1.0], answer
    for answer, gold in different:
        assert not grading.committed(answer), answer
        assert accuracy_reward([r1_completion("t", answer)], [gold], ["math"]) == [0.0], answer
    tower = "9^{9^{9^{9}}}"
    start = time.perf_counter()
    assert not grading.committed(f"\\boxed{{{tower}}} \\boxed{{1}}") and time.perf_counter() - start <= BOUND_S


def test_echoed_prompt_numbers_earn_no_accuracy():
    """The prompt's numbers handed back as a calculation ("12 + 30" for 42) earn accuracy 0 on
    gsm8k and math (format 1: R1's format holds), while Countdown's expression answers still count."""
    for echo in ("12 + 30", "(12+30)", "12 \\times 3.5", "84/2", "\\frac{84}{2}", "2^{5}+10"):
        completion = r1_completion(THOUGHT, echo)
        assert accuracy_reward([completion] * 2, ["42"] * 2, ["gsm8k", "math"]) == [0.0, 0.0], echo
        assert format_reward([completion]) == [1.0]
        assert not is_correct(echo, "42", "gsm8k")
    countdown = accuracy_reward(["<answer>(100-93)+30</answer>"], ["37"], ["countdown"],
                                numbers=[[30, 100, 93]])
    assert countdown == [1.0]
    assert is_correct("2^{10}", "2^{10}", "math")  # a calculation is fine when the gold is one


def test_legit_answers_still_grade_right():
    """Real answers in their usual forms still grade right, and wrong ones wrong."""
    right = [("\\frac{1}{2}", "0.5"), ("2\\sqrt{3}", "\\sqrt{12}"), ("x^2+2x+1", "(x+1)^2"),
             ("10,\\!080", "10080"), ("1,234", "1234"), ("-\\frac{3}{4}", "-0.75"),
             ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
             ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
              "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"),
             ("So the answer is $\\boxed{\\dfrac{14}{3}}$.", "\\frac{14}{3}"), ("2^{2005}", "2^{2005}")]
    for prediction, gold in right:
        assert is_correct(prediction, gold, "math"), (prediction, gold)
        assert accuracy_reward([r1_completion("t", prediction)], [gold], ["math"]) == [1.0], prediction
    for prediction, gold in [("\\frac{1}{3}", "0.5"), ("x^2+1", "(x+1)^2"), ("43", "42")]:
        assert not is_correct(prediction, gold, "math"), (prediction, gold)


def test_worker_threads_grade_like_the_main_thread_and_stay_bounded():
    """64 completions graded in a thread pool (pathological ones included) give the main thread's
    results, raise nothing (math-verify's signal timeouts fail off the main thread) and stay bounded."""
    pathological = ["9^{9^{9^{9}}}", "(" * 3000 + "1" + ")" * 3000, "1+" * 19999 + "10",
                    "1000000!", "\\frac{1}{" * 12 + "2" + "}" * 12]
    right = [("\\frac{1}{2}", "0.5"), ("2\\sqrt{3}", "\\sqrt{12}"), ("42", "42"), ("x^2+2x+1", "(x+1)^2")]
    wrong = [("43", "42"), ("12 + 30", "42")]
    cases = [(answer, "1") for answer in pathological] + right + wrong
    cases = [cases[i % len(cases)] for i in range(64)]
    completions = [r1_completion("t", answer) for answer, _ in cases]
    golds = [gold for _, gold in cases]

    def grade(i: int) -> tuple[float, float]:
        start = time.perf_counter()
        reward = accuracy_reward([completions[i]], [golds[i]], ["math"])[0]
        return reward, time.perf_counter() - start

    expected = accuracy_reward(completions, golds, ["math"] * 64)
    with ThreadPoolExecutor(max_workers=8) as pool:
        graded = list(pool.map(grade, range(64)))
    assert expected == [float(case in right) for case in cases]
    assert [reward for reward, _ in graded] == expected
    refused = [elapsed for (answer, _), (_, elapsed) in zip(cases, graded) if answer in pathological]
    assert len(refused) >= 25 and max(refused) <= BOUND_S
