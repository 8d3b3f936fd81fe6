"""Hugging Face interop: flax CLIP and BERT, checkpoint conversion, the 8-task CLIP pipeline.

`convert` maps transformers checkpoint directories to mergejax pytrees and back; `clip` and `bert`
are the flax models those pytrees run in; `clip_pipeline` (needs Pillow) evaluates and merges CLIP
image encoders over image-classification tasks.
"""

from mergejax.hf import bert, clip, convert

__all__ = ["bert", "clip", "convert"]
