"""The exceptions gpt2lab raises for bad input: each carries a one-line message saying what to do."""


class GPT2LabError(Exception):
    """Base of gpt2lab's user-facing errors; the CLI prints these as one line, without a traceback."""


class CheckpointError(GPT2LabError, ValueError):
    """A checkpoint folder or file is missing, corrupt, or does not match its config."""


class FetchError(GPT2LabError, RuntimeError):
    """A pinned package could not be fetched or did not match its hash."""
