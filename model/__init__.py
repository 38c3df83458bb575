"""DiffusionGemma in plain PyTorch: config, layers, encoder/decoder passes, KV cache, sampler, loading.

Knows nothing of Ray, gRPC or processes. Shape legend used across this package:
  T tokens in a pass, D hidden size, H query heads, Kv key/value heads, d head dim,
  S cached positions, C canvas length, V vocabulary, E experts, K experts per token, I expert width.
"""
