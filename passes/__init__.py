"""Analysis and transformation passes of the attncc compiler."""
