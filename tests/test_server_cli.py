"""server.cli: python -m server reports configuration errors as a usage error."""

from __future__ import annotations


def test_cli_reports_config_errors_with_exit_code_2(capsys) -> None:
    from server.cli import main

    assert main(["--bundle", "/nonexistent/bundle"]) == 2
    assert "does not exist" in capsys.readouterr().err
