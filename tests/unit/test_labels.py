"""Labels: parsing, Kubernetes key/value syntax, canonical sets and the identity label filter."""

from __future__ import annotations

import pytest

from shared.errors import InvalidArgument
from shared.labels import (
    DEFAULT_LABEL_FILTER,
    MAX_LABELS,
    MAX_NAME_LENGTH,
    MAX_PREFIX_LENGTH,
    NAMESPACE_LABEL,
    NAMESPACE_LABELS_PREFIX,
    SERVICE_ACCOUNT_LABEL,
    Label,
    LabelFilter,
    LabelSet,
    pod_identity_labels,
    validate_key,
    validate_value,
)

# --- Label.parse ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("k8s:app=web", Label("k8s", "app", "web")),
        ("app=web", Label("k8s", "app", "web")),
        ("app", Label("k8s", "app", "")),
        ("app=", Label("k8s", "app", "")),
        ("k8s:app.kubernetes.io/name=db", Label("k8s", "app.kubernetes.io/name", "db")),
        ("reserved:host", Label("reserved", "host", "")),
        ("reserved:remote-node", Label("reserved", "remote-node", "")),
        ("cidr:10.0.0.0/8", Label("cidr", "10.0.0.0/8", "")),
        ("cidr:192.168.1.7", Label("cidr", "192.168.1.7/32", "")),
        ("cidr:2001:db8::/32", Label("cidr", "2001:db8::/32", "")),
        ("cidr:2001:DB8::/32", Label("cidr", "2001:db8::/32", "")),
    ],
)
def test_parse_sources(text: str, expected: Label) -> None:
    assert Label.parse(text) == expected


@pytest.mark.parametrize(
    ("label", "text"),
    [
        (Label("k8s", "app", "web"), "k8s:app=web"),
        (Label("k8s", "app", ""), "k8s:app="),
        (Label("reserved", "host", ""), "reserved:host"),
        (Label("reserved", "host", "x"), "reserved:host=x"),
        (Label("cidr", "10.0.0.0/8", ""), "cidr:10.0.0.0/8"),
    ],
)
def test_label_text_form(label: Label, text: str) -> None:
    assert str(label) == text
    assert Label.parse(text) == label


def test_parse_default_source_applies_only_without_a_known_source() -> None:
    assert Label.parse("host", default_source="reserved") == Label("reserved", "host", "")
    assert Label.parse("k8s:app=web", default_source="reserved") == Label("k8s", "app", "web")
    assert Label.parse("10.1.0.0/16", default_source="cidr") == Label("cidr", "10.1.0.0/16")
    assert Label.parse("2001:db8::/64", default_source="cidr") == Label("cidr", "2001:db8::/64")


def test_parse_unknown_default_source_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="unknown label source 'bogus'") as info:
        Label.parse("app=web", default_source="bogus")
    assert info.value.field == "labels['app=web']"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "k8s:",
        "k8s:=web",
        "foo:bar=baz",  # unknown source: 'foo:bar' is then an invalid key
        "any:app=web",
        "app=web=x",
        "app=-web",
        "app=we b",
        " app=web",
        "cidr:10.0.0.1/8",  # host bits set
        "cidr:10.0.0.0/33",
        "cidr:not-a-network",
        "cidr:10.0.0.0/8=x",
    ],
)
def test_parse_rejects_and_names_the_label(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        Label.parse(text)
    assert info.value.field == f"labels[{text!r}]"
    assert info.value.code == "invalid_argument"


def test_create_cidr_with_value_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="no value") as info:
        Label.create("cidr", "10.0.0.0/8", "x", field="here")
    assert info.value.field == "here"


def test_create_normalises_cidr() -> None:
    assert Label.create("cidr", "2001:0db8:0000::/48").key == "2001:db8::/48"


# --- Kubernetes key and value syntax --------------------------------------------------------------

NAME_63 = "a" + "b" * 61 + "c"
PREFIX_253 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])


def test_length_fixtures() -> None:
    assert len(NAME_63) == MAX_NAME_LENGTH == 63
    assert len(PREFIX_253) == MAX_PREFIX_LENGTH == 253


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "A",
        "9",
        "app",
        "App_Name-1.x",
        NAME_63,
        "example.com/app",
        "my-domain.example.com/Some_Name",
        "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
        f"{PREFIX_253}/{NAME_63}",
        "x/y",
        "1-2.3/z",
    ],
)
def test_valid_keys(key: str) -> None:
    validate_key(key)
    assert Label.create("k8s", key, "v").key == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "must not be empty"),
        ("/app", "empty prefix"),
        ("example.com/", "empty name"),
        (NAME_63 + "d", "longer than 63"),
        (f"{PREFIX_253}x/app", "longer than 253"),
        ("Example.com/app", "DNS subdomain"),
        ("example_com/app", "DNS subdomain"),
        ("-example.com/app", "DNS subdomain"),
        ("example.com-/app", "DNS subdomain"),
        ("example..com/app", "DNS subdomain"),
        ("a/b/c", "DNS subdomain"),
        ("-app", "must start and end"),
        ("app-", "must start and end"),
        ("_app", "must start and end"),
        ("app.", "must start and end"),
        ("ap p", "must start and end"),
        ("app:x", "must start and end"),
        ("äpp", "must start and end"),
    ],
)
def test_invalid_keys(key: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason) as info:
        validate_key(key, field="metadata.labels")
    assert info.value.field == "metadata.labels"


