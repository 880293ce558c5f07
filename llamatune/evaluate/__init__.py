"""Evaluation: load a run, merged folder or GGUF; score held-out data (scoring), report it (report, metrics), and
talk to the model by hand (chat).
"""
