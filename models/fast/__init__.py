"""The speed paths of our models: none of this is needed to understand a model, and none of it runs unless a process
asks for it (`models.set_cpu_kernels(paths="fast")`, the pipeline's default through params.yaml's `kernels.paths`).

The model files (`models/t5.py`, `models/reformer.py`) are the reference: a few of their methods begin with
`if fast_paths(): return fast.<same name>(self, ...)`, and the functions here compute the same numbers with fewer
passes over memory, less kept for backward, or shortcuts for decoding. Each is tested equal to the reference path
(tests/test_fast_t5.py, tests/test_fast_reformer.py, tests/test_fast_kernels.py: eval forward, training gradients,
greedy and beam generation), within rounding.

- `private`: the private torch ops used here, each behind a guard with a public fallback;
- `products`: the dense products (BLAS or oneDNN, an explicit setting), decoding's product forms and the weight
  copies they read (kept current through an optimizer-step hook);
- `attention`: T5's attention with an additive bias, differentiated by hand, and head splits whose gradient is one
  buffer;
- `tied`: one gradient tensor for a tied embedding / output weight; dropout + relu with a one-pass backward;
- `t5`: the T5 forms (stacked projections, an encoder over the real tokens only, decoding shortcuts);
- `lsh`, `reformer`: the Reformer's attention kernels (chunk neighbours, sort permutations, shared-QK scores and key
  normalisation) and the attention forms built on them.

This package imports nothing from the model files (they import it), so there is no import circle.
"""
