"""Settings: flag > MEMBRANE_* environment > default, typed conversion, errors naming the source."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from shared.config import CommonSettings, add_arguments, env_name, flag_name, load, setting
from shared.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class DemoSettings(CommonSettings):
    workers: int = setting(4, "worker tasks")
    ratio: float = setting(0.5, "fraction kept")
    verbose: bool = setting(False, "say more")
    pool_name: str = setting("default", "pool to use")
    patterns: tuple[str, ...] = setting(("a", "b"), "patterns, comma-separated")
    limit: int | None = setting(None, "optional limit")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo")
    add_arguments(p, DemoSettings)
    return p


def from_flags(*argv: str, environ: dict[str, str] | None = None) -> DemoSettings:
    return load(DemoSettings, parser().parse_args(list(argv)), environ or {})


def test_names() -> None:
    assert env_name("pool_name") == "MEMBRANE_POOL_NAME"
    assert flag_name("pool_name") == "--pool-name"


def test_defaults() -> None:
    settings = load(DemoSettings, None, {})
    assert settings == DemoSettings()
    assert settings.workers == 4
    assert settings.patterns == ("a", "b")
    assert settings.limit is None
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.metrics_port == 0


def test_defaults_with_unset_flags() -> None:
    assert from_flags() == DemoSettings()


def test_env_beats_default() -> None:
    settings = load(DemoSettings, None, {"MEMBRANE_WORKERS": "9", "MEMBRANE_POOL_NAME": "blue"})
    assert settings.workers == 9
    assert settings.pool_name == "blue"
    assert settings.ratio == 0.5


def test_flag_beats_env() -> None:
    environ = {"MEMBRANE_WORKERS": "9", "MEMBRANE_POOL_NAME": "blue", "MEMBRANE_RATIO": "0.25"}
    settings = from_flags("--workers", "2", "--pool-name", "red", environ=environ)
    assert settings.workers == 2
    assert settings.pool_name == "red"
    assert settings.ratio == 0.25  # no flag: the environment still applies


def test_bad_env_is_ignored_when_the_flag_is_given() -> None:
    settings = from_flags("--workers", "3", environ={"MEMBRANE_WORKERS": "many"})
    assert settings.workers == 3


def test_other_env_vars_are_ignored() -> None:
    environ = {"WORKERS": "7", "MEMBRANE_workers": "8", "MEMBRANE_WORKERS_X": "9"}
    assert load(DemoSettings, None, environ).workers == 4


def test_inherited_common_settings() -> None:
    settings = from_flags(
        "--nats-url",
        "nats://a:4222,nats://b:4222",
        "--metrics-port",
        "9100",
        environ={"MEMBRANE_REDIS_URL": "redis://r:6379/1"},
    )
    assert settings.nats_url == "nats://a:4222,nats://b:4222"
    assert settings.redis_url == "redis://r:6379/1"
    assert settings.metrics_port == 9100


def test_overrides_beat_everything() -> None:
    settings = load(
        DemoSettings,
        parser().parse_args(["--workers", "2"]),
        {"MEMBRANE_WORKERS": "9"},
        workers=11,
    )
    assert settings.workers == 11


def test_explicit_empty_string_is_a_value() -> None:
    assert load(DemoSettings, None, {"MEMBRANE_POOL_NAME": ""}).pool_name == ""
    assert from_flags("--pool-name", "", environ={"MEMBRANE_POOL_NAME": "x"}).pool_name == ""


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMBRANE_WORKERS", "13")
    assert load(DemoSettings).workers == 13


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("0", 0), ("42", 42), ("-3", -3), (" 8 ", 8)],
)
def test_int(raw: str, expected: int) -> None:
    value = load(DemoSettings, None, {"MEMBRANE_WORKERS": raw}).workers
    assert value == expected
    assert type(value) is int


@pytest.mark.parametrize(("raw", "expected"), [("0.1", 0.1), ("2", 2.0), ("1e-3", 0.001)])
def test_float(raw: str, expected: float) -> None:
    value = load(DemoSettings, None, {"MEMBRANE_RATIO": raw}).ratio
    assert value == pytest.approx(expected)
    assert type(value) is float


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("True", True),
        ("YES", True),
        ("on", True),
        (" yes ", True),
        ("0", False),
        ("false", False),
        ("FALSE", False),
        ("no", False),
        ("off", False),
    ],
)
def test_bool_words(raw: str, expected: bool) -> None:
    assert load(DemoSettings, None, {"MEMBRANE_VERBOSE": raw}).verbose is expected
    assert from_flags("--verbose", raw).verbose is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("x", ("x",)),
        ("x,y,z", ("x", "y", "z")),
        (" x , y ", ("x", "y")),
        ("x,,y,", ("x", "y")),
        ("", ()),
    ],
)
def test_comma_separated_tuple(raw: str, expected: tuple[str, ...]) -> None:
    assert load(DemoSettings, None, {"MEMBRANE_PATTERNS": raw}).patterns == expected
    assert from_flags("--patterns", raw).patterns == expected


def test_optional_int() -> None:
    assert load(DemoSettings, None, {"MEMBRANE_LIMIT": "5"}).limit == 5
    with pytest.raises(InvalidArgument) as info:
        load(DemoSettings, None, {"MEMBRANE_LIMIT": "five"})
    assert info.value.field == "MEMBRANE_LIMIT"


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("workers", "four"),
        ("workers", "4.0"),
        ("workers", ""),
        ("ratio", "half"),
        ("verbose", "maybe"),
        ("verbose", "2"),
        ("verbose", ""),
        ("metrics_port", "http"),
    ],
)
def test_bad_env_value_names_the_env_var(name: str, raw: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid value") as info:
        load(DemoSettings, None, {env_name(name): raw})
    assert info.value.field == env_name(name)
    assert repr(raw) in info.value.message


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--workers", "four"], "--workers"),
        (["--ratio", "x"], "--ratio"),
        (["--verbose", "maybe"], "--verbose"),
        (["--metrics-port", "http"], "--metrics-port"),
    ],
)
def test_bad_flag_value_names_the_flag(argv: list[str], field: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid value") as info:
        from_flags(*argv, environ={env_name(field[2:].replace("-", "_")): "1"})
    assert info.value.field == field


def test_add_arguments_declares_one_flag_per_field() -> None:
    p = parser()
    flags = {option for action in p._actions for option in action.option_strings if option != "-h"}
    assert flags == {flag_name(f.name) for f in dataclasses.fields(DemoSettings)} | {"--help"}
    # absent flags leave no attribute: they must not mask a parent parser's value
    assert vars(p.parse_args([])) == {}


def test_add_arguments_help_shows_env_and_default() -> None:
    text = " ".join(parser().format_help().split())
    assert "worker tasks [env MEMBRANE_WORKERS, default 4]" in text
    assert "patterns, comma-separated [env MEMBRANE_PATTERNS, default 'a,b']" in text
    assert "[env MEMBRANE_NATS_URL, default 'nats://127.0.0.1:4222']" in text


def test_unknown_flag_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--no-such-flag", "1"])


def test_settings_are_frozen() -> None:
    settings = load(DemoSettings, None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.workers = 5  # type: ignore[misc]


def test_setting_refuses_mutable_defaults() -> None:
    with pytest.raises(TypeError, match="tuple"):
        setting(["a"], "patterns")
    with pytest.raises(TypeError):
        setting({}, "map")


def test_setting_carries_help() -> None:
    fields = {f.name: f for f in dataclasses.fields(DemoSettings)}
    assert fields["workers"].metadata["help"] == "worker tasks"
    assert fields["workers"].default == 4


def test_help_text_may_contain_percent() -> None:
    @dataclasses.dataclass(frozen=True)
    class PercentSettings(CommonSettings):
        keep: int = setting(50, "percent of entries to keep (50% by default)")

    p = argparse.ArgumentParser()
    add_arguments(p, PercentSettings)
    assert "50% by default" in p.format_help()


def test_datapath_node_from_kubernetes(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a Kubernetes node the DaemonSet hands the node name over as K8S_NODE_NAME."""
    from services.datapath.service import DatapathSettings

    monkeypatch.setenv("K8S_NODE_NAME", "worker-3")
    assert load(DatapathSettings, environ={}).node == "worker-3"
    assert load(DatapathSettings, environ={"MEMBRANE_NODE": "n1"}).node == "n1"
    monkeypatch.delenv("K8S_NODE_NAME")
    with pytest.raises(InvalidArgument, match="node name"):
        load(DatapathSettings, environ={})
