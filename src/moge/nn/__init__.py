"""Model core: routing, experts, the MoE block, the decoder."""
