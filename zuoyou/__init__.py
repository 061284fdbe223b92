"""zuoyou: Janus-Pro-style unified multimodal models on ordinary computers."""