@pytest.mark.parametrize("value", ["", "a", "Web", "v1.2.3", "a_b-c.d", NAME_63, "0"])
def test_valid_values(value: str) -> None:
    validate_value(value)
    assert Label.create("k8s", "app", value).value == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (NAME_63 + "d", "longer than 63"),
        ("-web", "must start and end"),
        ("web-", "must start and end"),
        (".web", "must start and end"),
        ("we b", "must start and end"),
        ("a/b", "must start and end"),
        ("a=b", "must start and end"),
        ("a;b", "must start and end"),
    ],
)
def test_invalid_values(value: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason) as info:
        validate_value(value, field="spec.x")
    assert info.value.field == "spec.x"


def test_create_names_the_field_it_was_given() -> None:
    with pytest.raises(InvalidArgument) as info:
        Label.create("k8s", "app", "-bad", field="metadata.labels['app']")
    assert info.value.field == "metadata.labels['app']"
    assert str(info.value).startswith("metadata.labels['app']: ")


# --- LabelSet -------------------------------------------------------------------------------------


def test_canonical_is_sorted_by_source_and_key() -> None:
    labels = LabelSet.parse(["zone=b", "reserved:host", "app=web", "cidr:10.0.0.0/8", "tier=db"])
    assert labels.canonical == "cidr:10.0.0.0/8;k8s:app=web;k8s:tier=db;k8s:zone=b;reserved:host"
    assert labels.strings() == labels.canonical.split(";")
    assert list(labels) == [
        "cidr:10.0.0.0/8",
        "k8s:app",
        "k8s:tier",
        "k8s:zone",
        "reserved:host",
    ]


def test_canonical_is_independent_of_input_order_and_spelling() -> None:
    texts = ["app=web", "k8s:tier=db", f"k8s:{NAMESPACE_LABEL}=prod", "version=v1"]
    respelled = ["k8s:app=web", "tier=db", f"{NAMESPACE_LABEL}=prod", "k8s:version=v1"]
    forward = LabelSet.parse(texts)
    backward = LabelSet.parse(reversed(respelled))
    assert LabelSet.parse(texts[::2]).union(LabelSet.parse(texts[1::2]).values()) == forward
    assert forward.canonical == backward.canonical
    assert forward == backward
    assert hash(forward) == hash(backward)
    assert {forward, backward} == {forward}


def test_different_sets_are_unequal() -> None:
    assert LabelSet.parse(["app=web"]) != LabelSet.parse(["app=db"])
    assert LabelSet.parse(["app=web"]) != LabelSet.parse(["app=web", "tier=x"])
    assert LabelSet.parse(["reserved:host"]) != LabelSet.parse(["host"])
    assert LabelSet.parse(["app=web"]) != "k8s:app=web"


def test_same_label_twice_is_one_label() -> None:
    labels = LabelSet.parse(["app=web", "k8s:app=web"])
    assert len(labels) == 1
    assert labels.canonical == "k8s:app=web"


def test_same_key_with_different_values_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="given twice") as info:
        LabelSet.parse(["app=web", "tier=x", "k8s:app=db"])
    assert info.value.field == "labels['k8s:app']"
    assert "'web'" in info.value.message
    assert "'db'" in info.value.message


def test_same_key_in_different_sources_is_two_labels() -> None:
    labels = LabelSet([Label("k8s", "host", ""), Label("reserved", "host", "")])
    assert len(labels) == 2
    assert labels.is_reserved()
    assert labels.k8s_map() == {"host": ""}


def test_max_labels() -> None:
    at_limit = LabelSet(Label("k8s", f"k{i}", "v") for i in range(MAX_LABELS))
    assert len(at_limit) == MAX_LABELS
    with pytest.raises(InvalidArgument, match=f"at most {MAX_LABELS}") as info:
        LabelSet(Label("k8s", f"k{i}", "v") for i in range(MAX_LABELS + 1))
    assert info.value.field == "labels"
    with pytest.raises(InvalidArgument):
        at_limit.union([Label("k8s", "one-more", "v")])


