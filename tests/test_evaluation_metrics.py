"""Answer extraction, scoring, the normalized score and the forgetting arithmetic."""

import math

import pytest

from epi_jax.scoring import forgetting as fg
from epi_jax.scoring import metrics


@pytest.mark.parametrize("text, expected", [
    ("She pays 3 * 6 = 18 dollars.\n#### 18", "18"),
    ("#### 1,000", "1000"),
    ("So the total is $1,234.50 in all.", "1234.5"),
    ("The answer is 18.0", "18"),
    ("The answer is: -7 degrees, because 3 - 10 = -7.", "-7"),
    ("First 5 apples, then 12 more. So the answer is 17 apples. Hope this helps!", "17"),
    ("He walks 2.5 km, 4 times: 10 km", "10"),
    ("Total: 40 + 2 = 42.", "42"),
    ("#### $36", "36"),
    ("no digits at all", None),
    ("", None),
    ("The answer is unclear, but I guess 12", "12"),  # marker without number: fallback
    ("The answer is 0.50", "0.5"),
    ("#### 5\n\nUser: next question 99", "5"),  # trailing chatter after the marker
])
def test_extract_gsm8k_answer(text, expected):
  assert metrics.extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize("a, b", [("18.0", "18"), ("1,000", "1000"), ("$5", "5"),
                                  ("+3", "3"), ("-0.50", "-0.5"), ("7.", "7")])
def test_normalize_number_equal_forms(a, b):
  assert metrics.normalize_number(a) == metrics.normalize_number(b) is not None


def test_normalize_number_rejects_non_numbers():
  assert metrics.normalize_number("abc") is None
  assert metrics.normalize_number(None) is None
  assert metrics.normalize_number("nan") is None


def test_gsm8k_match_and_exact_match():
  assert metrics.gsm8k_match("so 10,800 in total\n#### 10800", "10,800")
  assert not metrics.gsm8k_match("#### 10801", "10800")
  assert not metrics.gsm8k_match("I don't know", "3")
  assert metrics.exact_match(["#### 3", "answer is 4", "5"], ["3", "4", "6"]) == pytest.approx(2 / 3)
  assert metrics.exact_match([], []) == 0.0
  with pytest.raises(ValueError, match="length"):
    metrics.exact_match(["1"], [])


def test_normalized_scores():
  base = {"logiqa": {"accuracy": 0.0, "n": 8}, "gsm8k": {"loss": 1.0, "accuracy": 0.0, "n": 8},
          "alpaca": {"loss": 2.0, "n": 8}}
  model = {"logiqa": {"accuracy": 0.25, "n": 8}, "gsm8k": {"loss": 1.0, "accuracy": 0.5, "n": 8},
           "alpaca": {"loss": 1.6, "n": 8}}
  out = metrics.normalized_scores(model, base)
  # logiqa: (2+1)/10 over (0+1)/10 -> 300; gsm8k's primary is its loss (exact match is
  # secondary): unchanged -> 100; alpaca 2/1.6 -> 125.
  assert out["logiqa"] == pytest.approx(300.0)
  assert out["gsm8k"] == pytest.approx(100.0)
  assert out["alpaca"] == pytest.approx(125.0)
  assert out["average"] == pytest.approx((300 + 100 + 125) / 3)
  assert metrics.normalized_scores(base, base)["average"] == pytest.approx(100.0)
  with pytest.raises(ValueError, match="loss"):
    metrics.normalized_task_score("alpaca", {"accuracy": 1.0}, {"loss": 1.0})


def test_higher_is_better_score():
  assert metrics.higher_is_better_score("alpaca", {"loss": 1.5}) == -1.5
  assert metrics.higher_is_better_score("logiqa", {"accuracy": 0.5}) == 0.5
  assert metrics.higher_is_better_score("gsm8k", {"loss": 0.5, "accuracy": 0.1}) == -0.5


def test_forgetting_arithmetic():
  assert fg.forgetting([0.2, 0.5, 0.3]) == pytest.approx(0.2)
  assert fg.forgetting([0.2, 0.3, 0.5]) == pytest.approx(-0.2)  # improving: negative
  assert fg.forgetting([0.4]) is None
  table = fg.forgetting_table({100: {"a": 0.5, "b": -2.0}, 200: {"a": 0.1, "b": -1.0},
                               50: {"a": 0.3, "b": -3.0}})
  assert table["a"] == pytest.approx(0.4)   # best earlier 0.5, final 0.1
  assert table["b"] == pytest.approx(-1.0)  # loss kept falling: -2 - (-1)
  assert fg.mean_defined([1.0, None, float("nan"), 3.0]) == 2.0
  assert fg.mean_defined([None]) is None


def test_sequential_ab_and_stage_transfer():
  assert fg.sequential_ab(0.6, 0.4, 0.1, 0.5) == pytest.approx(
      {"old_task_drop": 0.2, "new_task_gain": 0.4})
  scores = {10: {"gsm8k": 0.5, "logiqa": 0.3, "alpaca": -2.0},
            20: {"gsm8k": 0.45, "logiqa": 0.4, "alpaca": -1.9},
            30: {"gsm8k": 0.2, "logiqa": 0.35, "alpaca": -1.5}}
  out = fg.stage_transfer(scores, [10, 20, 30],
                          [["gsm8k"], ["logiqa", "gsm8k"], ["alpaca"]])
  # gsm8k last trained in stage 2 (ends at 20): 0.45 - 0.2; logiqa 0.4 - 0.35.
  assert out["old_task_drop"] == pytest.approx({"gsm8k": 0.25, "logiqa": 0.05})
  assert out["new_task_gain"] == pytest.approx({"alpaca": 0.4})
  assert out["mean_old_task_drop"] == pytest.approx(0.15)
  with pytest.raises(ValueError, match="stage end"):
    fg.stage_transfer(scores, [10, 25], [["gsm8k"], ["alpaca"]])
  assert math.isclose(out["mean_new_task_gain"], 0.4)
