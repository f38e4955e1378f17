"""The layer rules, each readable against its paper: one weight matrix and its layer inputs in, quantized
weights out. Nothing here knows about networks, files or scripts.

- `alphabet`, `rounding`: the alphabets A = {±kδ} and the rules that map a value to a level
- `gpfq/`: GPFQ itself: `reference` (the per-column rule, the paper's spec), `engine` (the blocked engine
  that computes the same numbers at matrix-product speed), `inblock` (its compiled in-block kernel),
  `column_order`, `variants` (SPFQ, sparse GPFQ)
- `gptq`, `qronos`: the other rules on the same alphabets and rows
- `codes`: the integer codes of the quantized weights (codebooks, bit packing, entropy)
- `method`, `registry`: each method as one `Method` object (its layer rule on rows and on Gram sums, what it
  needs, its log options), all of them in `METHODS` by name: the pipeline asks these objects, never a name
"""
from gpfq.methods.method import Method
from gpfq.methods.registry import METHOD_NAMES, METHODS, method_of

__all__ = ["METHODS", "METHOD_NAMES", "Method", "method_of"]
