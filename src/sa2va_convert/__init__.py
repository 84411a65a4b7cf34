"""sa2va-convert: Sa2VA training checkpoints to HuggingFace folders, safely and in little memory.

Pipeline (one package per stage): read -> plan -> transform -> write -> verify.
The CLI (``sa2va_convert.cli``) is a thin layer over the Python API in
``sa2va_convert.api``.
"""

__version__ = "0.1.0"
