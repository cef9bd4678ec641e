"""Output directories: replaced all-or-nothing, only over what the user allowed, cleaned up on errors,
Ctrl-C and SIGTERM; refused where replacing would delete the user's work."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mq_export
from mq_export.commands.cli import main
from mq_export.errors import MQExportError
from mq_export.commands.output import staged_output_dir

REPO = Path(mq_export.__file__).resolve().parent.parent


def leftovers(root: Path) -> list[str]:
    """Hidden staging (.partial) or set-aside (.old) directories anywhere under `root`."""
    return [str(p) for p in root.rglob(".*") if p.name.endswith((".partial", ".old"))]


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` with its text, outside staging directories (`leftovers` checks those)."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file())
    return {str(p.relative_to(root)): p.read_text() for p in files
            if not any(part.endswith((".partial", ".old")) for part in p.relative_to(root).parts)}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mq-export: error: "), err
    return err


def test_new_output_and_missing_parents_appear_only_at_the_end(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with staged_output_dir(out) as staging:
        (staging / "f.txt").write_text("new")
        assert not (tmp_path / "a").exists()
    assert tree(tmp_path) == {"a/b/out/f.txt": "new"} and leftovers(tmp_path) == []
    probe = tmp_path / "probe"
    probe.mkdir()
    assert out.stat().st_mode == probe.stat().st_mode, "the output has a plain mkdir's mode, not mkdtemp's 0700"


@pytest.mark.parametrize("exc", [MQExportError("bad input"), KeyboardInterrupt()])
def test_failure_leaves_nothing_not_even_parents(tmp_path, exc):
    with pytest.raises(type(exc)):
        with staged_output_dir(tmp_path / "a" / "out") as staging:
            (staging / "half.onnx").write_text("half")
            raise exc
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("old, force", [({}, False), ({"old.txt": "x", "sub/deep.txt": "y"}, True)])
def test_replaces_empty_or_forced_directory(tmp_path, old, force):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in old.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    with staged_output_dir(out, force) as staging:
        (staging / "report.json").write_text("{}")
    assert tree(tmp_path) == {"out/report.json": "{}"} and leftovers(tmp_path) == []


def _add_file(out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "theirs.txt").write_text("theirs")


def _swap_directory(out: Path) -> None:
    out.rename(out.with_name("moved"))
    out.mkdir()


@pytest.mark.parametrize("start, force, change", [
    (None, False, _add_file),            # absent at the start, created during the run
    ({}, False, _add_file),              # empty at the start
    ({"old.txt": "x"}, True, _add_file),
    ({"old.txt": "x"}, True, _swap_directory),
], ids=["absent", "empty", "forced", "swapped"])
def test_what_appears_during_the_run_is_never_deleted(tmp_path, start, force, change):
    out = tmp_path / "out"
    if start is not None:
        out.mkdir()
        for name, text in start.items():
            (out / name).write_text(text)
    before = tree(tmp_path)
    with pytest.raises(MQExportError, match="during the run.*nothing was written"):
        with staged_output_dir(out, force) as staging:
            (staging / "report.json").write_text("{}")
            change(out)
            during = tree(tmp_path)
    assert tree(tmp_path) == during != before and leftovers(tmp_path) == []


@pytest.mark.parametrize("empty_dir, force", [(False, False), (True, False), (False, True)])
def test_two_concurrent_runs_the_second_is_refused(tmp_path, empty_dir, force):
    out = tmp_path / "out"
    if empty_dir:
        out.mkdir()
    first, second = staged_output_dir(out, force), staged_output_dir(out, force)
    (first.__enter__() / "run").write_text("first")
    (second.__enter__() / "run").write_text("second")
    first.__exit__(None, None, None)
    with pytest.raises(MQExportError, match="during the run"):
        second.__exit__(None, None, None)
    assert tree(tmp_path) == {"out/run": "first"} and leftovers(tmp_path) == []


def test_refuses_working_directory_home_root_and_input_holders(tmp_path, monkeypatch):
    work, home, inputs = tmp_path / "work", tmp_path / "home", tmp_path / "data"
    for directory in (work, home, inputs / "ckpt"):
        directory.mkdir(parents=True)
        (directory / "keep.txt").write_text("mine")
    (tmp_path / "link_to_work").symlink_to(work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    before = tree(tmp_path)
    for out, why in [(".", "the working directory"), ("", "empty string"), (str(work), "the working directory"),
                     ("..", "an ancestor of the working directory"), ("/", "the filesystem root"),
                     (str(tmp_path / "link_to_work"), "the working directory"), (str(home), "your home directory"),
                     (str(inputs), "the input"), (str(inputs / "ckpt"), "the input"),
                     (str(REPO), "the mq_export package")]:
        with pytest.raises(MQExportError, match=why):
            with staged_output_dir(out, force=True, inputs=(inputs / "ckpt" / "keep.txt", None)):
                pytest.fail(f"-o {out!r} was accepted")
    assert tree(tmp_path) == before and leftovers(tmp_path) == []


def test_symlink_output_replaces_its_target_and_keeps_the_link(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    (real / "old.txt").write_text("x")
    link.symlink_to(real)
    with staged_output_dir(link, force=True) as staging:
        (staging / "report.json").write_text("{}")
    assert link.is_symlink() and link.resolve() == real
    assert tree(real) == {"report.json": "{}"} and leftovers(tmp_path) == []


def test_output_that_is_a_file_or_under_one(tmp_path):
    (tmp_path / "file.txt").write_text("mine")
    with pytest.raises(MQExportError, match="is not a directory"):
        with staged_output_dir(tmp_path / "file.txt"):
            pass
    with pytest.raises(MQExportError, match=r"under .*file\.txt, which is a file"):
        with staged_output_dir(tmp_path / "file.txt" / "sub" / "out"):
            pass
    assert tree(tmp_path) == {"file.txt": "mine"}


def test_unwritable_parent_simulated(tmp_path, monkeypatch):
    """We run as root, where permissions do not stop mkdir: make mkdir under `locked` fail the way
    the OS does for a user without write permission."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.parent == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(MQExportError, match=r"no new directory can be made in .*locked \(Permission denied\)"):
        with staged_output_dir(locked / "out"):
            pass
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; the simulated test covers it")
def test_unwritable_parent(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["demo", "-o", str(locked / "out")]) == 2
    assert "Permission denied" in one_error_line(capsys) and list(locked.iterdir()) == []


