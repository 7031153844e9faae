"""The exceptions gpt2lab raises for bad input: each carries a one-line message saying what to do."""


class GPT2LabError(Exception):
    """Base of gpt2lab's user-facing errors; the CLI prints these as one line, without a traceback."""


class CheckpointError(GPT2LabError, ValueError):
    """A checkpoint folder or file is missing, corrupt, or does not match its config."""


class HubError(CheckpointError):
    """A model named on the Hugging Face Hub cannot be found, fetched, or used as GPT-2."""


class FetchError(GPT2LabError, RuntimeError):
    """A pinned package could not be fetched or did not match its hash."""


class TaskFormatError(GPT2LabError, ValueError):
    """An evaluation file (text, JSONL or BIG-bench task) is malformed; the message names the line."""


class TokenizerError(GPT2LabError, ValueError):
    """Text, ids or vocabulary files a tokenizer cannot handle (lone surrogates, unknown ids, bad files)."""


class TokenizerMismatch(TokenizerError):
    """A model is being used with a tokenizer other than the one it was trained with."""


class DataError(GPT2LabError, ValueError):
    """A corpus, a prepared data folder or a token shard is missing, empty, undecodable or corrupt."""


class GenerationError(GPT2LabError, ValueError):
    """A generation request is invalid: a bad sampling parameter, an empty or too-long prompt."""


class TrainingError(GPT2LabError, RuntimeError):
    """A training run cannot start or continue: a run folder in the way, nothing to resume, divergence."""


class ConfigError(GPT2LabError, ValueError):
    """An option or configuration value is out of range or inconsistent with another."""


class DeviceError(GPT2LabError, ValueError):
    """A device name that is not valid here (unknown, or a GPU that this machine lacks)."""


class Stopped(GPT2LabError):
    """A run that a signal stopped after it saved: `report` says where it got to; the command
    exits with 128 + `signum` (130 for SIGINT, 143 for SIGTERM), as a process killed by it would."""

    def __init__(self, message: str, *, report: str, signum: int) -> None:
        super().__init__(message)
        self.report, self.signum = report, signum
