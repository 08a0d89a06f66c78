"""The `kotel` command: subcommands come from entry points; a broken one does not break the rest."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from kotel import cli


def test_every_registered_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"kafka", "topology", "agent"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        assert info.value.code == 0
        assert "usage: kotel" in capsys.readouterr().out


def test_a_plugin_that_fails_to_import_is_reported_and_the_others_still_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = cli.entry_points

    def with_broken(group: str) -> list[EntryPoint]:
        return [*real(group=group), EntryPoint("broken", "no_such_module_xyz:register", group)]

    monkeypatch.setattr(cli, "entry_points", with_broken)
    assert cli.main(["broken"]) == 1
    assert capsys.readouterr().err.strip() == (
        "kotel broken is unavailable in this installation: "
        "ModuleNotFoundError: No module named 'no_such_module_xyz'"
    )
    with pytest.raises(SystemExit) as info:
        cli.main(["topology", "--help"])
    assert info.value.code == 0
