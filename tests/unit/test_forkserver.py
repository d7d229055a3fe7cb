"""The tests' fork server (tests/forkserver.py) answers as `python -m fedtune.cli` does, and a call
past its timeout is killed without disturbing the next."""


def test_a_forked_call_answers_like_a_cold_process(fresh_cli, cli, tmp_path) -> None:
    # Arrange: a config error (exit code, message) and a valid config
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: -1\n")

    # Act
    forked = [fresh_cli("validate", str(bad)), fresh_cli("validate", "configs/tiny.yaml")]
    cold = [cli("validate", str(bad)), cli("validate", "configs/tiny.yaml")]

    # Assert
    assert [r.returncode for r in forked] == [r.returncode for r in cold]
    assert forked[0].returncode != 0 and forked[1].returncode == 0
    assert "rounds" in forked[0].stderr + forked[0].stdout
    assert forked[0].stderr == cold[0].stderr and forked[1].stdout == cold[1].stdout


def test_a_call_past_its_timeout_is_killed_and_the_server_goes_on(fresh_cli, tmp_path) -> None:
    import pytest

    # Act: a run that cannot finish in 0.5 s
    with pytest.raises(TimeoutError):
        fresh_cli("run", "configs/tiny.yaml", "--set", f"output_dir={tmp_path / 'run'}", "--no-progress", timeout=0.5)
    after = fresh_cli("validate", "configs/tiny.yaml")

    # Assert: the next call gets its own answer, not the killed one's
    assert after.returncode == 0, after.stderr