def test_cli_refuses_dot_and_empty_output_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "-o", "", "--limit", "8"]) == 2, "an empty working directory is still refused"
    assert "the working directory" in one_error_line(capsys)   # the CLI reads -o "" as Path("") == "."
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["demo", "-o", ".", "--force", "--limit", "8"]) == 2
    assert "the working directory" in one_error_line(capsys)
    assert main(["demo", "-o", str(tmp_path / "keep.txt" / "out")]) == 2
    assert "which is a file" in one_error_line(capsys)
    assert tree(tmp_path) == {"keep.txt": "mine"}


def test_cli_export_refuses_the_directory_holding_the_checkpoint(tmp_path, capsys):
    from mq_export.load.checkpoints import BUNDLED_CLASSIFIER
    checkpoint = tmp_path / "ckpt" / BUNDLED_CLASSIFIER.name
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(BUNDLED_CLASSIFIER.read_bytes())
    assert main(["export", str(checkpoint), "-o", str(tmp_path), "--force"]) == 2
    assert f"the input {checkpoint}" in one_error_line(capsys)
    assert checkpoint.read_bytes() == BUNDLED_CLASSIFIER.read_bytes() and leftovers(tmp_path) == []


def test_main_restores_the_sigterm_handler(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["demo", "-o", str(tmp_path / "f" / "x"), "--model", "no-such-model"]) == 2
    capsys.readouterr()
    assert signal.getsignal(signal.SIGTERM) is before


# The CLI in a child process whose demo stages a file and then waits to be stopped.
_SLOW_DEMO = """
import sys, time
import mq_export.commands.demo
from mq_export.commands.cli import main
from mq_export.commands.output import staged_output_dir

def slow_demo(cfg):
    with staged_output_dir(cfg.out, cfg.force) as staging:
        (staging / "report.json").write_text("{}")
        print("staged", flush=True)
        time.sleep(120)

mq_export.commands.demo.run_demo = slow_demo
sys.exit(main(["demo", "-o", sys.argv[1]]))
"""


@pytest.mark.parametrize("signum, status, message", [(signal.SIGTERM, 143, "mq-export: terminated"),
                                                     (signal.SIGINT, 130, "mq-export: interrupted")])
def test_signals_remove_the_staging_directory(tmp_path, signum, status, message):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_DEMO, str(tmp_path / "out")], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline() == "staged\n"
        assert len(leftovers(tmp_path)) == 1
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == status and err.strip() == message
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A small random character LM directory, so generate's ONNX export takes a second or two."""
    import torch

    from mq_export.load.charlm import CharTokenizer
    from mq_export.load.checkpoints import save_mamba_ssm
    from mq_export.models.mamba import LMConfig, MambaLMHeadModel, MixerConfig
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("lm") / "tiny"
    save_mamba_ssm(MambaLMHeadModel(LMConfig(MixerConfig(16, d_state=4, d_conv=4), n_layer=1, vocab_size=8)),
                   directory)
    CharTokenizer("abcdefgh").save(directory / "vocab.json")
    return directory


def generate(lm_dir: Path, onnx_dir: Path, *extra: str) -> int:
    return main(["generate", "--model", str(lm_dir), "--prompt", "abc", "--tokens", "3", "--greedy",
                 "--backend", "onnxruntime", "--onnx-dir", str(onnx_dir), *extra])


def test_generate_onnx_dir_is_staged_and_needs_force(tiny_lm_dir, tmp_path, capsys):
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    (graphs / "prefill.onnx").write_text("mine")
    assert generate(tiny_lm_dir, graphs) == 2
    assert "--force" in one_error_line(capsys) and tree(graphs) == {"prefill.onnx": "mine"}
    (tmp_path / "file").write_text("mine")
    assert generate(tiny_lm_dir, tmp_path / "file") == 2
    assert "not a directory" in one_error_line(capsys)
    assert generate(tiny_lm_dir, tiny_lm_dir.parent, "--force") == 2
    assert "the input" in one_error_line(capsys)
    assert generate(tiny_lm_dir, graphs, "--force") == 0
    assert sorted(p.name for p in graphs.iterdir()) == ["decode_step.onnx", "prefill.onnx"]
    assert (graphs / "prefill.onnx").stat().st_size > 1000 and leftovers(tmp_path) == []


def test_generate_failure_leaves_the_onnx_dir_untouched(tiny_lm_dir, tmp_path, monkeypatch, capsys):
    import mq_export.commands.generate

    def export_then_fail(model, directory, opset=None):
        """Writes the graphs where generate asks, then fails as a later step could."""
        for name in ("prefill.onnx", "decode_step.onnx"):
            (Path(directory) / name).write_text("half")
        raise MQExportError("decoding failed")

    monkeypatch.setattr(mq_export.commands.generate, "export_decode", export_then_fail)
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    (graphs / "prefill.onnx").write_text("mine")
    assert generate(tiny_lm_dir, graphs, "--force") == 2
    assert "decoding failed" in one_error_line(capsys)
    assert tree(tmp_path) == {"graphs/prefill.onnx": "mine"} and leftovers(tmp_path) == []
