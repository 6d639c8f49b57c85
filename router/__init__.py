"""Routers: how adapters are mixed per token (token_gate: MeteoRA, mixer: LoRA-Mixer, rank: SMoRA) or per
sequence (retrieval). Filled in by the routing issue."""
