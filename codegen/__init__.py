"""Code generation: Triton source from kernel plans (installed as `attncc.codegen`)."""
