"""Quality: the papers' evaluation sets, their official scoring rules, the evaluation harness."""
