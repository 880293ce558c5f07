"""GGUF export round trip: the file loads back through transformers' GGUF loader with matching logits."""

import os

import torch
from typer.testing import CliRunner

from llamatune.cli import app


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gguf_round_trip_f16_and_q8_0(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 8, 11, 40, 2]])
    want = _logits(reference, ids)
    for quant in ("f16", "q8_0"):
        out = tmp_path / f"tiny-{quant}.gguf"
        result = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--quant", quant, "--out", str(out)])
        assert result.exit_code == 0, result.output
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
        got = _logits(loaded, ids)
        if quant == "f16":
            assert ((got - want).abs().max() / want.abs().max()) <= 1e-2
        assert torch.equal(got.argmax(-1), want.argmax(-1))  # greedy tokens agree
        tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
        plain = AutoTokenizer.from_pretrained(tiny_model_dir)
        text = "What is a fever? Rest, fluids and 1,452.4 million."
        assert tok(text)["input_ids"] == plain(text)["input_ids"] and tok.chat_template == plain.chat_template
    again = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--out", str(tmp_path / "tiny-f16.gguf")])
    assert again.exit_code == 1 and "already exists" in again.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_export_rejects_what_it_cannot_write(tiny_model_dir, tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["export", str(tmp_path)]).exit_code == 2
    bad = runner.invoke(app, ["export", str(tiny_model_dir), "--format", "onnx"])
    assert bad.exit_code == 2 and "not supported" in bad.output


def test_ollama_folder_has_the_gguf_a_modelfile_and_the_report(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--format", "ollama", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    modelfile = (tmp_path / "o" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}" in modelfile
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["Modelfile", "export_report.json", "model.gguf"]
    assert f"ollama create {tiny_model_dir.name.lower()} -f {(tmp_path / 'o').resolve() / 'Modelfile'}" in result.output


def test_a_second_export_into_the_same_target_stops_at_once(tiny_model_dir, tmp_path):
    from llamatune import lock

    for argv, target in ((["--out", str(tmp_path / "m.gguf")], tmp_path / "m.gguf"),
                         (["--format", "ollama", "--out", str(tmp_path / "o")], tmp_path / "o")):
        with lock.hold(target, "exporting"):  # the first writer, in this process
            second = CliRunner().invoke(app, ["export", str(tiny_model_dir), *argv])
        assert second.exit_code == 1 and f"pid {os.getpid()}" in second.output and "Traceback" not in second.output
        assert not target.exists()


def test_exported_files_are_readable_by_other_users(tiny_model_dir, tmp_path):
    """A service running as another user (ollama, llama-server) must be able to read what export writes."""
    old = os.umask(0o022)
    try:
        for argv in (["--out", str(tmp_path / "m.gguf")], ["--format", "ollama", "--out", str(tmp_path / "o")]):
            result = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--quant", "q4_0", *argv])
            assert result.exit_code == 0, result.output
    finally:
        os.umask(old)
    for path in (tmp_path / "m.gguf", tmp_path / "m.export_report.json", *(tmp_path / "o").iterdir()):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755


def test_without_llama_cpp_the_export_says_what_it_could_not_check(tiny_model_dir, tmp_path, monkeypatch):
    import json

    from llamatune.artifacts import llamacpp

    monkeypatch.setattr(llamacpp, "available", lambda: False)  # as on a machine without llama-cpp-python
    result = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--quant", "q5_k_m", "--out", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    assert "not checked in llama.cpp: llama-cpp-python is not installed" in result.output
    report = json.loads((tmp_path / "m.export_report.json").read_text())
    assert report["tokenizer"]["checked"] is False
    assert report["quality"]["measured_in"].startswith("llamatune layer by layer on the dequantized tensors")
    assert report["quality"]["positions"] > 0
    assert report["file"]["tensor_types"]["F32"] == 5 and report["quant"] == "q5_k_m"
