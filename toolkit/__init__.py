"""whisper-toolkit: fine-tune Whisper with one ``accelerate launch`` entry point, on 1 process, N GPUs or N nodes."""

__version__ = "0.1.0"