def test_max_labels_counts_distinct_labels() -> None:
    labels = [Label("k8s", f"k{i}", "v") for i in range(MAX_LABELS)]
    assert len(LabelSet(labels + labels[:5])) == MAX_LABELS


@pytest.mark.parametrize(
    "texts",
    [
        [],
        ["app=web"],
        ["app="],
        ["reserved:world"],
        ["cidr:10.0.0.0/8", "cidr:2001:db8::/32"],
        ["reserved:host", "reserved:kube-apiserver", "app=x", f"{NAMESPACE_LABELS_PREFIX}team=a"],
        [f"{SERVICE_ACCOUNT_LABEL}=default", f"{NAMESPACE_LABEL}=kube-system", "x.io/y=Z_1"],
    ],
)
def test_from_canonical_round_trip(texts: list[str]) -> None:
    labels = LabelSet.parse(texts)
    again = LabelSet.from_canonical(labels.canonical)
    assert again == labels
    assert again.canonical == labels.canonical
    assert dict(again) == dict(labels)


def test_from_canonical_empty() -> None:
    assert len(LabelSet.from_canonical("")) == 0
    assert LabelSet().canonical == ""


def test_from_canonical_validates() -> None:
    with pytest.raises(InvalidArgument):
        LabelSet.from_canonical("k8s:app=web;k8s:app=db")
    with pytest.raises(InvalidArgument):
        LabelSet.from_canonical("k8s:app=web;;k8s:b=c")


def test_from_k8s() -> None:
    labels = LabelSet.from_k8s({"tier": "db", "app": "web"})
    assert labels.canonical == "k8s:app=web;k8s:tier=db"
    assert labels.k8s_map() == {"app": "web", "tier": "db"}
    assert not labels.is_reserved()


def test_from_k8s_names_the_bad_label() -> None:
    with pytest.raises(InvalidArgument) as info:
        LabelSet.from_k8s({"app": "web", "bad key": "x"})
    assert info.value.field == "metadata.labels['bad key']"


def test_mapping_access() -> None:
    labels = LabelSet.parse(["app=web", "reserved:host"])
    assert labels["k8s:app"] == Label("k8s", "app", "web")
    assert "reserved:host" in labels
    assert "k8s:host" not in labels
    with pytest.raises(KeyError):
        labels["k8s:tier"]
    assert labels.k8s_map() == {"app": "web"}
    assert repr(labels) == "LabelSet('k8s:app=web;reserved:host')"


# --- LabelFilter ----------------------------------------------------------------------------------


def _k8s(key: str, value: str = "v") -> Label:
    return Label("k8s", key, value)


@pytest.mark.parametrize(
    "key",
    [
        "pod-template-hash",
        "controller-revision-hash",
        "pod-template-generation",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "batch.kubernetes.io/job-completion-index",
        "batch.kubernetes.io/controller-uid",
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
        "beta.kubernetes.io/arch",
        "io.kubernetes.container.name",
        "io.kubernetes.pod.name",
        "io.kubernetes.pod.namespace.extra",
        "k8s.io/cluster-service",
        "addonmanager.k8s.io/mode",
        "etcd_node",
        "annotation.io/x",
    ],
)
def test_default_filter_drops(key: str) -> None:
    assert not LabelFilter().keeps(_k8s(key))


@pytest.mark.parametrize(
    "key",
    [
        "app",
        "tier",
        "version",
        "k8s-app",
        "example.com/team",
        NAMESPACE_LABEL,
        f"{NAMESPACE_LABELS_PREFIX}team",
        f"{NAMESPACE_LABELS_PREFIX}kubernetes.io/metadata.name",
        f"{NAMESPACE_LABELS_PREFIX}pod-template-hash",
        SERVICE_ACCOUNT_LABEL,
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/part-of",
    ],
)
def test_default_filter_keeps(key: str) -> None:
    assert LabelFilter().keeps(_k8s(key))


@pytest.mark.parametrize(
    "label",
    [
        Label("reserved", "host"),
        Label("reserved", "world"),
        Label("cidr", "10.0.0.0/8"),
    ],
)
def test_non_k8s_labels_are_always_kept(label: Label) -> None:
    assert LabelFilter().keeps(label)
    assert LabelFilter(["!.*"]).keeps(label)
    assert LabelFilter(["!host", "!world", r"!10\.0"]).keeps(label)


def test_default_patterns() -> None:
    assert LabelFilter().patterns == DEFAULT_LABEL_FILTER


