"""The grammar of the attncc language (`attn.lark`), shipped as package data of `attncc.grammar`."""
