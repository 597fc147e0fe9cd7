"""The example gallery: one `.attn` file per named variant (see `attncc list`)."""
