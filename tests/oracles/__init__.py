"""Independent test oracles for the example contracts of VARIANTS.md, section 1.

`dense` computes every example with plain dense PyTorch formulas, `flex` recomputes the
softmax-family examples with FlexAttention (eager, CPU), and `inputs` builds random inputs.
They are written from the contract text alone, never from attncc's DSL or IR, so that they
can catch a compiler that is consistently wrong.
"""
