"""The standard 8-task CLIP ViT merging benchmark, on local checkpoints and image data.

`data` reads and caches each task's split, `pool` loads the pre-trained CLIP and the experts,
`classifier` builds the zero-shot heads and scores accuracy, `run` ties them together.
"""
