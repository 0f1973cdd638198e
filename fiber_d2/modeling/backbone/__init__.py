"""The fused Swin-RoBERTa backbone (fusion in the backbone) and its FPN."""
