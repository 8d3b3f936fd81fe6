"""Reading and writing parameter pytrees: safetensors files, Hugging Face directories, orbax.

`atomic` is the one write idiom (temporary sibling, then rename); `safetensors` the one reader and
writer of that format; `names` maps torch tensor names and layouts to flax trees and back; `hf`
reads and writes Hugging Face checkpoint directories; `tokenizer` loads their tokenizer.json;
`checkpoint` holds orbax (the one module importing it) and the `load_params` / `save_params`
dispatch over every format.
"""
