"""`gpt2lab serve`: engine.py batches, sampling.py chooses tokens, protocol.py speaks OpenAI's API, app.py serves it."""
