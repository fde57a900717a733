"""Reasoning benchmarks and answer checking (answers.py: extraction and grading, shared by select and eval)."""
