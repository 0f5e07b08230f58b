"""The slim runtime: engine sessions, latent KV cache, sampling and generation. Never imports torch."""
