"""Benchmarks built on the merging library; nothing in `mergejax` outside this package imports it.

`common` holds what every benchmark shares (labeled splits, evaluation, reports, plots); each
benchmark is a package of its own with its data, zoo and run: `digits` (the permutation-symmetric
stress test), `clip8` (the standard 8-task CLIP benchmark on local checkpoints); `synthetic` is a
tiny multi-task problem for learned-merging tests and speed benchmarks.
"""