def test_apply_to_a_pod() -> None:
    pod = LabelSet.from_k8s(
        {
            "app": "web",
            "app.kubernetes.io/name": "web",
            "pod-template-hash": "7d9c8f6b5",
            "controller-revision-hash": "abc",
            "statefulset.kubernetes.io/pod-name": "web-0",
            NAMESPACE_LABEL: "prod",
            f"{NAMESPACE_LABELS_PREFIX}kubernetes.io/metadata.name": "prod",
            SERVICE_ACCOUNT_LABEL: "web",
        }
    ).union([Label("reserved", "init")])
    assert LabelFilter().apply(pod).canonical == ";".join(
        [
            "k8s:app=web",
            "k8s:app.kubernetes.io/name=web",
            f"k8s:{NAMESPACE_LABELS_PREFIX}kubernetes.io/metadata.name=prod",
            f"k8s:{SERVICE_ACCOUNT_LABEL}=web",
            f"k8s:{NAMESPACE_LABEL}=prod",
            "reserved:init",
        ]
    )


def test_deployment_replicas_share_one_filtered_form() -> None:
    def replica(template_hash: str) -> LabelSet:
        return LabelSet.from_k8s(
            {
                "app": "web",
                "pod-template-hash": template_hash,
                NAMESPACE_LABEL: "prod",
                SERVICE_ACCOUNT_LABEL: "default",
            }
        )

    first, second = replica("5d4f8b7c9"), replica("6bc7d9f84")
    assert first != second
    label_filter = LabelFilter()
    assert label_filter.apply(first) == label_filter.apply(second)
    assert label_filter.apply(first).canonical == (
        f"k8s:app=web;k8s:{SERVICE_ACCOUNT_LABEL}=default;k8s:{NAMESPACE_LABEL}=prod"
    )


def test_different_apps_stay_apart_after_filtering() -> None:
    web = LabelSet.from_k8s({"app": "web", "pod-template-hash": "1"})
    db = LabelSet.from_k8s({"app": "db", "pod-template-hash": "1"})
    assert LabelFilter().apply(web) != LabelFilter().apply(db)


def test_custom_exclusions() -> None:
    label_filter = LabelFilter(["!^build-", "!commit"])
    assert not label_filter.keeps(_k8s("build-id"))
    assert not label_filter.keeps(_k8s("git-commit"))
    assert label_filter.keeps(_k8s("rebuild-id"))  # '^' anchors the exclusion
    assert label_filter.keeps(_k8s("pod-template-hash"))  # defaults are replaced, not merged
    assert label_filter.keeps(_k8s("app"))


def test_custom_inclusion_makes_an_allow_list_and_the_longer_pattern_wins() -> None:
    label_filter = LabelFilter([r"team\.example\.com/", r"!example\.com"])
    assert label_filter.keeps(_k8s("team.example.com/owner"))  # longer inclusion wins
    assert not label_filter.keeps(_k8s("cost.example.com/center"))
    assert not label_filter.keeps(_k8s("app"))  # Cilium: only included labels count
    assert label_filter.keeps(Label("reserved", "host"))


def test_default_inclusions_do_not_make_an_allow_list() -> None:
    label_filter = LabelFilter([*DEFAULT_LABEL_FILTER, "!tier"])
    assert label_filter.keeps(_k8s("app"))
    assert not label_filter.keeps(_k8s("tier"))
    assert label_filter.keeps(_k8s("io.kubernetes.pod.namespace"))


def test_empty_filter_keeps_everything() -> None:
    pod = LabelSet.from_k8s({"app": "web", "pod-template-hash": "abc"})
    assert LabelFilter([]).apply(pod) == pod


@pytest.mark.parametrize(
    ("patterns", "index"),
    [
        (["("], 0),
        (["app", "!["], 1),
        (["app", "!ok", "*bad"], 2),
    ],
)
def test_invalid_regex_names_the_pattern(patterns: list[str], index: int) -> None:
    with pytest.raises(InvalidArgument, match="not a regular expression") as info:
        LabelFilter(patterns)
    assert info.value.field == f"label_filter[{index}]"


def test_pod_labels_cannot_forge_namespace_labels_or_service_account() -> None:
    # what apply refuses (test_manifests), anything else that creates pods cannot smuggle in
    forged = {
        "app": "web",
        "io.cilium.k8s.namespace.labels.team": "trusted",
        "io.cilium.k8s.policy.serviceaccount": "admin",
        "io.kubernetes.pod.namespace": "kube-system",
    }
    labels = LabelSet.parse(pod_identity_labels("dev", forged, {"team": "dev"}, "web"))
    assert labels.k8s_map() == {
        "app": "web",
        "io.cilium.k8s.namespace.labels.team": "dev",
        "io.cilium.k8s.policy.serviceaccount": "web",
        "io.kubernetes.pod.namespace": "dev",
    }
