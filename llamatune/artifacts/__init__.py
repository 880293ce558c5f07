"""Artifacts: what a run becomes for its runtimes: merged full-precision folders (merge), GGUF files and Ollama
folders (export), the vLLM adapter check (serving), and the checks that name a damaged file (files).
"""
