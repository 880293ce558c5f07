"""The allocator choice: which commands re-execute under tcmalloc, and the opt-out."""

import json
import subprocess
import sys

import pytest

from llamatune.memory import preload_environment

LIB = "libtcmalloc_minimal.so.4"


def test_heavy_commands_get_tcmalloc_preloaded_once():
    env = preload_environment(["train", "r.yaml", "--set", "train.lr=1e-4"], {"PATH": "/bin"}, "linux", LIB)
    assert env["LD_PRELOAD"] == LIB and env["PATH"] == "/bin"
    # the re-executed process must not re-execute again
    assert preload_environment(["train", "r.yaml"], env, "linux", LIB) is None
    # a user's own preload is kept, after ours
    env = preload_environment(["eval", "runs/x"], {"LD_PRELOAD": "/opt/libfoo.so"}, "linux", LIB)
    assert env["LD_PRELOAD"] == f"{LIB}:/opt/libfoo.so"


@pytest.mark.parametrize("args,environ,platform", [
    (["validate", "r.yaml"], {}, "linux"),                                  # instant commands stay as they are
    (["--help"], {}, "linux"),
    (["train", "r.yaml"], {"LLAMATUNE_ALLOCATOR": "system"}, "linux"),      # the opt-out
    (["train", "r.yaml"], {}, "darwin"),                                    # no LD_PRELOAD there
    (["train", "r.yaml"], {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "linux"),  # the user chose an allocator
])
def test_no_re_execution(args, environ, platform):
    assert preload_environment(args, environ, platform, LIB) is None


def test_no_tcmalloc_installed_means_no_re_execution(monkeypatch):
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    assert preload_environment(["train", "r.yaml"], {}, "linux") is None


def test_a_wrong_setting_is_named():
    with pytest.raises(ValueError, match="LLAMATUNE_ALLOCATOR='tcmaloc': use auto"):
        preload_environment(["train", "r.yaml"], {"LLAMATUNE_ALLOCATOR": "tcmaloc"}, "linux", LIB)
    done = subprocess.run([sys.executable, "-m", "llamatune", "train", "r.yaml"], capture_output=True, text=True,
                          env={"LLAMATUNE_ALLOCATOR": "tcmaloc", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "LLAMATUNE_ALLOCATOR='tcmaloc'" in done.stderr


def test_opt_out_trains_on_the_system_allocator(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMATUNE_ALLOCATOR", "system")
    cmd = [sys.executable, "-m", "llamatune", "train", str(tiny_recipe), "--run-dir", str(tmp_path / "r"),
           "--set", "train.max_steps=2"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["allocator"] == "glibc"
