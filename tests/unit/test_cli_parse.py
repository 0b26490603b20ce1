"""The command line's shape: global options anywhere, each subcommand's own usage, errors
located once. Parsing only: no cluster."""

from __future__ import annotations

import json

import pytest
import yaml

from membrane import output
from membrane.cli import build_parser, located
from shared.errors import InvalidArgument
from shared.messages import Endpoint


@pytest.mark.parametrize(
    "argv",
    [
        ["--nats-url", "nats://a:1", "--timeout", "2", "--state-dir", "/s", "pod", "list"],
        ["pod", "list", "--nats-url", "nats://a:1", "--timeout", "2", "--state-dir", "/s"],
        ["--timeout", "2", "pod", "list", "--nats-url", "nats://a:1", "--state-dir", "/s"],
        ["pod", "--nats-url", "nats://a:1", "list", "--timeout", "2", "--state-dir", "/s"],
    ],
)
def test_global_options_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = build_parser(run_flags=False).parse_args(argv)
    assert (args.nats_url, args.timeout, args.state_dir) == ("nats://a:1", 2.0, "/s")


def test_global_options_keep_their_defaults_when_absent() -> None:
    args = build_parser(run_flags=False).parse_args(["up", "--nats-url", "nats://b:2"])
    assert (args.nats_url, args.timeout, args.state_dir) == ("nats://b:2", 5.0, None)


def test_an_unknown_flag_prints_the_subcommands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser(run_flags=False).parse_args(["pod", "list", "--bogus"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: membrane pod list ")
    assert "membrane pod list: error: unrecognized arguments: --bogus" in err


def test_a_boolean_setting_stands_alone_or_takes_a_value() -> None:
    parser = build_parser(run_flags=True)
    args = parser.parse_args(["run", "datapath", "--node", "x", "--dump-program"])
    assert (args.node, args.dump_program) == ("x", "true")
    args = parser.parse_args(["run", "datapath", "--dump-program", "false", "--node", "y"])
    assert (args.node, args.dump_program) == ("y", "false")


def test_run_takes_nats_url_before_or_after_the_service() -> None:
    parser = build_parser(run_flags=True)
    assert parser.parse_args(["--nats-url", "n1", "run", "lb"]).nats_url == "n1"
    assert parser.parse_args(["run", "lb", "--nats-url", "n2"]).nats_url == "n2"


def test_an_error_states_its_location_once() -> None:
    field = "spec.egress[0].toFQDNs"
    message = f"bad.yaml: document 2 (CiliumNetworkPolicy x): {field}: must be a list"
    assert located(InvalidArgument(message, field=field)) == message
    assert located(InvalidArgument("is not a number", field="port")) == "port: is not a number"


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["bpf", "lb"],
        ["bpf", "policy", "web"],
        ["pod", "create", "web"],
        ["service", "create", "web"],
        ["get", "pods"],
    ],
)
@pytest.mark.parametrize("fmt", ["table", "wide", "json", "yaml"])
def test_kubectl_output_formats(argv: list[str], fmt: str) -> None:
    assert build_parser(run_flags=False).parse_args([*argv, "-o", fmt]).output == fmt


def test_yaml_says_what_json_says() -> None:
    endpoint = Endpoint(
        namespace="prod", name="web", node="n1", ip="10.0.0.2", identity=256, labels={}
    )
    as_json = json.loads(output.structured_text(endpoint, "json"))
    assert yaml.safe_load(output.structured_text(endpoint, "yaml")) == as_json
    assert as_json["name"] == "web"
    assert output.structured_text({"items": []}, "yaml") == "items: []"
