"""The grounding head: DyHead tower, token-alignment outputs, ATSS losses, post-processing."""
