"""The CLI in-process, for tests: one runner and one check of the one-line error."""

from __future__ import annotations

from tokenlean.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """main() in-process: (exit code, stdout, stderr); argparse errors exit via SystemExit.
    What fixtures printed before (transformers' save bars) is dropped first."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, out: str, err: str, *fragments: str) -> None:
    """Bad input: exit 2, nothing on stdout, one `tokenlean: error:` line naming it."""
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tokenlean: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err
    assert "Traceback" not in err
