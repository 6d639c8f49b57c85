"""Generators: write a LoRA adapter from a task description (SG-LoRA) or a few examples (ICM-LoRA).
Filled in by the generators issue."""
