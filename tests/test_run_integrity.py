"""One writer per output, and strict JSON in every file written.

Two `llamatune train` processes on one run directory: the second is refused at once, naming the first.
Two processes converting one GGUF model into the cache: the second waits, then reuses the first one's folder.
"""

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import assert_strict_json, write_qa_recipe
from llamatune import lock, strictjson


# ---- strictjson -------------------------------------------------------------------------------

def test_non_finite_numbers_become_null_with_a_reason():
    value = {"loss": float("nan"), "best": float("inf"), "ok": 1.5, "rows": [{"x": -math.inf}], "note": "fine"}
    text = strictjson.dumps(value)
    assert json.loads(text, parse_constant=pytest.fail) == {
        "loss": None, "best": None, "ok": 1.5, "note": "fine",
        "rows": [{"x": None, "null_reasons": {"x": "not a finite number: -inf"}}],
        "null_reasons": {"loss": "not a finite number: nan", "best": "not a finite number: inf"},
    }


def test_a_reason_the_writer_gave_is_kept():
    value = {"tokens_per_s": None, "loss": float("nan"), "null_reasons": {"tokens_per_s": "no step ran"}}
    assert json.loads(strictjson.dumps(value))["null_reasons"] == {"tokens_per_s": "no step ran",
                                                                   "loss": "not a finite number: nan"}


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    strictjson.write(folder / "a.json", {"x": 1})
    with pytest.raises(TypeError):  # not serializable: the old file stays whole
        strictjson.write(folder / "a.json", {"x": object()})
    assert json.loads((folder / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in folder.iterdir()] == ["a.json"]


def test_the_strict_checker_refuses_what_python_json_writes_by_default(tmp_path):
    (tmp_path / "ok.json").write_text('{"a": null}')
    (tmp_path / "m.jsonl").write_text(json.dumps({"a": 1}) + "\n" + json.dumps({"a": float("nan")}) + "\n")
    with pytest.raises(AssertionError, match=r"m.jsonl \(document 2\) is not strict JSON: NaN"):
        assert_strict_json(tmp_path)


# ---- lock -------------------------------------------------------------------------------------

def test_a_held_lock_refuses_naming_the_holder_and_is_released(tmp_path):
    target = tmp_path / "runs" / "r"
    with lock.hold(target, "training"):
        assert not target.exists()  # the lock file is a sibling: the target stays empty
        with pytest.raises(lock.Busy, match=rf"pid {os.getpid()} on host .*, training since"):
            with lock.hold(target, "training"):
                pass
    with lock.hold(target, "training"):  # released (and its file removed) on exit
        pass
    assert not (tmp_path / "runs").exists()  # made only for the lock: removed with it
    with lock.hold(target, "training"):
        target.mkdir()  # what the holder wrote stays
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["r"]


# ---- two trainings, one run directory ---------------------------------------------------------

def _train(recipe: Path, run_dir: Path, *extra: str, wait: bool = True):
    args = [sys.executable, "-m", "llamatune", "train", str(recipe), "--run-dir", str(run_dir), *extra]
    if wait:
        return subprocess.run(args, capture_output=True, text=True)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_second_train_on_the_same_run_dir_is_refused_within_5_seconds(tmp_path, tiny_model_dir):
    """The first trains to the end; the second (new run or `--resume auto`) exits 1 at once, naming the first's
    pid and host, and writes nothing."""
    recipe = write_qa_recipe(tmp_path, tiny_model_dir, 24, lora="  r: 4\n",
                             train="  precision: fp32\n  max_steps: 100\n  micro_batch_size: 2\n")
    run = tmp_path / "run"
    first = _train(recipe, run, wait=False)
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").exists():  # the first is training: model loaded, run directory written
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.05)
    holder = json.loads(lock.lock_path(run).read_text())
    assert holder["pid"] == first.pid and holder["doing"] == "training"
    before = sorted(p.name for p in run.iterdir())
    for extra in ([], ["--resume", "auto"]):
        t0 = time.monotonic()
        second = _train(recipe, run, *extra)
        took = time.monotonic() - t0
        assert first.poll() is None, "the first run ended before the second was refused: make it longer"
        assert second.returncode == 1, second.stdout + second.stderr
        assert took < 5, f"refused after {took:.1f}s"
        message = " ".join((second.stdout + second.stderr).split())
        assert f"error: {run} is being written by another llamatune process (pid {first.pid} on host " in message
        assert "model " not in second.stdout  # refused before loading anything
        print(f"{' '.join(extra) or 'new run'}: refused in {took:.2f}s")
    assert sorted(p.name for p in run.iterdir()) == before
    t1 = time.monotonic()
    out, _ = first.communicate(timeout=300)
    print(f"the first ran {time.monotonic() - t1:.1f}s more")
    assert first.returncode == 0, out
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "summary.json").is_file()
    assert not lock.lock_path(run).exists()
    assert_strict_json(run)


# ---- two conversions, one cache folder --------------------------------------------------------

_CONVERT = "import sys; from pathlib import Path; from llamatune.catalog import ensure_gguf; " \
           "print('folder', ensure_gguf(Path(sys.argv[1]), say=lambda m: print(m, flush=True)), flush=True)"


def test_two_processes_converting_one_gguf_convert_it_once(tmp_path, tiny_model_dir):
    """Both wait while the lock is held (here by the test itself); released, one converts and the other reuses
    its folder. Without the lock both converted, and the second deleted and replaced the folder the first had
    just returned (while a training run may have been loading from it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llamatune.catalog import cached_gguf_path, is_cached
    from llamatune.artifacts.export import export_gguf
    from llamatune.fingerprint import sha256_file

    gguf = export_gguf(tiny_model_dir, tmp_path / "tiny.gguf", say=lambda _: None)
    target = cached_gguf_path(gguf, sha256_file(gguf), "float16")  # an F16 file: stored as it is
    outputs = [[], []]
    with lock.hold(target, "converting"):
        procs = [subprocess.Popen([sys.executable, "-c", _CONVERT, str(gguf)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in outputs]
        readers = [threading.Thread(target=lambda p=p, o=o: o.extend(p.stdout), daemon=True) for p, o in zip(procs, outputs)]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + 120
        while not all(any(f"(pid {os.getpid()} on host" in line for line in o) for o in outputs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), outputs
            time.sleep(0.05)
    for proc, reader in zip(procs, readers):
        proc.wait(300)
        reader.join(10)
    assert [p.returncode for p in procs] == [0, 0], outputs
    converted = [line for o in outputs for line in o if line.startswith(f"Converting {gguf} ")]
    assert len(converted) == 1, outputs
    assert {line for o in outputs for line in o if line.startswith("folder ")} == {f"folder {target}\n"}
    assert is_cached(target) and not lock.lock_path(target).exists()
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)(input_ids=ids).logits
        cached = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)(input_ids=ids).logits
    assert torch.equal(direct, cached)
    assert_strict_json(target)
