"""Hostile data: one 50 MB record is measured in characters and dropped without being tokenized, compared or
held twice, so memory stays near a normal run's."""

import json
import subprocess
import sys

from conftest import qa_rows, write_jsonl

MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stdout + r.stderr)")


def validate_peak(recipe):
    """(exit code, peak RSS in MiB, output) of `llamatune validate RECIPE` in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "llamatune", "validate", str(recipe)],
                         capture_output=True, text=True, timeout=300).stdout
    head, _, output = out.partition("\n")
    code, kib = head.split()
    return int(code), int(kib) / 1024, output


def test_a_50_mb_record_is_dropped_by_characters_within_a_bounded_memory(tmp_path, tiny_model_dir):
    rows = qa_rows(40)
    write_jsonl(tmp_path / "normal.jsonl", rows)
    with open(tmp_path / "hostile.jsonl", "w") as f:
        for row in rows[:20]:
            f.write(json.dumps(row) + "\n")
        f.write(json.dumps({"question": "word " * 10_000_000, "answer": "x"}) + "\n")  # 50 MB on one line
        for row in rows[20:]:
            f.write(json.dumps(row) + "\n")
    assert (tmp_path / "hostile.jsonl").stat().st_size > 50_000_000
    for name in ("normal", "hostile"):
        (tmp_path / f"{name}.yaml").write_text(
            f"model:\n  path: {tiny_model_dir}\ndata:\n  train:\n    path: {name}.jsonl\n    prompt: '{{question}}'\n"
            "    response: '{answer}'\n  eval_fraction: 0.2\n  max_length: 256\n")
    code, normal_mib, output = validate_peak(tmp_path / "normal.yaml")
    assert code == 0, output
    code, hostile_mib, output = validate_peak(tmp_path / "hostile.yaml")
    assert code == 0, output
    assert "dropped 1: too_long 1" in output, output
    assert "hostile.jsonl:21: 50,000,001 characters, more than data.max_length=256 tokens can hold" in output, output
    assert hostile_mib - normal_mib < 1024, (normal_mib, hostile_mib)
    print(f"peak RSS: normal {normal_mib:.0f} MiB, with a 50 MB record {hostile_mib:.0f} MiB")
