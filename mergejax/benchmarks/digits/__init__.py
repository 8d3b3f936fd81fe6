"""The digits benchmark: scikit-learn's 8x8 digits seen through 8 pixel bijections.

A stress test, not a model of the regime merging is studied in: the 8 tasks are one task under
pixel permutations, so the experts sit in permuted copies of one solution (see the README).
`data` builds the tasks, `zoo` pre-trains and fine-tunes (cached), `run` merges and reports.
"""
