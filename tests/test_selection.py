"""Model selection points and choice (jaxda.train.selection), pure parts.

The end-to-end run (evaluation history, best checkpoint, resume) is in
test_end_to_end.py::test_best_on_target_val_selection_and_resume.
"""

import pytest

from jaxda.train import selection


@pytest.mark.parametrize("start,num_steps,every,want", [
    (0, 10, 4, [4, 8, 10]),   # the last step is always evaluated
    (0, 8, 4, [4, 8]),        # ... once
    (4, 10, 4, [8, 10]),      # resumed at an evaluated point
    (5, 10, 4, [8, 10]),
    (10, 10, 4, []),          # resumed after the end
    (0, 3, 5, [3]),           # every > num_steps
    (0, 1, 1, [1]),
])
def test_eval_points(start, num_steps, every, want):
  assert selection.eval_points(start, num_steps, every) == want


def test_best_entry_is_the_earliest_highest():
  history = [{"step": 2, "score": 0.3}, {"step": 4, "score": 0.5},
             {"step": 6, "score": 0.5}, {"step": 8, "score": 0.1}]
  assert selection.best_entry(history)["step"] == 4
  assert selection.best_entry([]) is None
  # A reference: max by score, ties to the smallest step.
  want = min((e for e in history
              if e["score"] == max(h["score"] for h in history)),
             key=lambda e: e["step"])
  assert selection.best_entry(history) is want
