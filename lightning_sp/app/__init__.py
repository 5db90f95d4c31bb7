"""The recipes' Python side: models (a Llama-style decoder, ``swap_attention`` for Hugging Face
models), data, and the causal-LM LightningModule."""
