"""The command line: every sub-command builds and prints its help; errors are reported, not raised."""

import pytest

from lungnlb.cli import COMMANDS, main


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_prints(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: lungnlb" in capsys.readouterr().out


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no_such_image.nii.gz"
    assert main(["demo", "--image", str(missing), "--out", str(tmp_path / "o.png")]) == 2
    assert "no_such_image" in capsys.readouterr().err


def test_demo_segments_the_bundled_sample_with_shipped_weights(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    probability = float(printed.split("tumour probability ")[1].split()[0])
    assert 0.0 <= probability <= 1.0
